"""Smoke test of the whole lite3r.py API on a tiny model (reference backend)."""
import torch
from torch import nn

import lite3r


class _Attn(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, pos=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


def test_smoke(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    torch.manual_seed(0)
    teacher = nn.Sequential(_Attn(), nn.Linear(32, 32), _Attn())
    student = nn.Sequential(*[m for m in __import__("copy").deepcopy(teacher)])
    report = lite3r.swap_attention(student, topk=0.5, block_q=8, block_k=8)
    assert report.attention_swapped == 2 and report.trainable_params == 2 * (16 * 16 + 16)
    x = torch.randn(2, 20, 32)
    with lite3r.AttentionRecorder(teacher) as t, lite3r.AttentionRecorder(student) as s:
        teacher(x)
        student(x)
    loss = lite3r.distill_loss(s.outputs, t.outputs)
    loss.backward()
    assert student[0].proj_l.weight.grad is not None
    deployed = lite3r.deploy(student, compile=False)
    assert isinstance(deployed[1], lite3r.FP8Linear)
    assert deployed(x).shape == (2, 20, 32)
