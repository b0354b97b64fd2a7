"""timm's attention families on the real classes (random init, small configs, CPU): swapped exactly (topk=1 parity,
QAT into proj_l only, deploy = student) or refused at swap time with one line naming the module, its class and why.

Families: vision_transformer Attention (DINOv2 ViT; qk-norm, scale_norm, gated, attn_head_dim), AttentionRope (a rope
table as a forward argument; fused or separate q/k/v, grouped kv heads, half rotation), EVA02 / DINOv3 (q_bias /
v_bias, inner norm, rope), BEiT without relative position bias (q_bias / v_bias); refused: BEiT's per-block and
shared relative position bias, Swin's window attention. A model without attention says so."""
import copy

import pytest
import torch
from torch import nn

import lite3r
from thirdparty_checks import check_family, import_or_skip, max_rel, perturb, swapped_classes

timm = import_or_skip("timm")
from timm.layers import Attention, AttentionRope  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def _images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), seed)


class Holder(nn.Module):
    """One attention module inside a container (swap_attention swaps in place, never the root)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x, **kwargs):
        return self.attn(x, **kwargs)


def _rope_table(n: int, d: int, *, half: bool, seed: int = 0) -> torch.Tensor:
    """cat(sin, cos) [n, d] in timm's layouts (pairs interleaved, or two halves)."""
    ang = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(seed)) * 6.0
    ang = torch.cat([ang, ang], -1) if half else ang.repeat_interleave(2, -1)
    return torch.cat([ang.sin(), ang.cos()], -1)


# --------------------------------------------------------------------------------------------------- swapped
def test_vit_dinov2():
    """The README's family: timm's DINOv2 ViT (layer scale, cls token), blocks called with attn_mask=None."""
    model = _model("vit_small_patch14_dinov2", img_size=56, embed_dim=64, depth=2, num_heads=4)
    x = _images(56)
    report = check_family(model, lambda m: m.forward_features(x), swapped=2)
    assert swapped_classes(report) == {"timm.layers.attention.Attention": 2}
    assert "timm.layers.attention.Attention: 2 swapped" in str(report)


@pytest.mark.parametrize("kwargs", [
    dict(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True),
    dict(qkv_bias=False, attn_head_dim=24, scale_norm=True),  # attention width (96) != model width (64)
], ids=["qknorm-scalenorm-gated", "head-dim"])
def test_attention_options(kwargs):
    torch.manual_seed(0)
    model = perturb(Holder(Attention(64, num_heads=4, norm_layer=nn.LayerNorm, **kwargs)))
    x = torch.randn(2, 37, 64)
    check_family(model, lambda m: m(x), swapped=1)
    check_family(model, lambda m: m(x, attn_mask=None, is_causal=False), swapped=1)


@pytest.mark.parametrize("kwargs", [
    dict(qkv_fused=True, rotate_half=False, num_prefix_tokens=1),
    dict(qkv_fused=False, rotate_half=True, num_prefix_tokens=2, num_kv_heads=2, qk_norm=True, scale_norm=True),
], ids=["fused-interleaved", "separate-gqa-half"])
def test_attention_rope_table(kwargs):
    torch.manual_seed(0)
    model = perturb(Holder(AttentionRope(64, num_heads=4, norm_layer=nn.LayerNorm, **kwargs)))
    N, npt = 35, kwargs["num_prefix_tokens"]
    x = torch.randn(2, N, 64)
    rope = _rope_table(N - npt, 16, half=kwargs["rotate_half"])
    report = check_family(model, lambda m: m(x, rope=rope), swapped=1)
    assert swapped_classes(report) == {"timm.layers.attention.AttentionRope": 1}
    with torch.no_grad():  # the table is applied (not dropped)
        sla = copy.deepcopy(model)
        lite3r.swap_attention(sla, topk=1.0, fp8=False)
        assert max_rel(sla(x, rope=rope), sla(x)) > 1e-2


