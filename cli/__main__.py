"""`python -m lite3r_cli ...` runs the `lite3r` command line."""
from lite3r_cli.app import main

main()
