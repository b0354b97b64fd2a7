"""`lite3r train` on CPU: what trains, what stays frozen, resume, DDP (gloo) and the command line.

Small runs (vggt-tiny, 2 views of 56x70) keep this file to a minute or two; the PyTorch SLA reference is used
(LITE3R_BACKEND=torch) so the Triton interpreter does not dominate.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lite3r_recon import qat as T
from lite3r_recon import models

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(res=(56, 70), views=2, batch=2, steps=4, ckpt_every=2, eval_scenes=1, warmup=1, scenes=3)


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "LITE3R_BACKEND": "torch", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("LITE3R_DEBUG", None)
    return env


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from lite3r_cli.app import main; main()", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_only_proj_l_trains_and_frozen_weights_stay_bit_identical():
    cfg = T.TrainConfig(**{**SMALL, "eval_scenes": 0})
    qat = T.QAT(cfg, T.Dist())
    teacher_before = {k: v.clone() for k, v in qat.teacher.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in qat.student.state_dict().items() if ".proj_l." not in k}
    proj_before = {k: v.detach().clone() for k, v in qat.params.items()}
    assert proj_before and all(".proj_l." in f".{k}" for k in proj_before)
    assert qat.n_trainable == sum(v.numel() for v in proj_before.values()) < qat.n_total
    for step in range(2):
        qat.step(step)
    with_grad = [n for n, p in qat.student.named_parameters() if p.grad is not None]
    assert sorted(with_grad) == sorted(proj_before)  # every proj_l, and nothing else, got a gradient
    assert all(qat.params[n].grad.abs().sum() > 0 for n in proj_before)
    assert all(not torch.equal(qat.params[n].detach(), v) for n, v in proj_before.items())  # proj_l moved
    after = qat.student.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), f"frozen student tensor {k} changed"
    for k, v in qat.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher tensor {k} changed"
    # the student's frozen weights are the teacher's, under the same names
    t = qat.teacher.state_dict()
    for k, v in frozen_before.items():
        if k in t:
            assert torch.equal(v, t[k].to(v.dtype)), k


def test_trainable_attention_trains_the_sla_layers_and_reloads(tmp_path):
    """--trainable attention: the SLA layers' inherited weights train too (at --lr-inherited, proj_l at --lr), every
    other weight stays the teacher's, and the saved student reloads to the same model."""
    import lite3r

    cfg = T.TrainConfig(**{**SMALL, "eval_scenes": 0, "steps": 2, "trainable": "attention", "lr_inherited": 1e-3})
    summary = T.train(cfg, tmp_path / "r", quiet=True, device="cpu")
    qat_sla = {n for n, m in T.build_student(T.build_teacher(cfg, torch.device("cpu")), cfg).named_modules()
               if isinstance(m, lite3r.SLAAttention)}
    saved = load_file(str(tmp_path / "r" / "student.safetensors"))
    inherited = [k for k in saved if ".proj_l." not in f".{k}"]
    assert inherited and all(any(k.startswith(f"{m}.") for m in qat_sla) for k in saved)  # only the SLA layers'
    assert summary["trainable_params"] == sum(v.numel() for v in saved.values())
    teacher = models.dense_model(cfg.backbone, None, seed=cfg.seed).state_dict()
    moved = [k for k in inherited if not torch.equal(saved[k], teacher[k].float())]
    assert len(moved) >= len(inherited) // 2  # the inherited weights were trained (not only carried)
    student = models.load_student(tmp_path / "r")
    got = student.state_dict()
    for k, v in saved.items():
        assert torch.equal(got[k], v), k
    for k, v in teacher.items():  # everything outside the SLA layers is the teacher's
        if k not in saved and k in got:
            assert torch.equal(got[k].float(), v.float()), k
    groups = T.QAT(cfg, T.Dist()).opt.param_groups  # proj_l at --lr, the inherited weights at --lr-inherited
    assert [g["lr_scale"] for g in groups] == [1.0, pytest.approx(1e-3 / cfg.lr)]


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        qat = T.QAT(T.TrainConfig(**{**SMALL, "eval_scenes": 0, "grad_ckpt": ckpt}), T.Dist())
        assert (qat.ckpt_blocks > 0) == ckpt
        loss, *_ = qat.losses(qat.local_batch(0))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in qat.params.items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_default_job_distillation_loss_falls(tmp_path):
    """The embedded default (vggt-tiny, random teacher, its pool of synthetic scenes), a few dozen steps: the
    attention distillation loss on held-out scenes falls; metrics.json (teacher and student metrics), loss.png and
    the student exist."""
    s = T.train(T.TrainConfig(steps=30, eval_scenes=2), tmp_path / "run", quiet=True)
    m = s["metrics"]
    assert m["student"]["kd"] < 0.985 * m["student_init"]["kd"], m  # held-out scenes (measured: 0.979 -> 0.956)
    out = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert out["trainable_params"] < out["total_params"]
    assert {"teacher", "student_init", "student"} <= set(out["metrics"])
    assert "abs_rel" in out["metrics"]["teacher"] and "kd" in out["metrics"]["student"]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_resume_after_interruption_reproduces_the_loss_curve(tmp_path):
    cfg = T.TrainConfig(**{**SMALL, "steps": 6})
    full = T.train(cfg, tmp_path / "a", quiet=True)
    T.train(cfg, tmp_path / "b", quiet=True, stop_after=3)  # "killed" after step 3; last checkpoint at step 2
    assert json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["step"] == 2
    resumed = T.train(cfg, tmp_path / "b", quiet=True, resume=True)
    assert resumed["history"] == full["history"]  # every loss term of every step, exactly
    a, b = load_file(tmp_path / "a/student.safetensors"), load_file(tmp_path / "b/student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trained student loads back onto its teacher (lite3r eval / bench path)
    qat = T.QAT(cfg, T.Dist())
    student = models.load_student(tmp_path / "a", qat.teacher)
    params = dict(student.named_parameters())
    assert all(torch.equal(params[k], a[k]) for k in a)
    with pytest.raises(ValueError, match="trained on vggt-tiny"):
        models.load_student(tmp_path / "a", _renamed(qat.teacher, "vggt-1b"))


def _renamed(model, name):
    model.name = name
    return model


def test_resume_refuses_other_settings_and_overwrite_is_explicit(tmp_path):
    cfg = T.TrainConfig(**{**SMALL, "steps": 1, "eval_scenes": 0})
    T.train(cfg, tmp_path / "r", quiet=True)
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        T.train(cfg, tmp_path / "r", quiet=True)
    with pytest.raises(ValueError, match="topk"):
        T.train(T.TrainConfig(**{**SMALL, "steps": 2, "topk": 0.5}), tmp_path / "r", quiet=True, resume=True,
                explicit={"topk", "steps"})
    s = T.train(T.TrainConfig(**{**SMALL, "steps": 2, "eval_scenes": 0}), tmp_path / "r", quiet=True, resume=True,
                explicit={"steps"})
    assert [h["step"] for h in s["history"]] == [1, 2]  # extended from the step-1 checkpoint
    T.train(cfg, tmp_path / "r", quiet=True, overwrite=True)


def test_resume_means_resume(tmp_path):
    """--resume never starts another run: no run folder, or one without config.json, is a one-line error; a run
    killed before its first checkpoint restarts its SAVED config from step 0 (not the command line's defaults) and
    leaves config.json as it was."""
    from lite3r_recon.errors import MissingInput

    with pytest.raises(MissingInput, match="--resume: --out .* does not exist"):
        T.train(T.TrainConfig(**SMALL), tmp_path / "none", quiet=True, resume=True)
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInput, match="holds no run"):
        T.train(T.TrainConfig(**SMALL), tmp_path / "empty", quiet=True, resume=True)
    assert list((tmp_path / "empty").iterdir()) == []
    asked = T.TrainConfig(**{**SMALL, "steps": 3, "lr": 0.01, "ckpt_every": 10, "eval_scenes": 0})
    T.train(asked, tmp_path / "cut", quiet=True, stop_after=1)  # "killed" before its first checkpoint
    assert not (tmp_path / "cut/checkpoints/latest.json").exists()
    config = (tmp_path / "cut/config.json").read_text()
    resumed = T.train(T.TrainConfig(), tmp_path / "cut", quiet=True, resume=True, explicit=set())  # defaults
    assert json.loads((tmp_path / "cut/metrics.json").read_text())["config"] == asked.to_json()
    assert (tmp_path / "cut/config.json").read_text() == config
    full = T.train(asked, tmp_path / "full", quiet=True)
    assert resumed["history"] == full["history"]  # 3 steps at lr 0.01, from step 0
    with pytest.raises(ValueError, match=r"--lr 0\.01, asked 0\.5"):  # a contradicting option names itself
        T.train(T.TrainConfig(**{**SMALL, "lr": 0.5}), tmp_path / "cut", quiet=True, resume=True, explicit={"lr"})