@pytest.mark.parametrize("name,kwargs,swapped", [
    ("vit_small_patch16_rope_224", dict(img_size=64, embed_dim=64, depth=2, num_heads=4), 2),
    ("eva02_tiny_patch14_224", dict(img_size=56, embed_dim=64, depth=2, num_heads=4), 2),
    ("vit_small_patch16_dinov3", dict(img_size=64, embed_dim=64, depth=2, num_heads=4), 2),
    ("beit_base_patch16_224", dict(img_size=64, embed_dim=64, depth=2, num_heads=4, use_rel_pos_bias=False,
                                   use_abs_pos_emb=True), 2),
], ids=["vit-rope", "eva02", "dinov3", "beit-no-relpos"])
def test_model_families(name, kwargs, swapped):
    model = _model(name, **kwargs)
    x = _images(kwargs["img_size"])
    report = check_family(model, lambda m: m.forward_features(x), swapped=swapped)
    biased = [m for m in model.modules() if getattr(m, "q_bias", None) is not None]
    assert not biased or all(float(m.q_bias.abs().min()) > 0 for m in biased)  # the q/v biases are not zero
    assert sum(swapped_classes(report).values()) == swapped


def test_eval_model_with_attention_dropout():
    """swap_attention keeps eval mode: the replaced modules' attention dropout is off and never refused in eval."""
    model = _model("vit_small_patch14_dinov2", img_size=28, embed_dim=32, depth=1, num_heads=2,
                   attn_drop_rate=0.1).eval()
    x = _images(28)
    check_family(model, lambda m: m.forward_features(x), swapped=1)
    student = copy.deepcopy(model)
    lite3r.swap_attention(student, fp8=False)
    with pytest.raises(lite3r.Lite3rError, match=r"attention dropout \(p=0\.1\)"):
        student.train().forward_features(x)


# --------------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize("name,kwargs,fqn,cls,why", [
    ("beit_base_patch16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2), "blocks.0.attn",
     "timm.models.beit.Attention", "relative position bias"),
    ("beit_base_patch16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2, use_rel_pos_bias=False,
                                   use_shared_rel_pos_bias=True), "blocks.0.attn", "timm.models.beit.Attention",
     "relative position bias outside it (rel_pos_bias) reaches its attention scores through shared_rel_pos_bias"),
    ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=16, depths=(2,), num_heads=(2,), window_size=7),
     "layers.0.blocks.0.attn", "timm.models.swin_transformer.WindowAttention", "relative position bias"),
], ids=["beit-relpos", "beit-shared-relpos", "swin"])
def test_refused_at_swap_time(name, kwargs, fqn, cls, why):
    model = _model(name, **kwargs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lite3r.Lite3rError) as e:
        lite3r.swap_attention(model)
    msg = str(e.value)
    assert "\n" not in msg and f"SLA refuses {fqn} ({cls}): " in msg and why in msg, msg
    assert not any(isinstance(m, lite3r.SLAAttention) for m in model.modules())  # nothing half-swapped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    entries = lite3r.survey_attention(model)
    assert entries and {x.status for x in entries} == {"refused"} and entries[0].fqn == fqn


def test_refused_modules_left_dense_by_filter():
    """The refusal names the way out: filter the refused modules out and the rest is swapped; the report counts
    both per class."""
    model = _model("beit_base_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(lite3r.Lite3rError, match="nothing to swap in Beit: 2 attention module"):
        lite3r.swap_attention(model, fp8=False, filter=lambda m, fqn: False)
    plain = model.blocks[1].attn  # block 1 without its bias: swapped; block 0 filtered out
    plain.relative_position_bias_table = plain.relative_position_index = None
    report = lite3r.swap_attention(model, fp8=False, filter=lambda m, fqn: fqn != "blocks.0.attn")
    assert report.by_class() == {"timm.models.beit.Attention": {"dense": 1, "swapped": 1}}
    assert "timm.models.beit.Attention: 1 dense, 1 swapped (dense: filter)" in str(report)


def test_model_without_attention_says_so():
    model = _model("resnet18")
    with pytest.raises(lite3r.Lite3rError, match="no attention module found in ResNet"):
        lite3r.swap_attention(model)
