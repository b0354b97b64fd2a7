"""RoPE cos/sin computed once per forward (backbones.layers.rope_table) and passed to every block: bit-identical to
each block computing them from the positions, for the rotation alone and for whole VGGT / DA3 models."""
import pytest
import torch

import lite3r_backbones.da3 as da3_mod
import lite3r_backbones.layers as layers
from lite3r_backbones import build_backbone
from lite3r_backbones.layers import RoPE2D, patch_positions, rope_table


def rope_per_block(self, t, pos):
    """The rotation as every block computed it before the table (the oracle): angles -> token dtype -> cos/sin."""
    d = t.shape[-1] // 2
    inv_freq = 1.0 / (self.frequency ** (torch.arange(0, d, 2, device=t.device).float() / d))
    ang = pos.to(torch.float32)[..., None] * inv_freq
    ang = torch.cat((ang, ang), dim=-1).to(t.dtype)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    t = t.unflatten(-1, (2, d))
    t1, t2 = t.chunk(2, dim=-1)
    return (t * cos + torch.cat((-t2, t1), dim=-1) * sin).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 1, 3, 7), (1, 2, 0, 5, 9)], ids=["5x7+1", "9x5"])
def test_table_matches_per_block_rope(dtype, shape):
    B, H, special, h, w = shape
    pos = patch_positions(B, h, w, special)
    t = torch.randn(B, H, pos.shape[1], 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    rope = RoPE2D(100.0)
    want = rope_per_block(rope, t, pos)
    table = rope.table(pos, 16)
    assert table.shape == (3, B, 1, pos.shape[1], 2, 8) and table.dtype == torch.float32
    assert torch.equal(rope(t, table), want)
    assert torch.equal(rope(t, pos), want)  # raw positions still work (third-party callers)
    assert not torch.equal(want, t)  # the rotation does something
    kept = t.clone()
    assert torch.equal(t, kept)  # with grad enabled the input is left alone
    with torch.no_grad():  # inference: rotated in place (the caller hands t over), the same bits
        got = rope(t, table)
    assert torch.equal(got, want) and got.data_ptr() == t.data_ptr()


def test_one_frame_table_broadcasts_over_frames_and_frame_chunks():
    """Every frame has the same positions, so the models build the frame blocks' table from one frame: it must
    rotate any number of frames, and any chunk of them, as the full table does."""
    pos = patch_positions(5, 3, 4, 1)
    t = torch.randn(5, 2, pos.shape[1], 16, generator=torch.Generator().manual_seed(3))
    rope = RoPE2D(100.0)
    want = rope(t, rope.table(pos, 16))
    assert torch.equal(rope(t, rope.table(pos[:1], 16)), want)
    one = rope.table(pos[:1], 16)
    assert layers._frames_of(one, 2, 3) is one
    assert torch.equal(layers._frames_of(rope.table(pos, 16), 2, 3), rope.table(pos, 16)[:, 2:5])


def test_head_dim_must_divide_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_table(patch_positions(1, 2, 2, 0), 6)


def _count_tables(monkeypatch, module) -> list:
    calls = []
    real = module.rope_table

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "rope_table", counted)
    return calls


@pytest.mark.parametrize("name,images", [("vggt-tiny", (1, 3, 3, 56, 70)), ("da3-tiny", (1, 3, 3, 56, 70))])
def test_model_computes_tables_once_and_matches_per_block(monkeypatch, name, images):
    torch.manual_seed(0)
    model = build_backbone(name, **({"weights": "random"} if name.startswith("da3") else {})).eval()
    x = torch.rand(images, generator=torch.Generator().manual_seed(1))
    module = da3_mod if name.startswith("da3") else layers
    calls = _count_tables(monkeypatch, module)
    with torch.no_grad():
        got = model(x)
    assert len(calls) == 2, f"{len(calls)} rope tables per forward (frame + global expected)"
    tokens = sorted(c[0] * c[1] for c in calls)  # one frame's table for the frame blocks, all views' for global
    assert tokens[1] == images[1] * tokens[0], calls
    n_rope = sum(isinstance(m, RoPE2D) for m in model.modules())
    assert n_rope >= 1
    # before: no table, each block's RoPE2D computes cos/sin from the raw positions
    monkeypatch.setattr(module, "rope_table", lambda pos, *a, **k: pos)
    monkeypatch.setattr(RoPE2D, "forward", rope_per_block)
    with torch.no_grad():
        want = model(x)
    tensors = [k for k, v in got.items() if isinstance(v, torch.Tensor)]
    assert "depth" in tensors
    for key in tensors:
        assert torch.equal(got[key], want[key]), key
