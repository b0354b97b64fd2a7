"""Atomic writes give outputs the permissions a plain open() would (mkstemp alone makes them 0600)."""
import os

from lite3r_recon import io


def test_atomic_write_uses_the_umask(tmp_path):
    umask = os.umask(0o22)
    os.umask(umask)
    out = io.atomic_write_text(tmp_path / "a.txt", "hi")
    assert (os.stat(out).st_mode & 0o777) == (0o666 & ~umask)
