"""lite3r study on the shipped tiny teacher: every row of the table on the same held-out scenes, JSON + PNG."""
import dataclasses
import json
import math

import pytest
import torch

import lite3r
from lite3r_backbones import build_backbone
from lite3r_cli.study import StudyConfig, linear_only, study
from lite3r_recon import models


def test_study_writes_table_json_and_plot(tmp_path):
    cfg = StudyConfig(scenes=1, views=2, size=(42, 56), topks=(0.5, 0.25), block=16, train_steps=1)
    r = study(cfg, tmp_path / "s", device="cpu", quiet=True)
    names = [row["row"] for row in r["rows"]]
    assert names == ["dense", "sla 0.5", "sla 0.25", "sla 0.5 + fp8", "sla 0.25 + fp8", "qat", "distill only",
                     "task only", "sparse only", "linear only"]
    saved = json.loads((tmp_path / "s" / "study.json").read_text())
    assert saved["rows"] == r["rows"] and saved["tokens"] == 2 * (3 * 4 + 5)  # 2 views x (patches + 5 special)
    assert saved["key_blocks"] == 3 and saved["kept_blocks"] == {"0.5": 2, "0.25": 1}
    assert (tmp_path / "s" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "s" / "study.partial.json").exists()  # a finished study leaves only study.json
    by = {row["row"]: row for row in r["rows"]}
    for row in r["rows"]:
        assert {"auc30", "auc5", "rra5", "rta5", "abs_rel", "delta1", "chamfer", "fscore"} <= set(row), row["row"]
    assert by["sparse only"]["abs_rel"] == by["sla 0.25 + fp8"]["abs_rel"]
    assert by["linear only"]["abs_rel"] != by["dense"]["abs_rel"]
    for row in ("qat", "distill only", "task only"):
        assert (tmp_path / "s" / row.replace(" ", "-") / "student.safetensors").is_file()
    with pytest.raises(FileExistsError):
        study(cfg, tmp_path / "s", device="cpu", quiet=True)


