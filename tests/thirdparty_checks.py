"""Checks shared by the third-party model tests (tests/test_thirdparty_*.py): one attention family at a time, on the
real class from its package (random init, small config, CPU, LITE3R_BACKEND=torch), with every 1-D parameter
(biases, q_bias / v_bias, norm weights) perturbed so that no bias is zero:

- swap at topk=1 without FP8 reproduces the model: max |student - teacher| / max |teacher| <= 1e-4 in fp32;
- the QAT student (FP8 fake quant, sparse topk): a distillation step gives gradients to the proj_l parameters and
  to nothing else;
- deploy(student, compile=False) computes what the fake-quant student computes (bit for bit, fp32 on CPU)."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import lite3r

PARITY = 1e-4  # max rel. err of the topk=1 swap in fp32 (the bound)


def import_or_skip(name: str, *attrs: str):
    """The package (and its lazily imported `attrs`), or a module-level skip naming why it does not import (timm
    needs a torchvision that loads beside this torch; PyPI's does not beside a CPU-only torch build, and transformers'
    models import torchvision when it is installed)."""
    try:
        module = importlib.import_module(name)
        for attr in attrs:
            getattr(module, attr)
        return module
    except Exception as e:  # ImportError, or torchvision's RuntimeError when its C ops do not load
        first = (str(e).splitlines() or [""])[0][:160]
        pytest.skip(f"{name} does not import here ({type(e).__name__}: {first})", allow_module_level=True)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Adds N(0, scale) to every 1-D parameter (biases, q_bias / v_bias, norm weights, layer scales): families that
    start them at zero would otherwise hide a dropped bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def swapped_classes(report: lite3r.SwapReport) -> dict[str, int]:
    return {cls: counts.get("swapped", 0) for cls, counts in report.by_class().items()}


def check_family(teacher: torch.nn.Module, run, *, swapped: int, block: int = 8, sparse_topk: float = 0.5,
                 **swap_kwargs) -> lite3r.SwapReport:
    """Parity at topk=1, QAT gradients into proj_l only, deploy = student; `run(model)` -> the output tensor.
    Returns the topk=1 swap's report (swapped: how many attention modules it must have swapped)."""
    teacher = teacher.eval().requires_grad_(False)
    with torch.no_grad():
        ref = run(teacher)
    dense = copy.deepcopy(teacher)
    report = lite3r.swap_attention(dense, topk=1.0, fp8=False, **swap_kwargs)
    assert report.attention_swapped == swapped, str(report)
    sla = [m for m in dense.modules() if isinstance(m, lite3r.SLAAttention)]
    assert len(sla) == swapped and not any(m.training for m in sla)  # the eval model's mode is kept
    with torch.no_grad():
        out = run(dense)
    assert out.shape == ref.shape and max_rel(out, ref) <= PARITY, f"topk=1 parity {max_rel(out, ref):.3g}"

    student = copy.deepcopy(teacher)
    lite3r.swap_attention(student, topk=sparse_topk, block_q=block, block_k=block, fp8=True, **swap_kwargs)
    assert any(isinstance(m, lite3r.FP8FakeQuantLinear) for m in student.modules())
    with lite3r.AttentionRecorder(teacher) as rec_t, lite3r.AttentionRecorder(student) as rec_s:
        with torch.no_grad():
            run(teacher)
        qat_out = run(student)
    assert len(rec_s.outputs) == len(rec_t.outputs) >= swapped
    loss = lite3r.distill_loss(rec_s.outputs, rec_t.outputs) + qat_out.float().square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all(".proj_l." in n for n in grads), sorted(grads)[:5]
    assert sum(".proj_l." in n for n, p in student.named_parameters()) == len(grads) == 2 * swapped
    assert all(float(g.abs().sum()) > 0 for g in grads.values()), "a proj_l received a zero gradient"

    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        want = run(student)
        deployed = lite3r.deploy(student, compile=False)
        assert any(isinstance(m, lite3r.FP8Linear) for m in deployed.modules())
        got = run(deployed)
    assert torch.isfinite(got).all() and torch.equal(got, want), f"deploy vs student {max_rel(got, want):.3g}"
    return report
