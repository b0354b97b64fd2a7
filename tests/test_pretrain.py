"""lite3r pretrain: deterministic, resumable bit for bit after a kill, held-out scenes disjoint from training ones,
and its files (fp16 teacher that loads strictly, metrics, plots)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lite3r_backbones import build_backbone
from lite3r_cli.pretrain import PretrainConfig, Pretrainer, pretrain, train_seed
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


def test_resume_without_a_checkpoint_restarts_the_saved_config(tmp_path):
    """pretrain --resume shares train's meaning (lite3r_recon.runs.resume_config): no run is an error; a run killed
    before its first checkpoint restarts its saved config from step 0, never the defaults."""
    from lite3r_recon.errors import MissingInput

    with pytest.raises(MissingInput, match="--resume"):
        pretrain(PretrainConfig(**TINY), tmp_path / "none", resume=True, quiet=True, device="cpu")
    asked = PretrainConfig(**{**TINY, "steps": 2, "lr": 0.01, "ckpt_every": 5, "seed": 3})
    pretrain(asked, tmp_path / "cut", quiet=True, device="cpu", stop_after=1)
    assert not (tmp_path / "cut/checkpoints/latest.json").exists()
    resumed = pretrain(PretrainConfig(**TINY), tmp_path / "cut", resume=True, quiet=True, device="cpu",
                       explicit={"family"})
    assert resumed["config"] == asked.to_json() and len(resumed["history"]) == 2
    assert json.loads((tmp_path / "cut/config.json").read_text()) == asked.to_json()


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


def test_compass_sky_carries_the_heading_and_plain_does_not():
    """The compass sky is fixed to the world: views of one scene looking different ways see different sky colours
    (plain: the same image-space gradient in every view), and it is a pure function of the world direction."""
    from lite3r_recon.synthetic import compass_sky, render_sample, render_batch

    east, west = torch.tensor([[1.0, 0, 0.1]]), torch.tensor([[-1.0, 0, 0.1]])
    assert (compass_sky(east) - compass_sky(west)).abs().max() > 0.3
    assert torch.allclose(compass_sky(east), compass_sky(3 * east))  # direction only

    def sky_colours(sky):
        b = render_batch([2**31], 4, (42, 56), sky=sky)
        return [b["images"][0, i].permute(1, 2, 0)[~b["mask"][0, i]].mean(0) for i in range(4)]

    compass, plain = sky_colours("compass"), sky_colours("plain")
    assert max((c - compass[0]).abs().max() for c in compass[1:]) > 0.1
    assert max((c - plain[0]).abs().max() for c in plain[1:]) < 0.05
    assert torch.equal(render_sample(2**31, 4, (42, 56))["images"], render_batch([2**31], 4, (42, 56))["images"][0])


def test_fov_init_keeps_the_fov_outputs_alive():
    """--fov-init: every view's predicted fov starts near it (above the head's ReLU), not at a random sign."""
    from lite3r_cli.pretrain import random_model

    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        fov = random_model("vggt-tiny", 0, fov_init=1.0)(images)["pose_enc"][..., 7:9]
        plain = random_model("vggt-tiny", 0)(images)["pose_enc"][..., 7:9]
    assert fov.min() > 0.5 and fov.max() < 1.5, fov
    assert (plain < 0.5).all()  # the plain init starts near 0, where the ReLU can kill a unit
    with pytest.raises(ValueError, match="--fov-init"):
        PretrainConfig(fov_init=-1)
    with pytest.raises(ValueError, match="--sky"):
        PretrainConfig(sky="cloudy")


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


def test_init_starts_from_the_given_weights(tmp_path):
    """--init: the run starts from a teacher's weights (loaded strictly), not from a draw of --seed; a missing file
    or 'shipped' for a backbone without shipped weights is a one-line error."""
    first = tmp_path / "first"
    pretrain(PretrainConfig(**{**TINY, "steps": 2}), first, quiet=True, device="cpu")
    start = load_file(str(first / "teacher.safetensors"))
    cfg = PretrainConfig(**{**TINY, "steps": 1, "ckpt_every": 1, "seed": 5, "lr": 1e-12, "warmup": 0,
                            "weight_decay": 0.0, "init": str(first / "teacher.safetensors")})
    summary = pretrain(cfg, tmp_path / "cont", quiet=True, device="cpu")
    after = load_file(str(tmp_path / "cont" / "teacher.safetensors"))  # one step at lr ~0: the start, fp16-rounded
    assert after.keys() == start.keys() and all(torch.equal(after[k], start[k]) for k in start)
    assert "--init" in summary["command"] and set(summary["metrics"]) == {"init", "trained"}
    with pytest.raises(ValueError, match="--init .*no such file"):
        PretrainConfig(**{**TINY, "init": str(tmp_path / "nope.safetensors")})
    # 'shipped' with the tracking loss on (enable_track, the shipped config's own value): the shipped weights, not a
    # random init (session 12's GPU run started from random weights that way)
    shipped = build_backbone("vggt-tiny").state_dict()
    for w_track in (0.0, 0.2):
        got = Pretrainer(PretrainConfig(**{**TINY, "init": "shipped", "w_track": w_track}),
                         torch.device("cpu")).model.state_dict()
        assert got.keys() == shipped.keys() and all(torch.equal(got[k], shipped[k]) for k in shipped)
    with pytest.raises(ValueError, match="no shipped weights"):
        pretrain(PretrainConfig(**{**TINY, "size": "small", "init": "shipped"}), tmp_path / "s", quiet=True,
                 device="cpu")
