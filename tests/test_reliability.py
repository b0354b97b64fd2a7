"""docs/reliability.md is kept true: every row of its table of bad inputs is run here through `lite3r`'s own entry
point (lite3r_cli.app.main, in this process: CPU, tiny models, no model is trained) and must exit non-zero with
exactly one line on stderr, `error: MESSAGE`, the documented message (`...` in it stands for any text), and no
traceback. The table's placeholders ({tmp}, {img}, {ro}, ...) are the files `_fixtures` makes for each row in a fresh
folder. A read-only folder is read-only for root too (its writes get EACCES), and {full} is a folder on a "full
disk" (fsync of its files gets ENOSPC). Run this file as a script to print every row's actual message.

Below the table: the behaviours of issue 21 that are not one error line (a scene skipped with a warning, stale
temporary files of a killed run removed, long steps announced, wide non-terminal output, random weights said).
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shlex
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`lite3r ([^`]+)`\s*\|([^|]*)\|\s*`(.+)`\s*\|\s*$")


def table_rows() -> list[tuple[int, str, str, str]]:
    """(number, command line after `lite3r`, what is wrong, message) of each row of the doc's table."""
    rows = [(int(m[1]), m[2].strip(), m[3].strip(), m[4].strip())
            for m in map(ROW.match, DOC.read_text().splitlines()) if m]
    assert rows and [r[0] for r in rows] == list(range(1, len(rows) + 1)), "rows must be numbered 1, 2, 3, ..."
    return rows


# ---------------------------------------------------------------------------------------------- fixtures
def _png(path: Path, size=(28, 28)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def _student_like(path: Path, header: str) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, str(path), metadata={"lite3r_train": header})
    return path


