"""recon.io atomic writers and recon.formats (cam.txt, PFM, pair.txt): round trips, exact layout, clear errors."""
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lite3r_recon import formats
from lite3r_recon.io import atomic_path, atomic_save_safetensors, atomic_write_json, atomic_write_text, ensure_writable

finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)


# ------------------------------------------------------------------------------------------------------- io
def test_atomic_write_refuses_overwrite_and_replaces_with_flag(tmp_path):
    p = tmp_path / "a" / "out.txt"
    atomic_write_text(p, "one")
    assert p.read_text() == "one"
    with pytest.raises(FileExistsError, match="out.txt exists; pass --overwrite"):
        atomic_write_text(p, "two")
    assert p.read_text() == "one"
    atomic_write_text(p, "two", overwrite=True)
    assert p.read_text() == "two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.txt"]  # no temp file left
    with pytest.raises(ValueError, match="is a directory"):
        ensure_writable(tmp_path, overwrite=True)


def test_atomic_path_leaves_target_untouched_on_failure(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(p, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["x.bin"]
    with atomic_path(p, overwrite=True) as tmp:
        assert tmp.suffix == ".bin" and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert p.read_bytes() == b"new"


def test_json_and_safetensors(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"t": torch.tensor([1.5, 2.0]), "n": float("nan"), "p": tmp_path})
    assert json.loads((tmp_path / "m.json").read_text()) == {"t": [1.5, 2.0], "n": None, "p": str(tmp_path)}
    from safetensors.torch import load_file

    t = {"w": torch.randn(3, 4)}
    atomic_save_safetensors(tmp_path / "w.safetensors", t, metadata={"cfg": {"a": 1}})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], t["w"])


# -------------------------------------------------------------------------------------------------- cam.txt
@settings(deadline=None, max_examples=25)
@given(E=st.lists(finite, min_size=12, max_size=12), K=st.lists(finite, min_size=9, max_size=9),
       depth=st.lists(st.floats(0.01, 1e4, allow_nan=False), min_size=2, max_size=4))
def test_cam_round_trip(tmp_path_factory, E, K, depth):
    p = tmp_path_factory.mktemp("cam") / "00000000_cam.txt"
    E = np.array(E).reshape(3, 4)
    if len(depth) >= 3:
        depth[2] = float(int(depth[2]))  # DEPTH_NUM is an integer
    formats.write_cam(p, E, np.array(K).reshape(3, 3), depth)
    cam = formats.read_cam(p)
    np.testing.assert_array_equal(cam.extrinsic[:3], E)
    np.testing.assert_array_equal(cam.extrinsic[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(cam.intrinsic, np.array(K).reshape(3, 3))
    assert cam.depth == tuple(depth)


def test_cam_parsed_by_tokens_and_errors(tmp_path):
    text = ("extrinsic\n1 0 0 0.5\n0 1 0 0\n0 0 1 0\n0 0 0 1\n\nintrinsic\n10 0 5\n0 10 4\n0 0 1\n\n"
            "425.0 2.5\n")
    p = tmp_path / "c.txt"
    p.write_text(text.replace("\n", " \r\n  "))  # any whitespace
    cam = formats.read_cam(p)
    assert cam.extrinsic[0, 3] == 0.5 and cam.intrinsic[1, 2] == 4 and cam.depth == (425.0, 2.5)
    assert cam.depth_min == 425.0 and cam.depth_max is None
    p.write_text(text.replace("425.0 2.5", "425 2.5 192 902.5"))
    assert formats.read_cam(p).depth_max == 902.5
    p.write_text(text.replace("425.0 2.5", ""))
    with pytest.raises(ValueError, match=r"c\.txt: not an MVSNet cam\.txt"):
        formats.read_cam(p)
    p.write_text(text.replace("0.5", "abc"))
    with pytest.raises(ValueError, match="non-numeric"):
        formats.read_cam(p)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        formats.read_cam(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------------ PFM
@pytest.mark.parametrize("little", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3)])
def test_pfm_round_trip(tmp_path, little, shape):
    a = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    formats.write_pfm(tmp_path / "d.pfm", a, little_endian=little)
    head = (tmp_path / "d.pfm").read_bytes()[:2]
    assert head == (b"PF" if len(shape) == 3 else b"Pf")
    np.testing.assert_array_equal(formats.read_pfm(tmp_path / "d.pfm"), a)


def test_pfm_rows_are_bottom_up_and_scale_sign_is_endianness(tmp_path):
    # hand-written file: 2x2, big endian (positive scale), first stored row is the bottom row
    body = struct.pack(">4f", 3.0, 4.0, 1.0, 2.0)
    (tmp_path / "h.pfm").write_bytes(b"Pf\n2 2\n1.0\n" + body)
    np.testing.assert_array_equal(formats.read_pfm(tmp_path / "h.pfm"), [[1, 2], [3, 4]])
    (tmp_path / "l.pfm").write_bytes(b"Pf\n2 2\n-1.0\n" + struct.pack("<4f", 3.0, 4.0, 1.0, 2.0))
    np.testing.assert_array_equal(formats.read_pfm(tmp_path / "l.pfm"), [[1, 2], [3, 4]])


def test_pfm_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.pfm"
    p.write_bytes(b"Pf\n4 4\n-1.0\n" + b"\0" * 20)
    with pytest.raises(ValueError, match=r"bad\.pfm: truncated PFM"):
        formats.read_pfm(p)
    p.write_bytes(b"P6\n4 4\n255\n")
    with pytest.raises(ValueError, match=r"bad\.pfm: not a PFM"):
        formats.read_pfm(p)
    with pytest.raises(FileNotFoundError, match="nope.pfm"):
        formats.read_pfm(tmp_path / "nope.pfm")


# ------------------------------------------------------------------------------------------------- pair.txt
def test_pair_round_trip_and_errors(tmp_path):
    pairs = {0: [(1, 0.9), (2, 0.5)], 1: [(0, 0.9)], 2: []}
    formats.write_pair(tmp_path / "pair.txt", pairs)
    assert (tmp_path / "pair.txt").read_text().split()[:8] == ["3", "0", "2", "1", "0.9", "2", "0.5", "1"]
    assert formats.read_pair(tmp_path / "pair.txt") == pairs
    (tmp_path / "bad.txt").write_text("2\n0\n3 1 0.5\n")
    with pytest.raises(ValueError, match=r"bad\.txt: malformed pair\.txt"):
        formats.read_pair(tmp_path / "bad.txt")
