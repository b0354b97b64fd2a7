"""Video input: a clip written with the same library is sampled at --fps (at most --max-views frames); bad files and
arguments give one-line errors."""
import numpy as np
import pytest

pytest.importorskip("av")

from lite3r_recon.errors import InvalidInput, MissingInput  # noqa: E402
from lite3r_recon.video import extract_frames, keep_evenly, sample_frames, write_video  # noqa: E402


def _clip(T: int = 20, H: int = 64, W: int = 96) -> np.ndarray:
    """A bright square moving right by 4 px per frame over a dark gradient: frame i has its square at x = 4 i."""
    frames = np.zeros((T, H, W, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 80, W, dtype=np.uint8)[None, None]
    for i in range(T):
        frames[i, 20:40, 4 * i:4 * i + 16] = 230
    return frames


def _square_x(frame: np.ndarray) -> int:
    return int(np.flatnonzero(frame[30, :, 0] > 150)[0])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, _clip(), fps=10)
    return path


def test_sampled_at_the_rate(clip):
    frames = sample_frames(clip, fps=2)  # 2 s at 10 fps: t = 0, 0.5, 1.0, 1.5 -> frames 0, 5, 10, 15
    assert len(frames) == 4 and frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
    assert [_square_x(f) for f in frames] == [0, 20, 40, 60]
    assert len(sample_frames(clip, fps=100)) == 20  # faster than the video: every frame once
    picked = sample_frames(clip, fps=10, max_views=3)
    assert [_square_x(f) for f in picked] == [0, 40, 76]  # first, middle, last


def test_extract_frames(clip, tmp_path):
    files = extract_frames(clip, tmp_path / "frames", fps=5, max_views=4)
    assert [f.name for f in files] == [f"clip_{i:06d}.png" for i in range(4)]
    from PIL import Image

    assert Image.open(files[0]).size == (96, 64)
    with pytest.raises(FileExistsError, match="--overwrite"):
        extract_frames(clip, tmp_path / "frames", fps=5, max_views=4)


def test_keep_evenly():
    assert keep_evenly(10, None) == list(range(10)) and keep_evenly(3, 5) == [0, 1, 2]
    assert keep_evenly(10, 4) == [0, 3, 6, 9] and keep_evenly(10, 1) == [0]


def test_bad_videos(tmp_path, clip):
    with pytest.raises(MissingInput, match="no such video file"):
        sample_frames(tmp_path / "none.mp4", fps=1)
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video\n")
    with pytest.raises(InvalidInput, match=r"junk.mp4: cannot read video") as e:
        sample_frames(junk, fps=1)
    assert "\n" not in str(e.value)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[:200])
    with pytest.raises(InvalidInput, match="cut.mp4"):
        sample_frames(cut, fps=1)
    with pytest.raises(InvalidInput, match="--fps 0"):
        sample_frames(clip, fps=0)
    with pytest.raises(InvalidInput, match="--max-views 0"):
        sample_frames(clip, fps=1, max_views=0)


def _lite3r(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lite3r_cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, LITE3R_BACKEND="torch"), timeout=300)


def test_cli_reconstructs_a_video(tmp_path):
    """A clip of a synthetic scene's orbit, written with this library, goes through `lite3r reconstruct` like a
    folder: frames sampled at --fps, at most --max-views, saved beside the cloud; bad videos are one-line errors."""
    import json

    from lite3r_recon.synthetic import render_sample

    views = render_sample(4, views=6, size=(64, 96))["images"]
    frames = (views.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    clip = write_video(tmp_path / "orbit.mp4", frames, fps=2)
    r = _lite3r("reconstruct", clip, "--fps", 2, "--max-views", 4, "--model", "vggt-tiny", "--size", 70,
                "--device", "cpu", "--out", tmp_path / "v.ply", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "v.json").read_text())
    frames = sorted((tmp_path / "v_frames").iterdir())
    assert meta["views"] == 4 == len(frames) and meta["videos"] == {str(clip): 4}
    assert [c["image"] for c in meta["cameras"]] == [str(f) for f in frames]
    assert meta["image_hw"] == [42, 70] and meta["points_kept"] > 0 and (tmp_path / "v.png").is_file()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 64)
    bad = _lite3r("reconstruct", junk, "--model", "vggt-tiny", "--size", 70, "--device", "cpu",
                  "--out", tmp_path / "j.ply")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "junk.mp4: cannot read video" in bad.stderr and not (tmp_path / "j.ply").exists()


def test_upright_turns_counterclockwise():
    from lite3r_recon.video import upright

    f = np.zeros((2, 3, 3), np.uint8)
    f[0, 2] = 255  # top right
    assert upright(f, 0) is f
    assert upright(f, 90).shape == (3, 2, 3) and upright(f, 90)[0, 0, 0] == 255  # top right -> top left
    assert upright(f, -90)[2, 1, 0] == 255  # top right -> bottom right
    assert upright(f, 180)[1, 0, 0] == 255