def _fixtures(tmp: Path, text: str) -> dict[str, str]:
    """The placeholders `text` uses, made in `tmp`."""
    import torch

    made: dict[str, Path] = {"tmp": tmp}
    need = set(re.findall(r"\{(\w+)\}", text))
    if "img" in need:
        made["img"] = _png(tmp / "img.png")
    if "wide" in need:
        made["wide"] = _png(tmp / "wide.png", (2000, 1))
    if "text" in need:
        made["text"] = tmp / "notes.png"
        made["text"].write_text("not an image\n")
    if "file" in need:
        made["file"] = tmp / "afile"
        made["file"].write_text("a file, not a folder\n")
    if "ro" in need:
        made["ro"] = tmp / "ro"
        made["ro"].mkdir()
        made["ro"].chmod(0o555)
    if "full" in need:
        made["full"] = tmp / "full"
        made["full"].mkdir()
    if "empty" in need:
        made["empty"] = tmp / "empty"
        made["empty"].mkdir()
    if "bad" in need:  # random bytes under a .safetensors name
        made["bad"] = tmp / "bad.safetensors"
        made["bad"].write_bytes(bytes(range(256)) * 3)
    if "trunc" in need:  # a student file cut in half
        full = _student_like(tmp / "whole.safetensors", "{}").read_bytes()
        made["trunc"] = tmp / "trunc.safetensors"
        made["trunc"].write_bytes(full[: len(full) // 2])
    if "badjson" in need:
        made["badjson"] = _student_like(tmp / "badjson.safetensors", "{not json")
    if "run" in need:  # a run folder with no student in it
        made["run"] = tmp / "run"
        made["run"].mkdir()
        (made["run"] / "config.json").write_text("{}\n")
    if "damaged" in need:  # a run folder whose latest checkpoint record is broken (killed in a bad moment, edited)
        made["damaged"] = tmp / "damaged"
        (made["damaged"] / "checkpoints").mkdir(parents=True)
        (made["damaged"] / "config.json").write_text("{}\n")
        (made["damaged"] / "checkpoints" / "latest.json").write_text("{bad")
    if "pickle" in need:  # a pickle that would run code: weights_only refuses it
        made["pickle"] = tmp / "evil.pt"
        torch.save({"w": torch.zeros(2), "x": _Evil()}, made["pickle"])
    if "nan" in need:
        from lite3r_backbones import shipped_weights
        from safetensors.torch import load_file, save_file

        sd = load_file(str(shipped_weights("vggt-tiny")))
        key = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
        sd[key] = sd[key].clone().float().fill_(float("nan")).to(sd[key].dtype)
        made["nan"] = tmp / "nan.safetensors"
        save_file(sd, str(made["nan"]))
    if "tiny" in need:
        from lite3r_backbones import shipped_weights

        made["tiny"] = shipped_weights("vggt-tiny")
    if "scenes" in need:  # 2 scenes x 2 views, 28 px
        from lite3r_recon.synthetic import make_scenes

        make_scenes(tmp / "scenes", num=2, views=2, size=28, quiet=True, workers=1)
        made["scenes"] = tmp / "scenes"
    return {k: str(v) for k, v in made.items()}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@contextlib.contextmanager
def _simulated_filesystem(ro: str | None, full: str | None):
    """Root may write into a read-only folder: its writes get EACCES here as anybody else's would; the files of
    {full} get ENOSPC when flushed to disk (fsync), as on a full disk."""
    real_mkstemp, real_mkdtemp, real_fsync = tempfile.mkstemp, tempfile.mkdtemp, os.fsync

    def refused(dir) -> bool:
        return ro is not None and os.geteuid() == 0 and dir is not None and \
            os.path.abspath(dir).startswith(os.path.abspath(ro))

    def mkstemp(*args, dir=None, **kwargs):
        if refused(dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def mkdtemp(*args, dir=None, **kwargs):
        if refused(dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmp"))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    def fsync(fd):
        if full is not None and os.readlink(f"/proc/self/fd/{fd}").startswith(os.path.abspath(full)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    tempfile.mkstemp, tempfile.mkdtemp, os.fsync = mkstemp, mkdtemp, fsync
    try:
        yield
    finally:
        tempfile.mkstemp, tempfile.mkdtemp, os.fsync = real_mkstemp, real_mkdtemp, real_fsync


def run_lite3r(args: list[str], *, ro: str | None = None, full: str | None = None) -> tuple[int, str, str]:
    """`lite3r ARGS` through its console entry point in this process: (exit code, stdout, stderr). lite3r's warnings
    print as `warning:` lines on stderr (the entry point's), others are recorded."""
    from lite3r_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv, sys.stdout, sys.stderr
    sys.argv, sys.stdout, sys.stderr = ["lite3r", *args], out, err
    env = {k: os.environ.get(k) for k in ("COLUMNS", "LITE3R_DEBUG", "NO_COLOR")}
    os.environ.update(COLUMNS="250", NO_COLOR="1")
    os.environ.pop("LITE3R_DEBUG", None)
    try:
        with warnings.catch_warnings(record=True), _simulated_filesystem(ro, full):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a bug: keep its traceback for the assertion message
        traceback.print_exc(file=err)
        code = 1
    finally:
        sys.argv, sys.stdout, sys.stderr = old
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return code, out.getvalue(), err.getvalue()


def run_row(command: str, tmp: Path) -> tuple[int, str, str, dict[str, str]]:
    paths = _fixtures(tmp, command)
    args = [a.format(**paths) for a in shlex.split(command)]
    try:
        return (*run_lite3r(args, ro=paths.get("ro"), full=paths.get("full")), paths)
    finally:
        if "ro" in paths:
            os.chmod(paths["ro"], 0o755)  # so that pytest can remove it


def _needs_no_cuda(what: str) -> bool:
    return "without CUDA" in what


# ---------------------------------------------------------------------------------------------- the table
ROWS = table_rows()


@pytest.mark.parametrize("number, command, what, message", ROWS, ids=[f"row{r[0]}" for r in ROWS])
def test_documented_bad_input_gives_its_one_line(number, command, what, message, tmp_path):
    if _needs_no_cuda(what):
        import torch

        if torch.cuda.is_available():
            pytest.skip("the row is about a machine without CUDA")
    code, out, err, paths = run_row(command, tmp_path)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code != 0, f"row {number}: `lite3r {command}` succeeded\n{out}{err}"
    assert "Traceback" not in err + out, f"row {number}: a traceback\n{err}"
    assert len(lines) == 1, f"row {number}: expected one line on stderr, got\n{err}"
    expected = message.format(**paths)
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    assert re.fullmatch("error: " + pattern, lines[0]), f"row {number}: docs/reliability.md says\n  error: " \
                                                        f"{expected}\nlite3r printed\n  {lines[0]}"


def test_table_covers_every_item_of_issue_21():
    """The table keeps the bad inputs the issue names (its writes, corrupt files, make-scenes, --device ...)."""
    text = " ".join(f"{r[1]} {r[2]}" for r in ROWS)
    for needle in ("{ro}", "{file}/", "{full}", "{bad}", "{trunc}", "--student {run}", "make-scenes {scenes}",
                   "--device cuda", "{wide}", "--weights {tiny}", "--resume", "export", "bench", "reconstruct",
                   "eval", "train", "pretrain", "study"):
        assert needle in text, f"docs/reliability.md has no row with {needle}"
    assert len(ROWS) >= 42


# ---------------------------------------------------------------------------------------------- behaviours
def test_make_scenes_overwrite_renders_what_was_asked(tmp_path):
    """make-scenes into a folder of other --views/--size: refused in one line without --overwrite (scenes.json not
    touched); with it every scene is re-rendered as asked, stale views removed, scenes.json true to the disk."""
    import json

    from lite3r_recon.synthetic import make_scenes, rendered_as

    out = tmp_path / "scenes"
    make_scenes(out, num=2, views=3, size=28, quiet=True, workers=1)
    before = (out / "scenes.json").read_text()
    code, _, err = run_lite3r(["make-scenes", str(out), "--num", "3", "--views", "2", "--size", "42", "--quiet"])
    assert code == 2 and "--views 3 --size 28" in err and (out / "scenes.json").read_text() == before
    assert not (out / "scene_0002").exists()
    code, _, err = run_lite3r(["make-scenes", str(out), "--num", "2", "--views", "2", "--size", "42", "--overwrite",
                               "--quiet"])
    assert code == 0, err
    info = json.loads((out / "scenes.json").read_text())
    assert (info["views"], info["size"]) == (2, [42, 42])
    for k in range(2):
        assert rendered_as(out / f"scene_{k:04d}") == (2, (42, 42))
        assert len(list((out / f"scene_{k:04d}" / "rendered_depth_maps").glob("*.pfm"))) == 2


def test_an_unreadable_view_skips_its_scene(tmp_path):
    """eval over a folder where one scene has an unreadable image: that scene is skipped with a warning naming it,
    the others are evaluated; the run stops (one line) only once more than half are unusable."""
    import json

    from lite3r_recon.synthetic import make_scenes

    data = tmp_path / "scenes"
    make_scenes(data, num=3, views=2, size=28, quiet=True, workers=1)
    (data / "scene_0001" / "blended_images" / "00000000.jpg").write_text("broken")
    args = ["eval", "vggt-tiny", "--dataset", "blendedmvs", "--data", str(data), "--views", "2", "--size", "28",
            "--quiet", "--json", str(tmp_path / "e.json")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from lite3r_cli.app import app

        from typer.testing import CliRunner

        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert any("scene_0001" in str(w.message) for w in seen)
    got = json.loads((tmp_path / "e.json").read_text())
    assert [r["scene"] for r in got["scenes"]] == ["scene_0000", "scene_0002"]
    assert got["config"]["skipped"] == ["scene_0001"]
    (data / "scene_0002" / "blended_images" / "00000001.jpg").write_text("broken")
    code, _, err = run_lite3r(args[:-1] + [str(tmp_path / "e2.json")])
    errors = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert code == 2 and "2 of 3 scenes cannot give 2 usable views" in err and len(errors) == 1
    # the skipped scenes' warnings: one line each, not Python's file:line report
    assert any(line.startswith("warning: skipping scene scene_0001") for line in err.splitlines())
    assert "UserWarning" not in err


def test_training_data_skips_a_broken_scene(tmp_path):
    """lite3r train's scene source draws another scene for one that cannot give its views, and draws the same
    samples whatever it skipped before (a resumed run sees what the first one saw)."""
    import torch

    from lite3r_recon.runs import SceneSource
    from lite3r_recon.synthetic import make_scenes
    from lite3r_recon.train_config import TrainConfig

    data = tmp_path / "scenes"
    make_scenes(data, num=3, views=2, size=28, quiet=True, workers=1)
    (data / "scene_0002" / "blended_images" / "00000000.jpg").write_text("broken")  # seed 0 draws scene 2 first
    cfg = TrainConfig(dataset="blendedmvs", data=str(data), views=2, res=(28, 28))
    first, resumed = SceneSource(cfg), SceneSource(cfg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        samples = [first._sample(seed) for seed in range(6)]
        again = [resumed._sample(seed) for seed in (3, 4, 5)]
    assert first.bad == {2} and any("scene_0002" in str(w.message) for w in seen)
    assert all(s["images"].shape == (2, 3, 28, 28) for s in samples)
    for a, b in zip(samples[3:], again):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["extrinsics"], b["extrinsics"])


def test_killed_writes_leave_no_temporaries_on_start(tmp_path):
    """Temporary files a killed run left (atomic_path's .NAME.tmp.*) are removed when a run starts in --out."""
    from lite3r_recon.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.ckpt.mkdir(parents=True)
    stale = [run.ckpt / ".step-000010.safetensors.tmp.abc123.safetensors", run.out / ".config.json.tmp.x9.json"]
    for f in stale:
        f.write_bytes(b"half")
    keep = run.out / "notes.txt"
    keep.write_text("mine")
    run.prepare(resume=False, overwrite=False)
    assert not any(f.exists() for f in stale) and keep.exists()


def test_every_write_error_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """An OSError in the middle of an atomic write (a disk that fills up) is CannotWrite naming the file; nothing is
    left under the final name or beside it."""
    from lite3r_recon import io as rio
    from lite3r_recon.errors import CannotWrite

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CannotWrite, match=r"out\.json: cannot write \(No space left on device\)"):
        rio.atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CannotWrite, match="afile is a file, not a folder"):
        (tmp_path / "afile").write_text("x")
        rio.check_writable(tmp_path / "afile" / "sub" / "x.json")


def test_long_steps_are_announced(capsys):
    """A forward estimated over LONG_S on the CPU gets a 'takes ~N min' line on stderr before it starts (bench at
    2000 views on the tiny model), a short one none; the estimate grows with the views as attention does."""
    from lite3r_recon import models, timing

    model = models.dense_model("vggt-tiny")
    small, large = (timing.cpu_estimate(model, v, (140, 140)) for v in (4, 2000))
    assert 0 < small < timing.LONG_S < large and large / small > 2000
    with timing.long_step("a forward of 2000 views", large):
        pass
    err = capsys.readouterr().err
    assert err.startswith("a forward of 2000 views: about ") and "on this CPU" in err
    with timing.long_step("a forward of 4 views", small):
        pass
    assert capsys.readouterr().err == ""


def test_cpu_compile_warns_before_it_runs():
    import torch

    import lite3r

    with pytest.warns(UserWarning, match="torch.compile on the CPU: the first forward compiles"):
        lite3r.deploy(torch.nn.Sequential(torch.nn.Linear(16, 16)))


def test_non_terminal_output_is_not_cut_at_80_columns(monkeypatch):
    from lite3r_recon.io import NON_TERMINAL_WIDTH, console

    monkeypatch.delenv("COLUMNS", raising=False)
    con = console()
    assert not con.is_terminal and con.width == NON_TERMINAL_WIDTH
    with con.capture() as cap:
        con.print("x" * 150)
    assert cap.get().strip() == "x" * 150


def test_random_weights_are_said_in_the_output():
    code, out, err = run_lite3r(["eval", "vggt-small", "--max-scenes", "1", "--views", "2", "--size", "56"])
    assert code == 0, err
    assert "vggt-small runs on random weights" in out
    code, out, err = run_lite3r(["eval", "vggt-tiny", "--max-scenes", "1", "--views", "2", "--size", "56"])
    assert code == 0, err
    assert "random weights" not in out


if __name__ == "__main__":  # print every row's actual message, for updating the doc
    for number, command, what, message in ROWS:
        with tempfile.TemporaryDirectory() as d:
            code, out, err, paths = run_row(command, Path(d))
        line = next((x for x in err.splitlines() if x.strip() and not x.startswith("warning: ")), "")
        for key, value in sorted(paths.items(), key=lambda kv: -len(kv[1])):
            line = line.replace(value, "{" + key + "}")
        print(f"{number:3d} rc={code} {'OK ' if line == 'error: ' + message else 'NEW'} {line}")
