"""The `lite3r` command line through `python -m lite3r_cli` (so `lite3r_cli.main`, the error handler, runs): every command's
--help works and names each of its options with a help text; a wrong option or value gives one error line and
exit code 2, never a traceback."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import typer.main

import lite3r_cli.app

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMAND = typer.main.get_command(lite3r_cli.app.app)
SUBCOMMANDS = sorted(COMMAND.commands)


def lite3r(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("LITE3R_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lite3r_cli", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _options(command) -> list:
    """The visible options of a (click-style) command; typer may vendor click, so no isinstance checks."""
    return [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]


def test_subcommands_are_registered():
    assert {"train", "bench", "export", "reconstruct"} <= set(SUBCOMMANDS)


def test_root_help_lists_every_command():
    r = lite3r("--help")
    assert r.returncode == 0, r.stderr
    for name in SUBCOMMANDS:
        assert name in r.stdout
    assert all((COMMAND.commands[n].help or "").strip() for n in SUBCOMMANDS), "every command needs a docstring"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_option_is_documented_in_help(name):
    command = COMMAND.commands[name]
    r = lite3r(name, "--help")
    assert r.returncode == 0, r.stderr
    assert f"{name} [OPTIONS]" in r.stdout
    for opt in _options(command):
        if opt.name == "help":
            continue
        assert (opt.help or "").strip(), f"{name}: option {opt.opts[0]} has no help text"
        for flag in opt.opts + opt.secondary_opts:
            assert flag in r.stdout, f"{name} --help does not mention {flag}"
        words = opt.help.split()[:2]  # the start of its help text is shown (wrapping can only split later words)
        assert words[0] in r.stdout
    for arg in (p for p in command.params if p.param_type_name == "argument"):
        assert arg.name.lower() in r.stdout.lower()


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_unknown_option_is_a_usage_error(name):
    r = lite3r(name, "--definitely-not-an-option")
    assert r.returncode == 2
    assert "No such option: --definitely-not-an-option" in r.stderr
    assert len(_error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr + r.stdout


def test_badly_typed_value_is_a_usage_error(tmp_path):
    r = lite3r("reconstruct", tmp_path, "--size", "abc")
    assert r.returncode == 2 and "Invalid value for '--size'" in r.stderr
    assert len(_error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (28, 28), (10, 20, 30)).save(path)
    return path


@pytest.mark.parametrize("case", ["model", "missing", "empty", "percentile", "train-topk", "bench-views"])
def test_wrong_value_gives_one_error_line(tmp_path, image, case):
    (tmp_path / "empty").mkdir()
    args, expect = {
        "model": (["reconstruct", image, "--model", "vggt-2b", "--out", tmp_path / "o.ply"], "--model 'vggt-2b'"),
        "missing": (["reconstruct", tmp_path / "nope.png", "--model", "vggt-tiny", "--out", tmp_path / "o.ply"],
                    "nope.png"),
        "empty": (["reconstruct", tmp_path / "empty", "--model", "vggt-tiny", "--out", tmp_path / "o.ply"], "no images"),
        "percentile": (["reconstruct", image, "--conf-percentile", "100", "--out", tmp_path / "o.ply"],
                       "--conf-percentile"),
        "train-topk": (["train", "--topk", "5", "--out", tmp_path / "run"], "--topk"),
        "bench-views": (["bench", "--views", "abc"], "--views"),
    }[case]
    r = lite3r(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert not (tmp_path / "o.ply").exists()


def test_existing_output_is_refused(tmp_path, image):
    (tmp_path / "o.ply").write_text("keep me")
    r = lite3r("reconstruct", image, "--model", "vggt-tiny", "--out", tmp_path / "o.ply")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'o.ply'} exists; pass --overwrite to replace it"
    assert (tmp_path / "o.ply").read_text() == "keep me"


def test_only_the_projects_errors_become_one_line():
    """A user error (lite3r_recon.errors / lite3r.Lite3rError) is one line and exit 2; a bug (TypeError, KeyError)
    keeps its traceback, so it can be found."""
    code = ("import sys, lite3r_cli.app as A\n"
            "def boom():\n"
            "    raise {exc}\n"
            "A.app = boom\nA.main()\n")
    env = dict(os.environ)
    env.pop("LITE3R_DEBUG", None)
    cases = [("__import__('lite3r_recon.errors').errors.InvalidInput('--views 0: expected >= 1')", 2, False),
             ("__import__('lite3r').Lite3rError('topk must be in (0, 1]')", 2, False),
             ("TypeError('a bug')", 1, True), ("KeyError('also a bug')", 1, True)]
    for exc, rc, traceback in cases:
        proc = subprocess.run([sys.executable, "-c", code.format(exc=exc)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == rc, (exc, proc.stderr)
        assert ("Traceback" in proc.stderr) == traceback, (exc, proc.stderr)
        if not traceback:
            assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    debug = subprocess.run([sys.executable, "-c", code.format(exc=cases[0][0])], capture_output=True, text=True,
                           env={**env, "LITE3R_DEBUG": "1"}, timeout=120)
    assert "Traceback" in debug.stderr
