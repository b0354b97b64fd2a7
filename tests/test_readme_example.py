"""README.md "Copy lite3r.py into your codebase": the snippet itself run against the installed timm (the model
built small and random: pretrained weights are not downloaded here), and the same calls, in the same order, on a
tiny timm-like ViT written here (timm's Attention layout: qkv / q_norm / k_norm / proj / num_heads,
forward(x, attn_mask=None)) for machines without timm."""
from __future__ import annotations

import copy
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lite3r

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class Attention(nn.Module):  # timm.models.vision_transformer.Attention, same attribute names and layout
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A DINOv2-style ViT: patch embedding, cls token, learned positions, pre-norm blocks, final norm."""

    def __init__(self, img: int = 64, patch: int = 4, dim: int = 64, depth: int = 2, num_heads: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))


def _snippet() -> str:
    text = README.read_text()
    snippet = text[text.index("## Copy `lite3r.py`"):]
    snippet = snippet[snippet.index("```python") + len("```python"):]
    return snippet[:snippet.index("```")]


def test_readme_snippet_runs_with_timm(monkeypatch):
    """The README's code block as written, with timm.create_model(name, pretrained=True) building the same timm
    model class small and random (2 blocks of width 64); its images (518 x 518: 1370 tokens) as they are."""
    try:
        import timm
    except Exception as e:  # timm needs a torchvision that loads beside this torch
        pytest.skip(f"timm does not import here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    create = timm.create_model
    built = []

    def small(name, pretrained=False, **kwargs):
        torch.manual_seed(0)
        built.append(create(name, pretrained=False, embed_dim=64, depth=2, num_heads=4, **kwargs))
        return built[-1]

    monkeypatch.setattr(timm, "create_model", small)
    scope: dict = {}
    exec(compile(_snippet(), str(README), "exec"), scope)  # noqa: S102 - the README's own code
    report, student, teacher, deployed = (scope[n] for n in ("report", "student", "teacher", "deployed"))
    assert [type(m) for m in built] == [timm.models.vision_transformer.VisionTransformer]
    assert report.attention_swapped == 2 and report.by_class() == {"timm.layers.attention.Attention": {"swapped": 2}}
    assert len(scope["rec_t"].outputs) == len(scope["rec_s"].outputs) == 2 and float(scope["loss"]) > 0
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}  # deploy froze them after
    assert len(grads) == 2 * 2 and all(".proj_l." in n and g.abs().sum() > 0 for n, g in grads.items())
    assert isinstance(deployed, torch._dynamo.eval_frame.OptimizedModule)
    assert any(isinstance(m, lite3r.FP8Linear) for m in deployed.modules())
    with torch.no_grad():  # the deployed model (eagerly: compiling is minutes on CPU) runs on the README's images
        out, ref = deployed._orig_mod(scope["images"]), teacher(scope["images"])
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_readme_snippet_uses_these_calls():
    """The calls exercised below are the README's (so the test breaks when the snippet changes)."""
    snippet = _snippet()
    for call in ("lite3r.swap_attention(student, topk=0.05, fp8=True)", "lite3r.AttentionRecorder(teacher)",
                 "lite3r.AttentionRecorder(student)", "lite3r.distill_loss(rec_s.outputs, rec_t.outputs)",
                 "loss.backward(); opt.step()", "lite3r.deploy(student)"):
        assert call in snippet, call
    assert re.search(r"torch\.optim\.AdamW\(\[p for p in student\.parameters\(\) if p\.requires_grad\]", snippet)


def test_readme_example_runs_on_a_timm_like_vit(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")  # the PyTorch reference: the Triton interpreter is minutes on CPU
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)  # 257 tokens: 5 key blocks of 64, top-k keeps 1, the linear branch the rest

    # --- the README snippet (timm.create_model replaced by the tiny ViT) ---
    teacher = TinyViT().eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    report = lite3r.swap_attention(student, topk=0.05, fp8=True)
    print(report)

    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    with lite3r.AttentionRecorder(teacher) as rec_t, lite3r.AttentionRecorder(student) as rec_s:
        with torch.no_grad():
            teacher(images)
        student(images)
    loss = lite3r.distill_loss(rec_s.outputs, rec_t.outputs)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    loss.backward(); opt.step()
    trained = {n: p for n, p in student.named_parameters() if p.requires_grad}
    frozen_unchanged = all(torch.equal(p, before[n]) for n, p in student.named_parameters() if n not in trained)
    with torch.no_grad():
        ref = student(images)  # the trained QAT student (fake-quant FP8), before deploy converts it

    deployed = lite3r.deploy(student, compile=False)
    # --- checks ---
    assert report.attention_swapped == 2 and report.linear_swapped == 2 * 4  # qkv, proj, mlp fc1, fc2 per block
    assert "proj_l" in str(student) and report.trainable_params == 2 * (16 * 16 + 16) < report.total_params
    assert len(rec_t.outputs) == len(rec_s.outputs) == 2 and float(loss.detach()) > 0
    assert trained and all(".proj_l." in n for n in trained)
    for n, p in trained.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} received no gradient"
        assert not torch.equal(p.detach(), before[n]), f"{n} was not updated by opt.step()"
    assert frozen_unchanged
    assert any(isinstance(m, lite3r.FP8Linear) for m in deployed.modules())
    with torch.no_grad():
        out = deployed(images)
    assert out.shape == ref.shape == (2, 257, 64) and torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.05, f"deployed output differs from the student's by {rel:.3%}"


def test_readme_default_deploy_compiles():
    """`lite3r.deploy(student)` (the README call, compile=True by default) returns a torch.compile wrapper."""
    student = TinyViT(img=16)
    lite3r.swap_attention(student, topk=0.5, fp8=True)
    deployed = lite3r.deploy(student)
    assert isinstance(deployed, torch._dynamo.eval_frame.OptimizedModule)
    assert any(isinstance(m, lite3r.FP8Linear) for m in deployed.modules())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = deployed(images), deployed._orig_mod(images)  # compiled vs the same deployed model eagerly
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 1e-3


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
