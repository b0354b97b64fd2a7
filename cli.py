"""`lite3r` command line: parses options and calls the library; no logic of its own.

Each subcommand lives in one function below; its signature is the single source of its defaults.
Known errors (bad paths, bad values, shape mismatches) become one red line and exit code 2;
set LITE3R_DEBUG=1 to see the full traceback instead.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="lite3r",
    help="Make dense 3D reconstruction transformers (VGGT, Depth Anything 3) fast and small: "
    "Sparse-Linear Attention + FP8 QAT with partial attention distillation, and an FP8 + fused-SLA deployment path.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- commands are added below by the pieces that own them (train, eval, bench, make-scenes, reconstruct, export) ---


def main() -> None:
    """Console entry point: run the app, turning known errors into one clear line."""
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, TypeError) as err:
        if os.environ.get("LITE3R_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
