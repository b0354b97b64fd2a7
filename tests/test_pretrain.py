"""lite3r pretrain: deterministic, resumable bit for bit after a kill, held-out scenes disjoint from training ones,
and its files (fp16 teacher that loads strictly, metrics, plots)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lite3r_backbones import build_backbone
from lite3r_cli.pretrain import PretrainConfig, pretrain, train_seed
from lite3r_recon.scoring import HELDOUT, heldout_seeds

TINY = dict(steps=4, batch=1, views=2, res=(28, 42), warmup=1, ckpt_every=2, eval_every=2, eval_scenes=0)


def _weights(out):
    return load_file(str(out / "checkpoints" / "step-000004.safetensors"))


@pytest.mark.parametrize("family", ["vggt", "da3"])
def test_resume_after_kill_is_bit_identical(tmp_path, family):
    cfg = PretrainConfig(family=family, **TINY)
    full = pretrain(cfg, tmp_path / "full", quiet=True, device="cpu")
    stopped = pretrain(cfg, tmp_path / "cut", quiet=True, device="cpu", stop_after=3)  # "killed" after step 3
    assert stopped["stopped_at"] == 3
    # a kill after step 3 leaves the step-2 checkpoint: resuming replays step 3 and runs step 4
    resumed = pretrain(cfg, tmp_path / "cut", resume=True, quiet=True, device="cpu")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("param.", "optim.")))
    assert full["history"][-1]["loss"] != full["history"][0]["loss"]  # it trained


def test_files_and_fp16_teacher_loads_strictly(tmp_path):
    cfg = PretrainConfig(**{**TINY, "eval_scenes": 1, "steps": 2})
    out = tmp_path / "run"
    summary = pretrain(cfg, out, quiet=True, device="cpu")
    for f in ("teacher.safetensors", "teacher.json", "metrics.json", "loss.png", "heldout.png", "config.json"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    sd = load_file(str(out / "teacher.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float16}
    model = build_backbone("vggt-tiny", weights=out / "teacher.safetensors")  # strict
    assert all(torch.equal(p.detach().half(), sd[n]) for n, p in model.state_dict().items())
    info = json.loads((out / "teacher.json").read_text())
    assert info["command"].startswith("lite3r pretrain vggt --size tiny --steps 2")
    assert set(info["metrics"]) == {"random_init", "trained"} and "abs_rel" in info["metrics"]["trained"]
    assert summary["evals"][0]["step"] == 0 and summary["evals"][-1]["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(cfg, out, quiet=True, device="cpu")
    with pytest.raises(ValueError, match="other settings"):
        pretrain(PretrainConfig(**{**TINY, "lr": 0.5}), out, resume=True, quiet=True, device="cpu")


def test_heldout_scenes_are_not_training_scenes():
    train = {train_seed(s, t, i) for s in (0, 1) for t in range(50) for i in range(8)}
    assert max(train) < HELDOUT <= min(heldout_seeds(16))
    assert len(train) == 800  # a new scene for every sample


def test_config_errors():
    with pytest.raises(ValueError, match="vggt or da3"):
        PretrainConfig(family="dust3r")
    with pytest.raises(ValueError, match="--size"):
        PretrainConfig(size="huge")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        PretrainConfig(res=(30, 42))
    assert PretrainConfig(size="small").res == (252, 252)
    with pytest.raises(ValueError, match="--arc"):
        PretrainConfig(arc=(50, 20))


def test_arc_narrows_the_camera_baselines():
    import numpy as np

    from lite3r_recon.synthetic import ARC, make_scene

    def span(arc):  # mean azimuth span (degrees) between the first and the last camera of 20 scenes
        out = []
        for seed in range(20):
            E = make_scene(seed, 4, 28, arc=arc).extrinsics
            c = np.stack([-(e[:, :3].T @ e[:, 3]) for e in E])  # camera centres
            a = np.degrees(np.arctan2(c[:, 1], c[:, 0]))
            out.append(abs((a[-1] - a[0] + 180) % 360 - 180))
        return float(np.mean(out))

    narrow, wide = span((10.0, 20.0)), span(ARC)
    assert 5 < narrow < 20 and wide > 60, (narrow, wide)  # 3/4 of the span lies between the first and last view
    np.testing.assert_array_equal(make_scene(3, 4, 28).extrinsics, make_scene(3, 4, 28, arc=ARC).extrinsics)


def _cli(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("LITE3R_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lite3r_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_runs_and_refuses_bad_options(tmp_path):
    r = _cli("pretrain", "da3", "--steps", "1", "--batch", "1", "--views", "2", "--res", "28,42", "--eval-scenes", "0",
             "--out", tmp_path / "run", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert info["backbone"] == "da3-tiny" and info["config"]["res"] == [28, 42] and info["config"]["steps"] == 1
    r = _cli("pretrain", "vggt", "--res", "30", "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --res must be H,W or one size, positive multiples of the patch size 14; got (30, 30)"]
