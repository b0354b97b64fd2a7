"""lite3r.py model surgery on a tiny timm-like ViT written here: swap_attention (counts, frozen set, exact outputs
at topk=1, report), AttentionRecorder + distill_loss, to_fp8_inference / deploy, and the import contract."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lite3r

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


# ------------------------------------------------------------------------------------------------ tiny ViT
def rope_1d(t, pos):
    """A rotary embedding as a plain callable rope(t [B,H,N,D], pos [B,N,2]) (rotates pairs by pos[..., 0])."""
    D = t.shape[-1]
    freq = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=t.dtype, device=t.device) / D))
    ang = pos[..., :1].to(t.dtype)[:, None] * freq  # [B, 1, N, D/2]
    t1, t2 = t[..., 0::2], t[..., 1::2]
    return torch.stack([t1 * ang.cos() - t2 * ang.sin(), t1 * ang.sin() + t2 * ang.cos()], -1).flatten(-2)


class Attention(nn.Module):
    """timm-style: qkv / proj / num_heads, optional q_norm/k_norm (LayerNorm over D) and rope, SDPA."""

    def __init__(self, dim, heads, *, qk_norm=False, rope=None, scope=None):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.rope = rope
        if scope is not None:
            self.scope = scope

    def forward(self, x, pos=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, **attn):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, **attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, pos=None):
        x = x + self.attn(self.norm1(x), pos=pos)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """patch embed 12 -> 32 (12 is not a multiple of 16: stays plain), 4 blocks of alternating scope, a head
    32 -> 10 (not a multiple of 16 either). Blocks 1 and 3 use q/k norm and a rope callable."""

    def __init__(self, dim=32, heads=2, depth=4):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, qk_norm=i % 2 == 1, rope=rope_1d if i % 2 else None,
                                          scope="frame" if i % 2 == 0 else None) for i in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x, pos=None):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x, pos)
        return self.head(x)


def _inputs(B=2, N=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 12, generator=g)
    pos = torch.stack([torch.arange(N), torch.zeros(N, dtype=torch.long)], -1).expand(B, N, 2)
    return x, pos


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return TinyViT().eval()


# ------------------------------------------------------------------------------------------------- swap
def test_is_attention(teacher):
    found = [fqn for fqn, m in teacher.named_modules() if lite3r.is_attention(m)]
    assert found == [f"blocks.{i}.attn" for i in range(4)]
    fake = nn.Module()
    fake.qkv, fake.proj, fake.num_heads = nn.Linear(4, 12), nn.Linear(4, 4), True  # bool is not a head count
    assert not lite3r.is_attention(fake) and not lite3r.is_attention(nn.Linear(4, 4))


def test_swap_counts_frozen_set_and_report(teacher):
    student = copy.deepcopy(teacher)
    total_before = sum(p.numel() for p in teacher.parameters())
    report = lite3r.swap_attention(student, topk=0.5, block_q=8, block_k=8)
    assert isinstance(report, lite3r.SwapReport)
    sla = {fqn: m for fqn, m in student.named_modules() if isinstance(m, lite3r.SLAAttention)}
    assert list(sla) == [f"blocks.{i}.attn" for i in range(4)] and report.attention_swapped == 4
    # fp8: qkv, proj, fc1, fc2 per block (all multiples of 16); not embed (12 in), head (10 out) nor proj_l
    fq = [fqn for fqn, m in student.named_modules() if isinstance(m, lite3r.FP8FakeQuantLinear)]
    assert report.linear_swapped == len(fq) == 16
    assert "embed" not in fq and "head" not in fq and not any("proj_l" in f for f in fq)
    assert type(student.embed) is nn.Linear and type(sla["blocks.0.attn"].proj_l) is nn.Linear
    trainable = sorted(n for n, p in student.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"blocks.{i}.attn.proj_l.{w}" for i in range(4) for w in ("weight", "bias"))
    assert report.trainable_params == 4 * (16 * 16 + 16)
    assert report.total_params == total_before + report.trainable_params
    for m in sla.values():
        assert (m.topk, m.block_q, m.block_k, m.feature_map) == (0.5, 8, 8, "softmax")
        assert not m.proj_l.weight.any() and not m.proj_l.bias.any()
    assert sla["blocks.0.attn"].scope == "frame" and sla["blocks.1.attn"].scope == "global"
    assert sla["blocks.1.attn"].rope is rope_1d and isinstance(sla["blocks.1.attn"].q_norm, nn.LayerNorm)
    text = str(report)
    for value in ("4", "16", f"{report.trainable_params:,}", f"{report.total_params:,}"):
        assert value in text


def test_state_dict_keys_kept(teacher):
    student = copy.deepcopy(teacher)
    lite3r.swap_attention(student)
    keys = set(student.state_dict())
    assert keys - set(teacher.state_dict()) == {f"blocks.{i}.attn.proj_l.{w}" for i in range(4)
                                                for w in ("weight", "bias")}
    assert set(teacher.state_dict()) <= keys
    fresh = copy.deepcopy(student)
    missing, unexpected = fresh.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(".proj_l." in k for k in missing)


@pytest.mark.parametrize("with_pos", [True, False], ids=["rope", "no-pos"])
def test_topk1_no_fp8_is_the_teacher(teacher, with_pos):
    student = copy.deepcopy(teacher)
    lite3r.swap_attention(student, topk=1.0, block_q=8, block_k=16, fp8=False)
    x, pos = _inputs()
    with torch.no_grad():
        assert torch.equal(student(x, pos if with_pos else None), teacher(x, pos if with_pos else None))
        assert not torch.equal(student(x, pos), student(x, None))  # the rope callable is applied
        # sparse, or fp8: no longer the teacher, but close
        sparse = copy.deepcopy(teacher)
        lite3r.swap_attention(sparse, topk=0.25, block_q=8, block_k=8, fp8=False)
        fp8 = copy.deepcopy(teacher)
        lite3r.swap_attention(fp8, topk=1.0)
        ref = teacher(x, pos)
        for model in (sparse, fp8):
            out = model(x, pos)
            assert not torch.equal(out, ref) and (out - ref).norm() < 0.2 * ref.norm()


def test_filter_and_callable_topk(teacher):
    student = copy.deepcopy(teacher)
    seen = []

    def topk(module, fqn):
        seen.append(fqn)
        return 0.25 if getattr(module, "scope", "global") == "global" else 1.0

    report = lite3r.swap_attention(student, topk=topk, filter=lambda m, fqn: fqn != "blocks.3.attn",
                                   fp8_filter=lambda m, fqn: fqn.endswith("mlp.0"))
    assert seen == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert [student.blocks[i].attn.topk for i in range(3)] == [1.0, 0.25, 1.0]
    assert type(student.blocks[3].attn) is Attention and report.attention_swapped == 3
    assert report.linear_swapped == 4 and isinstance(student.blocks[0].mlp[0], lite3r.FP8FakeQuantLinear)
    assert type(student.blocks[0].mlp[2]) is nn.Linear
    assert not any(p.requires_grad for p in student.blocks[3].parameters())
    # swapping again swaps nothing new and keeps exactly proj_l trainable
    again = lite3r.swap_attention(student, fp8=False, filter=lambda m, fqn: fqn != "blocks.3.attn")
    assert again.attention_swapped == 0 and again.trainable_params == report.trainable_params


def test_swap_errors(teacher):
    with pytest.raises(ValueError, match="topk"):
        lite3r.swap_attention(copy.deepcopy(teacher), topk=0.0)
    with pytest.raises(ValueError, match="feature_map"):
        lite3r.swap_attention(copy.deepcopy(teacher), feature_map="cos")
    with pytest.raises(ValueError, match="itself"):
        lite3r.swap_attention(Attention(32, 2))


def test_custom_scale_and_masks_are_refused(teacher):
    """A softmax scale other than head_dim**-0.5, or a real attention mask / bias, would be silently wrong under
    SLA: refused with a one-line error; the None defaults timm and DINOv2 pass still work."""
    odd = copy.deepcopy(teacher)
    odd.blocks[0].attn.scale = 0.5
    with pytest.raises(ValueError, match=r"scale is 0\.5"):
        lite3r.swap_attention(odd)
    student = copy.deepcopy(teacher)
    student.blocks[1].attn.scale = (32 // 2) ** -0.5  # the default value is fine
    lite3r.swap_attention(student, fp8=False)
    attn = student.blocks[0].attn
    x = torch.randn(1, 20, 32)
    assert attn(x, attn_mask=None, attn_bias=None).shape == x.shape
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_bias"):
        attn(x, attn_bias=torch.zeros(20, 20))


def test_attention_dropout_refused_in_training_only(teacher):
    """The replaced module's attention dropout (nn.Dropout as in timm, or a float dropout_p) cannot be applied by
    SLA: training with p > 0 is refused with a one-line error; eval (dropout off) runs; p = 0 trains."""
    x = torch.randn(1, 20, 32)
    for drop in (torch.nn.Dropout(0.1), 0.1):
        student = copy.deepcopy(teacher)
        student.blocks[0].attn.attn_drop = drop
        lite3r.swap_attention(student, fp8=False)
        attn = student.blocks[0].attn
        assert attn.eval()(x).shape == x.shape
        with pytest.raises(ValueError, match=r"attention dropout \(p=0\.1\)"):
            attn.train()(x)
    student = copy.deepcopy(teacher)
    student.blocks[0].attn.attn_drop = torch.nn.Dropout(0.0)
    lite3r.swap_attention(student, fp8=False)
    assert student.blocks[0].attn.train()(x).shape == x.shape


def test_training_step_moves_only_proj_l(teacher):
    student = copy.deepcopy(teacher)
    lite3r.swap_attention(student, topk=0.5, block_q=8, block_k=8, feature_map="elu")
    before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    x, pos = _inputs()
    with lite3r.AttentionRecorder(teacher) as t, lite3r.AttentionRecorder(student) as s:
        with torch.no_grad():
            teacher(x, pos)
        student(x, pos)
    loss = lite3r.distill_loss(s.outputs, t.outputs)
    loss.backward()
    opt.step()
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".proj_l." in k for k in changed)
    assert {k.rsplit(".", 2)[0] for k in changed} == {f"blocks.{i}.attn" for i in range(4)}


# ------------------------------------------------------------------------------------- recorder + distill
def test_recorder_alignment_and_select(teacher):
    student = copy.deepcopy(teacher)
    lite3r.swap_attention(student, topk=1.0, fp8=False)
    x, pos = _inputs()
    with torch.no_grad():
        with lite3r.AttentionRecorder(teacher) as t, lite3r.AttentionRecorder(student) as s:
            teacher(x, pos)
            student(x, pos)
        assert t.names == s.names == [f"blocks.{i}.attn" for i in range(4)]
        for a, b in zip(t.outputs, s.outputs):
            assert a.shape == (2, 37, 32) and torch.equal(a, b)
        assert lite3r.distill_loss(s.outputs, t.outputs) == 0
        teacher(x, pos)  # hooks are gone after exit, outputs stay
        assert len(t.outputs) == 4
        # the recorded tensor is the module's output
        direct = teacher.blocks[0].attn(teacher.blocks[0].norm1(teacher.embed(x)), pos=pos)
        assert torch.equal(t.outputs[0], direct)
        cases = {"global": ["blocks.1.attn", "blocks.3.attn"], (0, -1): ["blocks.0.attn", "blocks.3.attn"]}
        for select, names in cases.items():
            for model in (teacher, student):
                with lite3r.AttentionRecorder(model, select=list(select) if isinstance(select, tuple)
                                              else select) as r:
                    model(x, pos)
                assert r.names == names
        with lite3r.AttentionRecorder(student, select=lambda m, fqn: fqn.startswith("blocks.2")) as r:
            student(x, pos)
            student(x, pos)  # called twice: both calls recorded
        assert r.names == ["blocks.2.attn"] * 2
    with pytest.raises(IndexError):
        lite3r.AttentionRecorder(teacher, select=[4])
    with pytest.raises(TypeError):
        lite3r.AttentionRecorder(teacher, select="frames")


def test_distill_loss_values_and_errors():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 5, 8, generator=g, requires_grad=True), torch.randn(3, 4, generator=g, requires_grad=True)]
    t = [torch.randn(2, 5, 8, generator=g), torch.randn(3, 4, generator=g)]
    mse = [((a - b) ** 2).mean() for a, b in zip(s, t)]
    torch.testing.assert_close(lite3r.distill_loss(s, t), (mse[0] + mse[1]) / 2)
    torch.testing.assert_close(lite3r.distill_loss(s, t, weights=[3.0, 1.0]), (3 * mse[0] + mse[1]) / 4)
    lite3r.distill_loss(s, t).backward()
    assert s[0].grad is not None and s[1].grad is not None
    low = lite3r.distill_loss([x.detach().bfloat16() for x in s], [x.bfloat16() for x in t])
    assert low.dtype == torch.float32  # computed in fp32 whatever comes in
    with pytest.raises(ValueError, match="2 student outputs vs 1 teacher"):
        lite3r.distill_loss(s, t[:1])
    with pytest.raises(ValueError, match="pair 1"):
        lite3r.distill_loss(s, [t[0], t[1].T])
    with pytest.raises(ValueError, match="no outputs"):
        lite3r.distill_loss([], [])
    with pytest.raises(ValueError, match="weights"):
        lite3r.distill_loss(s, t, weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        lite3r.distill_loss(s, t, weights=[1.0, -1.0])


# --------------------------------------------------------------------------------------------------- deploy
def test_to_fp8_inference_and_deploy(teacher):
    student = copy.deepcopy(teacher)
    lite3r.swap_attention(student, topk=0.5, block_q=8, block_k=8)
    x, pos = _inputs()
    with torch.no_grad():
        ref = student(x, pos)
        dep = lite3r.deploy(copy.deepcopy(student), compile=False)
        assert sum(isinstance(m, lite3r.FP8Linear) for m in dep.modules()) == 16
        assert not any(isinstance(m, lite3r.FP8FakeQuantLinear) for m in dep.modules())
        assert not dep.training and not any(p.requires_grad for p in dep.parameters())
        assert all(lite3r.is_attention(b.attn) for b in dep.blocks)  # still found by structure
        out = dep(x, pos)
        assert float((out - ref).norm() / ref.norm()) < 1e-2  # W8A8 vs fake quant (or activation rounding)
    plain = lite3r.to_fp8_inference(copy.deepcopy(teacher), fp8_filter=lambda m, fqn: fqn == "head")
    assert isinstance(plain.head, lite3r.FP8Linear) and type(plain.embed) is nn.Linear
    assert isinstance(lite3r.to_fp8_inference(lite3r.FP8FakeQuantLinear.from_linear(nn.Linear(16, 16))),
                      lite3r.FP8Linear)
    compiled = lite3r.deploy(copy.deepcopy(student))  # compiles on the first call
    with torch.no_grad():
        got = compiled(x, pos)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert float((got - out).norm() / out.norm()) < 1e-3  # the compiled deployed model computes the eager one


# --------------------------------------------------------------------------------------------------- import
def _run(code, **env):
    full = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=120)


def test_import_without_triton_typer_kernels():
    r = _run("""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "typer", "kernels", "lite3r_kernels"):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Blocker())
        import torch
        import lite3r
        assert lite3r._kernels() is None  # copied alone into a codebase: the PyTorch reference runs
        assert not {"triton", "typer", "kernels", "lite3r_kernels"} & set(sys.modules), sorted(sys.modules)
        q = torch.randn(1, 2, 20, 8)
        o = lite3r.sla_attention(q, q, q, topk=0.5, block_q=8, block_k=8, proj_l=torch.nn.Linear(8, 8))
        lite3r.fp8_fake_quant(q, axis=-1)
        print("ok", tuple(o.shape))
        """, LITE3R_BACKEND="auto", TRITON_INTERPRET="1")
    assert r.returncode == 0 and "ok (1, 2, 20, 8)" in r.stdout, r.stderr


def test_import_is_lazy():
    """Importing lite3r imports neither kernels nor triton (they load on the first dispatch)."""
    r = _run("""
        import sys, lite3r
        assert not {"triton", "kernels", "lite3r_kernels", "typer"} & set(sys.modules), sorted(sys.modules)
        print("lazy")
        """)
    assert r.returncode == 0 and "lazy" in r.stdout, r.stderr


def test_typecheck_switch():
    r = _run("""
        import torch, lite3r
        f = lambda x: x
        assert lite3r.TYPECHECK is False and lite3r.typed(f) is f
        q = torch.randn(2, 20, 8)  # 3-D: would fail the shape check
        try:
            lite3r.sla_attention(q, q, q, topk=1.0)
        except Exception as e:
            print("unchecked:", type(e).__name__)
        """, LITE3R_TYPECHECK="0", LITE3R_BACKEND="torch")
    assert r.returncode == 0 and "unchecked:" in r.stdout and "Type" not in r.stdout, r.stdout + r.stderr
    if lite3r.TYPECHECK:
        q = torch.randn(2, 20, 8)
        with pytest.raises(Exception) as e:
            lite3r.sla_attention(q, q, q, topk=1.0)
        assert "Type" in type(e.value).__name__ or "type" in str(e.value).lower()


def test_typed_is_skipped_while_compiling(monkeypatch):
    """Under torch.compile tracing the checker is bypassed (dynamo would graph-break on it): a call that fails the
    type check eagerly goes straight to the function when is_compiling() is True."""
    if not lite3r.TYPECHECK:
        pytest.skip("LITE3R_TYPECHECK=0")
    q = torch.randn(2, 20, 8)
    with pytest.raises(Exception, match="[Tt]ype"):
        lite3r.fp8_fake_quant(q.int(), axis=-1)  # ints are not Float
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert lite3r.fp8_fake_quant(q.int(), axis=-1).dtype == torch.int32  # unchecked: the body just runs


@pytest.mark.gpu
def test_cuda_compiled_and_w8a8(monkeypatch):
    """On a GPU: reference SLA block compiles with fullgraph and matches eager; FP8 scale math is bit-identical
    compiled vs eager; FP8Linear runs W8A8 on sm90+ and agrees with fake quant to bf16 output rounding."""
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    torch.manual_seed(0)
    model = TinyViT().cuda()
    lite3r.swap_attention(model, topk=0.5, block_q=8, block_k=8)
    x, pos = (t.cuda() for t in _inputs())
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, pos), model(x, pos), rtol=1e-4,
                                   atol=1e-4)
        a = (torch.randn(128, 96, device="cuda") * torch.logspace(-8, 8, 96, device="cuda")).bfloat16()
        eager = lite3r.fp8_fake_quant(a, axis=-1)
        assert torch.equal(torch.compile(lambda t: lite3r.fp8_fake_quant(t, axis=-1), fullgraph=True)(a), eager)
        dep = lite3r.to_fp8_inference(copy.deepcopy(model))
        ok = lite3r._scaled_mm_ok(x.device)
        assert ok == (torch.cuda.get_device_capability() >= (9, 0))
        lin = dep.blocks[0].mlp[0]
        h = torch.randn(3, 37, 32, device="cuda", dtype=torch.bfloat16)
        ref = model.blocks[0].mlp[0](h.float())
        torch.testing.assert_close(lin(h).float(), ref, rtol=2e-2, atol=2e-2)
