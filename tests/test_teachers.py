"""The shipped tiny teachers (backbones/weights/, made by lite3r pretrain): they load by default, strictly, and know
geometry - they beat a random init by a wide margin on held-out synthetic scenes (scenes no training step saw)."""
import json

import pytest
import torch

from lite3r_backbones import SHIPPED, WEIGHTS_DIR, build_backbone, load_checkpoint, shipped_weights
from lite3r_recon.scoring import HELDOUT, heldout_data, heldout_metrics

NAMES = ("vggt-tiny", "da3-tiny")


@pytest.fixture(scope="module")
def data():
    return heldout_data(3, (126, 168))


def _metrics(model, data):
    return heldout_metrics(model, data, device="cpu", views=4, points=False)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_teacher_beats_random_init(name, data):
    teacher = _metrics(build_backbone(name), data)
    random = _metrics(build_backbone(name, weights="random"), data)
    assert teacher["abs_rel"] < 0.12 and random["abs_rel"] > 0.25  # the shipped files: 0.04 / 0.09 on 16 scenes
    assert teacher["abs_rel"] < 0.5 * random["abs_rel"]
    assert teacher["delta1"] > random["delta1"] + 0.3
    assert teacher["rot_err"] < random["rot_err"] - 10  # degrees
    if name == "vggt-tiny":  # the session-12 teacher resolves poses: AUC@30 0.59 / rotation error 9 deg here
        assert teacher["auc30"] > 0.45 and teacher["rot_err"] < 15 and random["auc30"] < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_default_weights_are_the_shipped_file_loaded_strictly(name):
    path = shipped_weights(name)
    assert path.parent == WEIGHTS_DIR and path.is_file() and path.stat().st_size < 8 * 2**20
    model = build_backbone(name)
    again = load_checkpoint(build_backbone(name, weights="random"), path, strict=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert a.dtype == torch.float32 and torch.equal(a, b), k
    for k, v in SHIPPED[name][1].items():  # the inference options the teacher was trained with
        assert getattr(model.config, k) == v
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["backbone"] == name and info["command"].startswith(f"lite3r pretrain {name.split('-')[0]} ")
    assert isinstance(info["seed"], int) and info["metrics"]["trained"]["abs_rel"] <= 0.10
    for stage in info.get("stages", []):  # a teacher continued from earlier weights: every stage's recipe
        assert stage["command"].startswith(f"lite3r pretrain {name.split('-')[0]} ") and stage["step"] > 0
    if "stages" in info:
        assert info["stages"][-1]["command"] == info["command"] and "--init" in info["command"]
    assert str(HELDOUT) in info["heldout"]["seeds"]


def test_random_and_overrides():
    a, b = build_backbone("vggt-tiny", weights="random"), build_backbone("vggt-tiny")
    assert not torch.equal(a.aggregator.camera_token, b.aggregator.camera_token)
    for option in ({"lean": False}, {"kept_fp8": True}, {"mlp_chunk_tokens": 64}):  # inference options: the teacher
        same = build_backbone("vggt-tiny", **option)
        assert torch.equal(same.aggregator.camera_token, b.aggregator.camera_token), option
    assert build_backbone("da3-tiny", ref_view_strategy="saddle_balanced").config.ref_view_strategy == "saddle_balanced"
    other = build_backbone("vggt-tiny", dpt_features=16)  # another architecture: random init, it builds
    assert other.depth_head.scratch.layer1_rn.weight.shape[0] == 16
    assert build_backbone("vggt-tiny", device="meta").aggregator.camera_token.is_meta
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_backbone("vggt-tiny", weights="missing.safetensors")


def test_weights_shipped_is_strict():
    """weights="shipped": the shipped file whatever the overrides; one that changes a parameter fails loudly (no
    silent random init), and so does a backbone without shipped weights."""
    b = build_backbone("vggt-tiny")
    got = build_backbone("vggt-tiny", weights="shipped", lean=False)
    assert torch.equal(got.aggregator.camera_token, b.aggregator.camera_token)
    assert build_backbone("da3-tiny", weights="shipped").config.ref_view_strategy == SHIPPED["da3-tiny"][1][
        "ref_view_strategy"]
    with pytest.raises(Exception, match="size mismatch|shape"):
        build_backbone("vggt-tiny", weights="shipped", dpt_features=16)
    with pytest.raises(ValueError, match="vggt-small has no shipped weights"):
        build_backbone("vggt-small", weights="shipped")
