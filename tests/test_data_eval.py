"""`lite3r eval`: runs a backbone over synthetic scenes (embedded default and make-scenes output) on CPU, prints the
metric tables and writes JSON without overwriting a user's file."""
import json
import os
import subprocess
import sys

import pytest

from lite3r_cli import evaluate
from lite3r_recon import synthetic


def test_eval_cli_embedded_synthetic(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-c", "from lite3r_cli.app import main; main()", "eval", "vggt-tiny", "--dataset", "synthetic",
           "--views", "2", "--max-scenes", "1", "--device", "cpu", "--json", str(out)]
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pose" in r.stdout and "abs_rel" in r.stdout and "chamfer" in r.stdout
    res = json.loads(out.read_text())
    assert res["config"]["views"] == 2 and len(res["scenes"]) == 1
    for k in ("auc30", "rra30", "abs_rel", "delta1", "rmse", "chamfer", "fscore"):
        assert k in res["mean"], k
    assert 0 <= res["mean"]["auc30"] <= 1 and 0 <= res["mean"]["delta1"] <= 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # no --overwrite
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr


def test_eval_on_written_scenes_and_student_errors(tmp_path):
    synthetic.make_scenes(tmp_path / "scenes", num=1, views=2, size=56, seed=3, quiet=True, workers=1)
    res = evaluate.evaluate("vggt-tiny", dataset="blendedmvs", data=tmp_path / "scenes", views=2, size=56,
                            quiet=True, device="cpu")
    assert res["scenes"][0]["scene"] == "scene_0000" and set(res["groups"]) >= {"depth", "pose", "points"}
    with pytest.raises(FileNotFoundError, match="no such student file"):
        evaluate.evaluate("vggt-tiny", student=tmp_path / "missing", views=2, quiet=True, device="cpu")
    with pytest.raises(FileNotFoundError, match="--data"):
        evaluate.evaluate("vggt-tiny", dataset="blendedmvs", data=tmp_path / "nope", quiet=True, device="cpu")
