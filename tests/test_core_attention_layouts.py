"""The attention layouts SLAAttention reads by structure, without third-party packages (tests/test_thirdparty_*.py run
the real timm / transformers / DA3 / VGGT classes where they import): an attention module written here after timm's
EVA / AttentionRope semantics (fused qkv with q_bias / v_bias or separate q/k/v, grouped kv heads, qk-norm, a rope
table after prefix tokens, output norm, sigmoid gate), swapped at topk=1 exactly; what survey_attention refuses or
leaves dense, and why; the report per class; call-time refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lite3r


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def _rotate(x, half):
    if half:
        a, b = x.chunk(2, -1)
        return torch.cat([-b, a], -1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)


class Attn(nn.Module):
    """A timm-style attention with every optional part SLAAttention applies."""

    def __init__(self, dim=48, heads=4, *, fused=True, qv_bias=False, kv_heads=None, qk_norm=False,
                 out_norm=False, gated=False, prefix=1, half=False):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.kv_heads = kv_heads or heads
        self.num_prefix_tokens, self.rotate_half = prefix, half
        self.scale = self.head_dim ** -0.5
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=not qv_bias)
            if qv_bias:
                self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
                self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            kv = self.kv_heads * self.head_dim
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, kv), nn.Linear(dim, kv)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.norm = nn.LayerNorm(dim) if out_norm else nn.Identity()
        self.gate = nn.Linear(dim, dim) if gated else None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        if hasattr(self, "qkv"):
            bias = torch.cat([self.q_bias, self.k_bias, self.v_bias]) if hasattr(self, "q_bias") else None
            qkv = F.linear(x, self.qkv.weight, bias if bias is not None else self.qkv.bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, -1, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            sin, cos = rope.chunk(2, -1)
            p = self.num_prefix_tokens
            q, k = (torch.cat([t[:, :, :p], t[:, :, p:] * cos + _rotate(t[:, :, p:], self.rotate_half) * sin], 2)
                    for t in (q, k))
        k = k.repeat_interleave(self.num_heads // self.kv_heads, 1)
        v = v.repeat_interleave(self.num_heads // self.kv_heads, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        o = self.norm(o.transpose(1, 2).reshape(B, N, C))
        if self.gate is not None:
            o = o * self.gate(x).sigmoid()
        return self.proj(o)


class Net(nn.Module):
    def __init__(self, *attns):
        super().__init__()
        self.blocks = nn.ModuleList(attns)

    def forward(self, x, **kwargs):
        for a in self.blocks:
            x = x + a(x, **kwargs)
        return x


def _rope(n, d, half, seed=0):
    ang = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(seed)) * 6
    ang = torch.cat([ang, ang], -1) if half else ang.repeat_interleave(2, -1)
    return torch.cat([ang.sin(), ang.cos()], -1)


@pytest.mark.parametrize("kwargs", [
    dict(qv_bias=True, qk_norm=True, out_norm=True, gated=True),
    dict(fused=False, kv_heads=2, half=True, prefix=2, out_norm=True),
], ids=["fused-qv-bias-norm-gate", "separate-gqa-half"])
def test_layout_parity_topk1(kwargs):
    torch.manual_seed(0)
    model = Net(Attn(**kwargs), Attn(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 41, 48)
    rope = _rope(41 - kwargs.get("prefix", 1), 12, kwargs.get("half", False))
    with torch.no_grad():
        ref = model(x, rope=rope)
        student = copy.deepcopy(model)
        report = lite3r.swap_attention(student, topk=1.0, fp8=False)
        out = student(x, rope=rope)
        assert report.by_class() == {f"{__name__}.Attn": {"swapped": 2}}
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
        assert float((student(x) - out).abs().max()) > 1e-3  # the rope table is applied
    assert set(student.state_dict()) - set(model.state_dict()) == {f"blocks.{i}.proj_l.{w}" for i in range(2)
                                                                   for w in ("weight", "bias")}


def test_refusals_name_module_class_and_reason():
    cases = {
        "unknown part": (lambda a: a.register_parameter("temperature", nn.Parameter(torch.ones(1))),
                         "it has temperature (Parameter), which SLA would not apply"),
        "rel pos": (lambda a: setattr(a, "relative_position_bias_table", nn.Parameter(torch.zeros(9, 4))),
                    "relative position bias (relative_position_bias_table)"),
        "scale": (lambda a: setattr(a, "scale", 0.1), "Attn.scale is 0.1"),
        "causal": (lambda a: setattr(a, "is_causal", True), "causal"),
    }
    for name, (edit, why) in cases.items():
        model = Net(Attn(), Attn())
        edit(model.blocks[1])
        with pytest.raises(lite3r.Lite3rError) as e:
            lite3r.swap_attention(model)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"SLA refuses blocks.1 ({__name__}.Attn): ") and why in msg, name
        assert not any(isinstance(m, lite3r.SLAAttention) for m in model.modules())  # refused before any swap
        entries = lite3r.survey_attention(model)
        assert [(x.fqn, x.status) for x in entries] == [("blocks.0", "swap"), ("blocks.1", "refused")]
        report = lite3r.swap_attention(model, filter=lambda m, fqn: fqn != "blocks.1")  # the way out it names
        assert report.by_class() == {f"{__name__}.Attn": {"swapped": 1, "dense": 1}}


def test_forward_args_refused_at_swap_and_shared_bias():
    class NeedsBias(Attn):
        def forward(self, x, bias_table):  # a required argument SLA does not know
            return super().forward(x)

    with pytest.raises(lite3r.Lite3rError, match="its forward takes bias_table"):
        lite3r.swap_attention(Net(NeedsBias()))

    class SharedBias(Attn):  # BEiT: the model adds one relative position bias to every block's scores
        def forward(self, x, shared_rel_pos_bias=None):
            return super().forward(x, attn_mask=shared_rel_pos_bias)

    model = Net(SharedBias())
    model.rel_pos_bias = nn.Module()
    model.rel_pos_bias.relative_position_bias_table = nn.Parameter(torch.zeros(9, 4))
    why = r"relative position bias outside it \(rel_pos_bias\) reaches its attention scores through shared_rel_pos_bias"
    with pytest.raises(lite3r.Lite3rError, match=why):
        lite3r.swap_attention(model)
    del model.rel_pos_bias
    lite3r.swap_attention(model, fp8=False)
    x = torch.randn(1, 10, 48)
    assert model.blocks[0](x, None).shape == x.shape  # positional None: no bias
    with pytest.raises(lite3r.Lite3rError, match="shared_rel_pos_bias"):
        model.blocks[0](x, torch.zeros(4, 10, 10))


def test_call_time_refusals():
    model = Net(Attn())
    lite3r.swap_attention(model, fp8=False)
    attn, x = model.blocks[0], torch.randn(1, 10, 48)
    assert attn(x, None, None, False).shape == x.shape  # the replaced forward's positional arguments
    with pytest.raises(lite3r.Lite3rError, match="is_causal=True"):
        attn(x, is_causal=True)
    with pytest.raises(lite3r.Lite3rError, match="attn_mask"):
        attn(x, None, torch.zeros(10, 10))
    with pytest.raises(lite3r.Lite3rError, match="rope=tuple"):
        attn(x, rope=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(TypeError, match="positional"):
        attn(x, None, None, False, 1)


def test_spatial_tokens_and_unread_attention():
    """[B, H, W, C] tokens (VOLO) attend as H*W tokens and come back in their shape; an attention-named module SLA
    cannot read (q + kv linears, as Twins' and PVT's) is reported dense with why, never passed over silently."""
    class Spatial(Attn):
        def forward(self, x):
            B, H, W, C = x.shape
            return super().forward(x.reshape(B, H * W, C)).reshape(B, H, W, C)

    class KVAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.q, self.kv, self.proj = 4, nn.Linear(48, 48), nn.Linear(48, 96), nn.Linear(48, 48)

    model = Net(Spatial())
    model.other = KVAttention()
    x = torch.randn(2, 5, 7, 48)
    with torch.no_grad():
        ref = model.blocks[0](x)
        report = lite3r.swap_attention(model, topk=1.0, fp8=False)
        out = model.blocks[0](x)
    assert out.shape == x.shape and float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert [v for k, v in report.by_class().items() if k.endswith(".KVAttention")] == [{"dense": 1}]
    assert "not a layout SLA reads" in str(report)
    kv_net = type("KVNet", (nn.Module,), {})()
    kv_net.a = KVAttention()
    with pytest.raises(lite3r.Lite3rError, match=r"nothing to swap in KVNet: 1 attention module\(s\).*KVAttention"):
        lite3r.swap_attention(kv_net)


def test_survey_dense_reasons_report_and_nothing_to_swap():
    mha = nn.MultiheadAttention(48, 4, batch_first=True)
    frame = Attn()
    frame.scope = "frame"
    model = Net(Attn(), frame)
    model.head = mha
    entries = lite3r.survey_attention(model, lite3r.SLAConfig(scopes=("global",)))
    assert [(e.fqn, e.status) for e in entries] == [("blocks.0", "swap"), ("blocks.1", "dense"), ("head", "dense")]
    assert "scope 'frame' is not in SLAConfig.scopes" in entries[1].reason
    assert "nn.MultiheadAttention" in entries[2].reason
    report = lite3r.swap_attention(model, lite3r.SLAConfig(scopes=("global",)))
    text = str(report)
    assert f"{__name__}.Attn: 1 swapped, 1 dense (dense: scope 'frame'" in text
    assert "torch.nn.modules.activation.MultiheadAttention: 1 dense" in text
    again = lite3r.swap_attention(model, lite3r.SLAConfig(scopes=("global",)))  # already SLA: says so, no error
    assert again.attention_swapped == 0 and again.by_class() == {
        "lite3r.SLAAttention": {"sla": 1}, f"{__name__}.Attn": {"dense": 1},
        "torch.nn.modules.activation.MultiheadAttention": {"dense": 1}}
    with pytest.raises(lite3r.Lite3rError, match=r"nothing to swap in Net: 1 attention module\(s\), all left dense"):
        lite3r.swap_attention(Net(frame), lite3r.SLAConfig(scopes=("global",)))
    with pytest.raises(lite3r.Lite3rError, match="no attention module found in Sequential"):
        lite3r.swap_attention(nn.Sequential(nn.Linear(4, 4)))
