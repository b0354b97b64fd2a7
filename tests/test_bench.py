"""`lite3r bench` on CPU: the tiny config, every path, the table and the JSON; and the small pure helpers."""
import json

import pytest
from typer.testing import CliRunner

from lite3r_recon import bench


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """The PyTorch references of lite3r, not the Triton kernels through the CPU interpreter (conftest sets
    TRITON_INTERPRET=1): these tests are about deployment and benchmarking, the kernels have their own tests."""
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def test_cli_bench_tiny_on_cpu(tmp_path):
    """`lite3r bench --views 2` on CPU: tiny config, four paths, table printed, JSON with latency, ratios and errors."""
    from lite3r_cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--views", "2", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "tiny config" in result.output and "(d)" in result.output
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["variant"] for r in rows] == ["a", "b", "c", "d"] and data["backbone"] == "vggt-tiny"
    for r in rows:
        assert r["latency_s"] > 0 and r["views"] == 2 and r["speedup_vs_a"] > 0 and r["speedup_vs_b"] > 0
        assert r["depth_rel"] >= 0 and r["extrinsics_rel"] >= 0
    assert rows[0]["depth_rel"] == 0.0  # (a) is the reference
    # the same file again is refused before anything runs
    again = CliRunner().invoke(app, ["bench", "--views", "2", "--device", "cpu", "--json", str(out)])
    assert again.exit_code != 0


def test_cli_bench_rejects_bad_values():
    from lite3r_cli import app

    for args in (["bench", "--views", "two"], ["bench", "--res", "500"], ["bench", "--variants", "a,z"],
                 ["bench", "--topk", "0"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0
        assert isinstance(result.exception, (ValueError, SystemExit)), args


def test_parse_views():
    assert bench.parse_views("8,32,128") == (8, 32, 128)
    assert bench.parse_views("2") == (2,)
    for bad in ("", "a", "0", "4,-1"):
        with pytest.raises(ValueError):
            bench.parse_views(bad)


def test_resolve_backbone():
    import torch

    assert bench.resolve_backbone("vggt", torch.device("cpu")) == "vggt-tiny"
    assert bench.resolve_backbone("da3", torch.device("cuda")) == "da3-large"
    assert bench.resolve_backbone("vggt-tiny", torch.device("cuda")) == "vggt-tiny"


@pytest.mark.parametrize("kernel, category", [
    ("_sla_fwd_kernel", "SLA"),
    ("pytorch_flash::flash_fwd_kernel<...>", "dense attention"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n", "FP8 GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "GEMM"),
    ("cudnn::implicit_convolve_sgemm", "convolution"),
    ("triton_poi_fused_add_mul_0", "fused elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4>", "elementwise"),
    ("mystery", "other"),
], ids=lambda x: x if len(x) < 20 else x[:20])
def test_categorise(kernel, category):
    assert bench.categorise(kernel).startswith(category)


def test_rel_err_zero_and_spread():
    import torch

    ref = torch.tensor([1.0, 1.1, 0.9, 1.0])
    assert bench.rel_err(ref, ref) == {"rel": 0.0, "rel_spread": 0.0}
    errs = bench.rel_err(ref + 0.01, ref)
    assert errs["rel_spread"] > errs["rel"] > 0
