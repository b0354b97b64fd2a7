"""lite3r's commands (installed as `lite3r_cli`): the Typer app `lite3r` is in app.py (`lite3r_cli.app:app`), each
command's work in its own module here (train, pretrain, evaluate, study, bench, reconstruct), on top of the
library (`lite3r`, `lite3r_backbones`, `lite3r_recon`). Commands do not import each other."""
