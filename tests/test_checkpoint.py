"""backbones.load_checkpoint: formats, prefixes, strictness and clear errors for wrong files (tiny checkpoints)."""
import pytest
import torch
from safetensors.torch import save_file

from lite3r_backbones import CheckpointError, build_backbone, load_checkpoint


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_backbone("vggt-tiny").state_dict().items()}


def _same(model, sd):
    msd = model.state_dict()
    return set(msd) == set(sd) and all(torch.equal(msd[k], sd[k]) for k in sd)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth"])
def test_round_trip_formats(tmp_path, tiny_sd, fmt):
    path = tmp_path / f"w.{fmt}"
    save_file(tiny_sd, str(path)) if fmt == "safetensors" else torch.save(tiny_sd, path)
    model = load_checkpoint(build_backbone("vggt-tiny"), path)
    assert _same(model, tiny_sd)


@pytest.mark.parametrize("prefix", ["model.", "module.", "module.model."])
def test_wrapper_prefixes_stripped(tmp_path, tiny_sd, prefix):
    path = tmp_path / "w.safetensors"
    save_file({prefix + k: v for k, v in tiny_sd.items()}, str(path))
    assert _same(load_checkpoint(build_backbone("vggt-tiny"), path), tiny_sd)


def test_wrapped_training_checkpoint(tmp_path, tiny_sd):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": tiny_sd, "step": 3}, path)
    assert _same(load_checkpoint(build_backbone("vggt-tiny"), path), tiny_sd)


def test_meta_model_is_assigned_not_copied(tiny_sd):
    model = build_backbone("vggt-tiny", device="meta")
    load_checkpoint(model, tiny_sd)
    w = tiny_sd["aggregator.frame_blocks.0.attn.qkv.weight"]
    assert model.aggregator.frame_blocks[0].attn.qkv.weight.data_ptr() == w.data_ptr()
    assert not any(p.is_meta for p in model.parameters())
    assert model.aggregator.frame_blocks[0].attn.qkv.weight.requires_grad
    with torch.inference_mode():
        out = model.eval()(torch.rand(1, 2, 3, 56, 70))
    assert torch.isfinite(out["depth"]).all()


def test_renamed_key(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["aggregator.frame_blocks.0.attn.qkv.weights"] = sd.pop("aggregator.frame_blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_backbone("vggt-tiny"), path)
    msg = str(e.value)
    assert msg.splitlines()[0] == f"{path}: checkpoint does not match vggt-tiny (1 missing, 1 unexpected keys)"
    assert "missing from the file: aggregator.frame_blocks.0.attn.qkv.weight" in msg
    assert "unexpected in the file: aggregator.frame_blocks.0.attn.qkv.weights" in msg
    # non-strict loading of a meta model cannot leave the missing tensor unset
    with pytest.raises(CheckpointError, match="were not in the checkpoint"):
        load_checkpoint(build_backbone("vggt-tiny", device="meta"), path, strict=False)
    model = build_backbone("vggt-tiny")
    load_checkpoint(model, path, strict=False)  # loads the rest
    assert torch.equal(model.state_dict()["aggregator.frame_blocks.1.attn.qkv.weight"],
                       tiny_sd["aggregator.frame_blocks.1.attn.qkv.weight"])


def test_shape_mismatch_is_an_error_even_non_strict(tmp_path):
    other = build_backbone("vggt-tiny", dpt_features=16).state_dict()
    path = tmp_path / "other.safetensors"
    save_file(other, str(path))
    with pytest.raises(CheckpointError, match="with a different shape") as e:
        load_checkpoint(build_backbone("vggt-tiny"), path, strict=False)
    assert "shape mismatches: " in str(e.value) and "vs model" in str(e.value)


def test_extra_head_needs_explicit_skip(tmp_path, tiny_sd):
    sd = dict(tiny_sd, **{"extra_head.fmap_norm.weight": torch.ones(4)})
    path = tmp_path / "with_extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected") as e:
        load_checkpoint(build_backbone("vggt-tiny"), path)
    assert "skip_prefixes=('extra_head.',)" in str(e.value)
    assert _same(load_checkpoint(build_backbone("vggt-tiny"), path, skip_prefixes=("extra_head.",)), tiny_sd)


def test_da3_checkpoint_detected(tmp_path):
    sd = {
        "model.backbone.pretrained.cls_token": torch.zeros(1, 1, 64),
        "model.backbone.pretrained.blocks.0.attn.qkv.weight": torch.zeros(192, 64),
        "model.head.scratch.output_conv1.weight": torch.zeros(8, 8, 3, 3),
    }
    path = tmp_path / "da3.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_backbone("vggt-tiny"), path)
    first = str(e.value).splitlines()[0]
    assert first == f"{path}: this looks like a Depth Anything 3 checkpoint, but the model is vggt-tiny (VGGT)"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_file(tmp_path, tiny_sd, fmt):
    path = tmp_path / f"w.{fmt}"
    save_file(tiny_sd, str(path)) if fmt == "safetensors" else torch.save(tiny_sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_backbone("vggt-tiny"), path)
    assert str(e.value).startswith(f"{path}: cannot read")
    assert "truncated" in str(e.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(build_backbone("vggt-tiny"), path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(build_backbone("vggt-tiny"), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor(tmp_path, tiny_sd, bad):
    sd = {k: v.clone() for k, v in tiny_sd.items()}
    sd["depth_head.norm.weight"][3] = bad
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"'depth_head.norm.weight' has 1 NaN/inf values"):
        load_checkpoint(build_backbone("vggt-tiny", device="meta"), path)
