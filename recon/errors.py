"""The project's own error types: input lite3r cannot use, said in one line that names the argument or file and what
was expected. `lite3r` (cli/app.py main) prints exactly that line and exits with 2; any other exception is a bug and
keeps its traceback. Torch-free and importing nothing, so every layer (backbones, recon, cli) can raise them.

They subclass the builtin a caller would expect (ValueError, FileNotFoundError, FileExistsError, KeyError), so
`except ValueError` keeps working. The copyable core lite3r.py has its own `lite3r.Lite3rError(ValueError)`."""


class Lite3rError(Exception):
    """Bad input from the user (not a bug): the first line of the message is what the CLI prints."""

    def __str__(self) -> str:  # KeyError would repr() its message; these print it as written
        return str(self.args[0]) if self.args else ""


class InvalidInput(Lite3rError, ValueError):
    """A value, shape or file content that cannot be used."""


class MissingInput(Lite3rError, FileNotFoundError):
    """A file or folder that is not there (or an empty folder)."""


class WouldOverwrite(Lite3rError, FileExistsError):
    """An output that exists and would be replaced without --overwrite."""


class CannotWrite(Lite3rError, OSError):
    """An output that cannot be written: a read-only folder, a path under a file, a full disk (any OSError of a write,
    said with the path)."""


class MismatchedKeys(Lite3rError, KeyError):
    """Tensors of a file that do not match the model's (unknown or missing keys)."""
