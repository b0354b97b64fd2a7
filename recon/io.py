"""File output shared by every lite3r command: atomic writes, refuse-to-overwrite, JSON and rich tables.

Every writer goes to a temporary file in the destination's folder and `os.replace`s it into place, so a killed
process never leaves a half-written file under the final name. With `overwrite=False` (the default) an existing
file is never replaced: the caller gets a one-line FileExistsError naming it and the flag to pass.

    atomic_write_text("out.json", text, overwrite=args.overwrite)
    with atomic_path("scene.ply", overwrite=True) as tmp:   # for writers that want a path (trimesh, PIL, ...)
        mesh.export(tmp)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from lite3r_recon.errors import CannotWrite, InvalidInput, Lite3rError, MissingInput, WouldOverwrite


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def check_writable(path: str | os.PathLike, *, folder: bool = False, create: bool = False) -> Path:
    """`path` (a file; with `folder` a folder) as a Path if lite3r can write it: its nearest existing ancestor is a
    folder a file can be created in (probed with an empty temporary file, so a read-only folder or file system is
    found before any work). `create`: also make the folder (or the file's folder). Else a one-line CannotWrite
    naming `path`: a read-only folder, a path under a file, no space left for a file."""
    path = Path(path)
    base = path if folder else path.parent
    probe = base
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CannotWrite(f"{path}: cannot write there, {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lite3r-probe.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
        if create:
            base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CannotWrite(f"{path}: cannot write into {probe} ({_why(err)})") from None
    return path


def ensure_writable(path: str | os.PathLike, overwrite: bool = False, *, flag: str = "--overwrite") -> Path:
    """`path` as a Path whose parent folder exists and can be written (check_writable); FileExistsError when it exists
    and `overwrite` is False, ValueError when it is a folder or another non-regular file (a device, a pipe)."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory, expected a file path")
    if path.exists() and not path.is_file():
        raise InvalidInput(f"{path} is not a regular file (a device or pipe?), expected a file path")
    if path.exists() and not overwrite:
        raise WouldOverwrite(f"{path} exists; pass {flag} to replace it")
    return check_writable(path, create=True)


_UMASK = os.umask(0o22)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Any OSError of the writes inside (a full disk, a folder made read-only or removed meanwhile) becomes a
    one-line CannotWrite naming `path`; the project's own errors pass as they are."""
    try:
        yield
    except OSError as err:
        if isinstance(err, Lite3rError):
            raise
        raise CannotWrite(f"{path}: cannot write ({_why(err)})") from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same suffix, so format-sniffing writers work); on success it is
    `os.replace`d onto `path`, on an exception it is removed and `path` is left untouched."""
    path = ensure_writable(path, overwrite)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.", suffix=path.suffix if suffix is None else suffix,
                                   dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            if not tmp.exists():
                raise MissingInput(f"{path}: the writer produced no file")
            if not overwrite and path.exists():  # appeared while we wrote
                raise WouldOverwrite(f"{path} exists; pass --overwrite to replace it")
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the mode a plain open() would give
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files atomic_path left in `folder` when its process was killed mid-write (.NAME.tmp.*);
    returns them. Only a folder's own writer calls this (a run on start or resume): a live writer's file would go."""
    folder = Path(folder)
    gone = [p for p in folder.glob(".*.tmp.*") if p.is_file()] if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` to `path` atomically (fsync'd temp file + os.replace)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values, Paths and dataclasses -> plain JSON values; non-finite floats -> None."""
    import dataclasses

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy array / scalar
        return to_jsonable(obj.tolist())
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = False, indent: int = 2) -> Path:
    """`obj` (tensors, numpy, Paths allowed) as JSON, written atomically; NaN/inf become null."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent) + "\n", overwrite=overwrite)


write_json = atomic_write_json


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *, metadata: dict | None = None,
                            overwrite: bool = False) -> Path:
    """safetensors file of `tensors` (moved to CPU, made contiguous) with string `metadata`, written atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={k: (v if isinstance(v, str) else json.dumps(to_jsonable(v)))
                          for k, v in (metadata or {}).items()})
    return atomic_write_bytes(path, data, overwrite=overwrite)


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}g}"
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _fmt(v.item(), digits)
    return str(v)


def rich_table(rows: Sequence[Mapping[str, Any]], *, title: str | None = None, columns: Sequence[str] | None = None,
               digits: int = 4):
    """A rich Table with one row per mapping; columns default to the keys in first-seen order, floats shown with
    `digits` significant digits, missing cells as '-'. Numeric columns are right-aligned."""
    from rich.table import Table

    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=title)
    for c in cols:
        numeric = all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) and rows
        table.add_column(str(c), justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*[_fmt(r.get(c), digits) for c in cols])
    return table


NON_TERMINAL_WIDTH = 200  # a log file or pipe has no width: rich's 80 columns would cut progress lines and tables


def console(quiet: bool = False, *, stderr: bool = False, min_width: int = 0):
    """A rich Console (stdout, or `stderr`; no auto-highlighting) at least `min_width` columns wide, and
    NON_TERMINAL_WIDTH wide when it writes to a file or pipe (unless COLUMNS says otherwise); quiet=True prints
    nothing."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    width = probe.width if probe.is_terminal or os.environ.get("COLUMNS") else NON_TERMINAL_WIDTH
    return Console(quiet=quiet, highlight=False, stderr=stderr, width=max(width, min_width))


__all__ = ["atomic_path", "atomic_save_safetensors", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "check_writable", "console", "ensure_writable", "remove_temporaries", "rich_table", "to_jsonable", "write_json",
           "writing"]