def test_cli_resume_without_a_run_is_one_line(tmp_path):
    r = _cli("train", "--out", str(tmp_path / "x"), "--resume", "--steps", "1", timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--resume" in r.stderr and "does not exist" in r.stderr and not (tmp_path / "x").exists()


def _same_weights(model, teacher) -> bool:
    """The student's frozen tensors are `teacher`'s (the names it shares with the dense model)."""
    got = model.state_dict()
    return all(torch.equal(got[k].float(), v.float()) for k, v in teacher.state_dict().items() if k in got)


def test_students_carry_their_teacher(tmp_path):
    """student.json records its teacher (checkpoint + sha256, shipped file + sha256, or random + seed) and every
    load rebuilds exactly that one - not a seed-0 random teacher, not the default weights - or refuses in one line."""
    import hashlib
    import shutil

    from safetensors.torch import save_file

    import lite3r
    from lite3r_recon.errors import InvalidInput, MissingInput

    def student_of(teacher, folder):
        student = models.make_student(teacher, lite3r.SLAConfig(topk=0.5))
        with torch.no_grad():
            for p in models.trainable(student).values():
                p.normal_(0, 0.1)
        models.save_student(student, tmp_path / folder / "student.safetensors", {"backbone": "vggt-tiny"})
        return tmp_path / folder

    seed5 = models.dense_model("vggt-tiny", "random", seed=5)
    run = student_of(seed5, "r5")
    assert json.loads((run / "student.json").read_text())["teacher_source"]["seed"] == 5
    assert _same_weights(models.load_model("vggt-tiny", student=run), seed5)
    with pytest.raises(InvalidInput, match="seed 5"):  # bench / study hand their own dense model: checked
        models.load_student(run, models.dense_model("vggt-tiny", "random", seed=0))
    assert _same_weights(models.load_student(run, models.dense_model("vggt-tiny", "random", seed=5)), seed5)

    ckpt = tmp_path / "teacher.safetensors"
    save_file(models.dense_model("vggt-tiny", "random", seed=7).state_dict(), str(ckpt))
    teacher = models.dense_model("vggt-tiny", ckpt)
    run = student_of(teacher, "ck")
    rec = json.loads((run / "student.json").read_text())["teacher_source"]
    assert rec["kind"] == "checkpoint" and rec["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert _same_weights(models.load_model("vggt-tiny", student=run), teacher)
    moved = tmp_path / "moved.safetensors"
    shutil.move(ckpt, moved)
    with pytest.raises(MissingInput, match="is gone .*--weights"):
        models.load_model("vggt-tiny", student=run)
    assert _same_weights(models.load_model("vggt-tiny", student=run, weights=moved), teacher)
    save_file(models.dense_model("vggt-tiny", "random", seed=8).state_dict(), str(moved))
    with pytest.raises(InvalidInput, match="sha256"):
        models.load_model("vggt-tiny", student=run, weights=moved)
    with pytest.raises(InvalidInput, match="not random"):
        models.load_model("vggt-tiny", student=run, weights="random")

    shipped = student_of(models.dense_model("vggt-tiny"), "sh")
    assert json.loads((shipped / "student.json").read_text())["teacher_source"]["kind"] == "shipped"
    with pytest.raises(InvalidInput, match="not the teacher"):
        models.load_student(shipped, models.dense_model("vggt-tiny", "random"))

    # lite3r train records its --teacher; a student of an older lite3r (no record) loads with a warning
    save_file(teacher.state_dict(), str(ckpt))
    T.train(T.TrainConfig(**{**SMALL, "model": "vggt-tiny", "steps": 1, "eval_scenes": 0, "teacher": str(ckpt)}),
            tmp_path / "t", quiet=True)
    info = json.loads((tmp_path / "t/student.json").read_text())
    assert info["teacher_source"]["path"] == str(ckpt.resolve()) and info["teacher_source"]["overrides"] == {}
    assert _same_weights(models.load_model("vggt-tiny", student=tmp_path / "t"), teacher)
    old = {k: v for k, v in info.items() if k != "teacher_source"}
    save_file(load_file(tmp_path / "t/student.safetensors"), str(tmp_path / "old.safetensors"),
              metadata={"lite3r_train": json.dumps(old)})
    with pytest.warns(UserWarning, match="records no teacher"):
        assert _same_weights(models.load_student(tmp_path / "old.safetensors"), teacher)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    """`torchrun --nproc_per_node=2 lite3r train` (gloo on CPU, one scene per rank) gives the proj_l of one
    process training on both scenes. SGD: AdamW's first steps (g / (|g| + eps)) turn the last-bit differences of
    a batch of 1 vs 2 into ~1e-6 differences of parameters whose gradient is ~eps."""
    args = ["train", "vggt", "--res", "56,70", "--views", "2", "--batch", "2", "--steps", "3", "--warmup", "1", "--optimizer", "sgd",
            "--eval-scenes", "0", "--quiet"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "lite3r_cli", *args,
                          "--out", str(tmp_path / "ddp")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = _cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "ddp/student.safetensors"), load_file(tmp_path / "one/student.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "ddp/metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_max_rank_diff"] == 0.0


@pytest.mark.parametrize("args, names", [
    (["--topk", "2"], "--topk"),
    (["--res", "100"], "--res"),
    (["--distill", "layers"], "--distill"),
    (["--dataset", "kitti"], "--dataset"),
    (["--teacher", "no/such/file.safetensors"], "--teacher"),
    (["--steps", "0"], "--steps"),
    (["--trainable", "everything"], "--trainable"),
])
def test_bad_options_give_one_clear_line(tmp_path, args, names):
    r = _cli("train", "--out", str(tmp_path / "x"), *args, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], r.stderr


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    r = _cli("train", "--out", str(tmp_path / "run"), "--steps", "1", timeout=120)
    assert r.returncode == 2 and "holds a training run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