def test_study_killed_midway_keeps_its_rows(tmp_path, monkeypatch):
    """A study stopped after its third row (a kill, a GPU call's limit) leaves those rows in study.partial.json, and
    --resume goes on from there."""
    import lite3r_recon.scoring as scoring

    real, calls = scoring.heldout_metrics, []

    def third_row_dies(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(scoring, "heldout_metrics", third_row_dies)
    cfg = StudyConfig(scenes=1, views=2, size=(42, 56), topks=(0.5, 0.25), block=16, train_steps=1)
    with pytest.raises(KeyboardInterrupt):
        study(cfg, tmp_path / "s", device="cpu", quiet=True)
    partial = json.loads((tmp_path / "s" / "study.partial.json").read_text())
    assert [r["row"] for r in partial["rows"]] == ["dense", "sla 0.5"] and "abs_rel" in partial["rows"][1]
    assert not (tmp_path / "s" / "study.json").exists()
    # --resume: the two rows are kept as measured (not measured again), the other 8 measured, the study finished
    with pytest.raises(ValueError, match="other settings .*train_steps 1, asked 2"):
        study(dataclasses.replace(cfg, train_steps=2), tmp_path / "s", device="cpu", quiet=True, resume=True)
    calls[:] = [1, 1, 1]  # past the third call: nothing dies now
    r = study(cfg, tmp_path / "s", device="cpu", quiet=True, resume=True)
    assert len(calls) == 3 + 7  # the rows measured now: 10 less the 2 kept and the alias (sparse only)
    assert r["rows"][:2] == partial["rows"] and len(r["rows"]) == 10
    assert (tmp_path / "s" / "study.json").is_file() and not (tmp_path / "s" / "study.partial.json").exists()
    with pytest.raises(FileNotFoundError, match="--resume: .*study.partial.json not found"):
        study(cfg, tmp_path / "s", device="cpu", quiet=True, resume=True, overwrite=True)


def test_linear_only_is_the_linear_branch():
    teacher = build_backbone("vggt-tiny").eval()
    student = models.make_student(teacher, lite3r.SLAConfig(topk=0.5, block_q=16, block_k=16), fp8=False)
    assert linear_only(student) == 6  # the global attention layers of vggt-tiny
    m = next(m for m in student.modules() if isinstance(m, lite3r.SLAAttention) and m.branches == "linear")
    x = torch.randn(1, 20, m.num_heads * m.head_dim)
    q, k, v = m.qkv(x).reshape(1, 20, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = lite3r.linear_attention_reference(m.q_norm(q), m.k_norm(k), v)  # proj_l = I: the linear branch as it is
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.proj(o.transpose(1, 2).reshape(1, 20, -1)))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        StudyConfig(model="vggt-huge")
    with pytest.raises(ValueError, match="needs --data"):
        StudyConfig(dataset="blendedmvs")
    with pytest.raises(FileNotFoundError, match="--weights"):
        StudyConfig(weights=str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="kept fractions"):
        StudyConfig(topks=(0.0,))
    with pytest.raises(ValueError, match="--trainable"):
        StudyConfig(trainable="all")
    with pytest.raises(ValueError, match="--target"):
        StudyConfig(target="labels")


def test_study_rows_at_a_kept_block_count(tmp_path):
    """--kept-blocks: untrained rows keeping a count of key blocks; a count >= the key blocks is dense attention."""
    cfg = StudyConfig(scenes=1, views=2, size=(42, 56), topks=(0.25,), kept_blocks=(1, 3), block=16, train_steps=1,
                      ablations=False)
    r = study(cfg, tmp_path / "s", device="cpu", quiet=True)
    by = {row["row"]: row for row in r["rows"]}
    assert [n for n in by if "blocks" in n] == ["sla 1 blocks", "sla 3 blocks", "sla 1 blocks + fp8",
                                                "sla 3 blocks + fp8"]
    assert r["kept_blocks"] == {"0.25": 1, "1 blocks": 1, "3 blocks": 3}  # 3 key blocks: 3 keeps them all
    assert by["sla 3 blocks"]["kept_blocks"] == 3 and by["sla 3 blocks"]["topk"] == 1.0
    for m in ("abs_rel", "auc30", "chamfer"):
        assert by["sla 1 blocks"][m] == by["sla 0.25"][m]  # 1 of 3 blocks either way: the same student
        assert by["sla 3 blocks"][m] == pytest.approx(by["dense"][m], rel=1e-3, abs=1e-4)
    assert by["sla 1 blocks"]["abs_rel"] != by["dense"]["abs_rel"]
    with pytest.raises(ValueError, match="counts of key blocks"):
        StudyConfig(kept_blocks=(0,))


def test_study_trained_rows_take_trainable_and_target(tmp_path):
    """trainable="attention", target="teacher": the qat row's run trains the SLA layers' own weights too (its
    student file has them) at lr_inherited, towards the teacher's predictions (session 14's recipe)."""
    from safetensors.torch import load_file

    cfg = StudyConfig(scenes=1, views=2, size=(42, 56), topks=(0.25,), block=16, train_steps=1, ablations=False,
                      trainable="attention", target="teacher", lr_inherited=3e-4)
    r = study(cfg, tmp_path / "s", device="cpu", quiet=True)
    saved = load_file(str(tmp_path / "s" / "qat" / "student.safetensors"))
    assert any(".proj_l." in f".{k}" for k in saved) and any(k.endswith("qkv.weight") for k in saved)
    run = json.loads((tmp_path / "s" / "qat" / "config.json").read_text())
    assert (run["trainable"], run["target"], run["lr_inherited"]) == ("attention", "teacher", 3e-4)
    assert r["config"]["trainable"] == "attention" and r["config"]["target"] == "teacher"
    qat = next(row for row in r["rows"] if row["row"] == "qat")
    assert (qat["trainable"], qat["target"]) == ("attention", "teacher")


@pytest.mark.parametrize("given", ["run", "artifact"])
def test_cli_study_with_a_given_student(tmp_path, given):
    """--student: lite3r train's run folder, or that student exported (`lite3r export`: deployed, no teacher)."""
    import os
    import subprocess
    import sys

    from lite3r_cli.export import export
    from lite3r_recon.qat import train
    from lite3r_recon.train_config import TrainConfig

    train(TrainConfig(steps=1, batch=1, views=2, res=(42, 56), block=16, topk=0.25, eval_scenes=0), tmp_path / "qat",
          quiet=True, device="cpu")
    student = tmp_path / "qat"
    if given == "artifact":
        student = tmp_path / "qat.lite3r.safetensors"
        export(tmp_path / "qat", out=student)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "lite3r_cli", "study", "vggt-tiny", "--scenes", "1", "--views", "2",
                        "--size", "42,56", "--topk", "0.5,0.25", "--kept-blocks", "2", "--block", "16", "--student", str(student),
                        "--no-ablations", "--out", str(tmp_path / "s"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sla 0.25 + fp8" in r.stdout and "AbsRel" in r.stdout  # the rich table
    saved = json.loads((tmp_path / "s" / "study.json").read_text())
    rows = {row["row"]: row for row in saved["rows"]}
    assert list(rows)[-1] == "qat" and saved["runs"]["qat"] == str(student)
    assert rows["sla 2 blocks + fp8"]["kept_blocks"] == 2  # --kept-blocks parsed
    assert math.isfinite(rows["qat"]["abs_rel"]) and rows["qat"]["abs_rel"] < 1
    assert rows["qat"]["trainable"] == ("proj_l" if given == "run" else None)  # what the given student trained
    assert rows["qat"]["target"] == ("gt" if given == "run" else None)
    assert not (tmp_path / "s" / "qat").exists()  # the given student: no training run
