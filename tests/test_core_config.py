"""lite3r.SLAConfig (validated once, per-scope / callable topk, JSON round trip) and the one generic module swap
(swap_modules: post-order, filtered on (module, fqn)) that the SLA swap, the FP8 swap and to_fp8_inference share."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lite3r


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


class Attn(nn.Module):
    def __init__(self, dim=32, heads=2, scope=None):
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if scope:
            self.scope = scope

    def forward(self, x, pos=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(1, 2).reshape(B, N, C))


class Net(nn.Module):
    """Two frame and two global attentions, like VGGT's alternating blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attn(scope=s) for s in ("frame", "global", "frame", "global")])
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@pytest.mark.parametrize("kwargs, match", [
    ({"topk": 0.0}, "topk"), ({"topk": 1.5}, "topk"), ({"topk": True}, "topk"), ({"topk": {"global": 2.0}}, "global"),
    ({"block_q": 0}, "block_q"), ({"block_k": 6.0}, "block_k"), ({"feature_map": "tanh"}, "feature_map"),
    ({"scopes": ()}, "scopes"), ({"scopes": (1,)}, "scopes"), ({"default_topk": 0}, "default_topk"),
])
def test_config_is_validated_once_with_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lite3r.SLAConfig(**kwargs)


def test_per_scope_topk_and_scopes_pick_modules_and_their_sparsity():
    net = Net()
    cfg = lite3r.SLAConfig(topk={"global": 0.05, "frame": 0.5}, scopes=None)
    assert lite3r.convert_to_sla(net, cfg) == 4
    assert [b.topk for b in net.blocks] == [0.5, 0.05, 0.5, 0.05]
    net = Net()
    assert lite3r.convert_to_sla(net, lite3r.SLAConfig(topk=0.3)) == 2  # default scopes: global only
    assert [type(b).__name__ for b in net.blocks] == ["Attn", "SLAAttention", "Attn", "SLAAttention"]
    net = Net()
    cfg = lite3r.SLAConfig(topk=lambda m, fqn: 0.25 if fqn.endswith("1") else 1.0, scopes=None)
    lite3r.convert_to_sla(net, cfg)
    assert [b.topk for b in net.blocks] == [1.0, 0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match="topk"):
        lite3r.convert_to_sla(Net(), lite3r.SLAConfig(topk=lambda m, fqn: 3.0, scopes=None))


def test_config_json_round_trip_and_callable_refused():
    cfg = lite3r.SLAConfig(topk={"global": 0.1}, block_q=32, block_k=64, feature_map="elu", scopes=["global", "frame"])
    assert cfg.scopes == ("global", "frame")  # normalised once
    assert lite3r.SLAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="callable"):
        lite3r.SLAConfig(topk=lambda m, fqn: 0.1).to_json()
    with pytest.raises(ValueError, match="unknown"):
        lite3r.SLAConfig.from_json({"topk": 0.1, "sparsity": 3})


def test_swap_modules_is_post_order_and_does_not_revisit_replacements():
    net = Net()
    seen = []

    def pick(m, fqn):
        seen.append(fqn)
        return isinstance(m, (nn.Linear, Attn))

    def replace(m, fqn):
        return nn.Identity() if isinstance(m, nn.Linear) else nn.Sequential(nn.Linear(32, 32))

    lite3r.swap_modules(net, pick, replace)
    # children before their parent: blocks.0.qkv, blocks.0.proj, then blocks.0; the root last
    assert seen.index("blocks.0.qkv") < seen.index("blocks.0") < seen.index("blocks") < seen.index("")
    # the Linear inside each replacement Sequential was not visited (not an Identity now)
    assert all(isinstance(b, nn.Sequential) and isinstance(b[0], nn.Linear) for b in net.blocks)
    assert isinstance(net.head, nn.Identity)
    lin = nn.Linear(4, 4)
    assert isinstance(lite3r.swap_modules(lin, lambda m, f: True, lambda m, f: nn.Identity()), nn.Identity)


def test_swap_keeps_eval_mode_and_timm_call_arguments():
    net = Net().eval()
    lite3r.swap_attention(net, topk=1.0, fp8=False)
    assert all(not m.training for m in net.modules())  # an eval model stays in eval after the swap
    x = torch.randn(2, 70, 32)
    ref = Net().eval()
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if "proj_l" not in k})
    out = net.blocks[1](x, attn_mask=None, is_causal=False)  # what timm's blocks pass
    torch.testing.assert_close(out, ref.blocks[1](x), rtol=1e-5, atol=1e-5)  # topk=1: dense attention
    with pytest.raises(ValueError, match="is_causal"):
        net.blocks[1](x, is_causal=True)


def test_every_conversion_uses_the_one_filter_signature():
    net = Net()
    seen = []
    lite3r.swap_attention(net, topk=0.5, filter=lambda m, fqn: seen.append((type(m).__name__, fqn)) or True,
                          fp8_filter=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "head")
    assert ("Attn", "blocks.1") in seen
    assert type(net.head) is nn.Linear and isinstance(net.blocks[0].qkv, lite3r.FP8FakeQuantLinear)
    lite3r.to_fp8_inference(net, fp8_filter=lambda m, fqn: fqn == "head")
    assert isinstance(net.head, lite3r.FP8Linear) and isinstance(net.blocks[0].qkv, lite3r.FP8Linear)
    with lite3r.AttentionRecorder(net, select=lambda m, fqn: fqn == "blocks.3") as rec:
        net(torch.randn(1, 8, 32))
    assert rec.names == ["blocks.3"]


def test_branches_alone_are_the_ablations():
    """sla_attention(branches=...): "sparse" is o_s whatever proj_l is, "linear" is proj_l(o_l) alone; bad names and
    a linear branch without proj_l are one-line errors."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g) for _ in range(3))
    proj_l = nn.Linear(8, 8)
    both = lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8, proj_l=proj_l)
    sparse = lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8, proj_l=proj_l, branches="sparse")
    linear = lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8, proj_l=proj_l, branches="linear")
    torch.testing.assert_close(sparse, lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8))
    torch.testing.assert_close(linear, proj_l(lite3r.linear_attention_reference(q, k, v)))
    torch.testing.assert_close(both, sparse + linear)
    with pytest.raises(ValueError, match="branches"):
        lite3r.sla_attention(q, k, v, topk=0.5, branches="neither")
    with pytest.raises(ValueError, match="proj_l"):
        lite3r.sla_attention(q, k, v, topk=0.5, branches="linear")
