"""lite3r's commands (installed as `lite3r_cli`): the Typer app `lite3r` is in app.py (`lite3r_cli.app:app`), each
command's work in its own module here (pretrain, evaluate, study, bench, reconstruct, export; `lite3r train` runs
lite3r_recon.qat, the QAT engine that `study` shares), on top of the library (`lite3r`, `lite3r_backbones`,
`lite3r_recon`). Commands do not import each other."""
