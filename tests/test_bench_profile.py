"""`lite3r bench --profile`'s summary (cli/bench_profile.py): kernel times add up per category, modules and kernels
ranked by time, and the tables a person reads (one per path, and the paths side by side)."""
import pytest

pytest.importorskip("rich")
from rich.console import Console  # noqa: E402

from lite3r_cli.bench_profile import KERNEL_CATEGORIES, OTHER, compare_table, profile_tables, summarise  # noqa: E402

KERNELS = {  # name -> (GPU seconds, calls), names as an H200 profile of path (d) shows them
    "nvjet_sm90_qqtst_128x256_64x4_2x1_v_bz_coopA_TNT": (0.072, 192),
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": (0.008, 40),
    "_sla_fwd_kernel": (0.027, 24),
    "_op_fp8_rows_kernel": (0.011, 144),
    "_fp8_rows_kernel": (0.004, 48),
    "triton_per_fused_native_layer_norm_0": (0.05, 96),
    "triton_poi_fused_add_mul_1": (0.03, 96),
    "pytorch_flash::flash_fwd_kernel": (0.042, 24),
    "cudnn::implicit_convolve_sgemm": (0.036, 30),
    "mystery": (0.001, 1),
}
MODULES = {"aggregator": 0.29, "aggregator.patch_embed": 0.076, "depth_head": 0.042, "point_head": 0.041,
           "camera_head": 0.016}


def test_summarise_adds_up_and_ranks():
    prof = summarise(KERNELS, MODULES, 0.39, top=3)
    total = sum(s for s, _ in KERNELS.values())
    assert prof["gpu_kernel_s"] == pytest.approx(total)
    cats = prof["categories"]
    assert sum(c["s"] for c in cats.values()) == pytest.approx(total)
    assert sum(c["calls"] for c in cats.values()) == sum(n for _, n in KERNELS.values())
    assert sum(c["pct_gpu"] for c in cats.values()) == pytest.approx(100)
    assert cats["GEMM FP8"]["s"] == pytest.approx(0.072) and cats["GEMM FP8"]["calls"] == 192
    assert cats["FP8 quantise"]["s"] == pytest.approx(0.015) and cats["FP8 quantise"]["kernels"] == 2
    assert cats["norms/elementwise Triton"]["s"] == pytest.approx(0.08)
    assert cats[OTHER]["s"] == pytest.approx(0.001)
    assert set(cats) <= {name for name, _, _ in KERNEL_CATEGORIES} | {OTHER}
    times = [c["s"] for c in cats.values()]
    assert times == sorted(times, reverse=True)  # slowest category first
    assert list(prof["top_modules_s"]) == ["aggregator", "aggregator.patch_embed", "depth_head"]
    assert [k["kernel"] for k in prof["top_kernels"]] == ["nvjet_sm90_qqtst_128x256_64x4_2x1_v_bz_coopA_TNT",
                                                          "triton_per_fused_native_layer_norm_0",
                                                          "pytorch_flash::flash_fwd_kernel"]
    assert prof["top_kernels"][0]["category"] == "GEMM FP8"


def _text(renderable) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_tables_read():
    prof = summarise(KERNELS, MODULES, 0.39)
    cat, mod, ker = (_text(t) for t in profile_tables(prof, "profile of (d) at 32 views"))
    assert "wall 0.3900 s" in cat and "GEMM FP8" in cat and "0.0720" in cat and "192" in cat
    assert "  aggregator.patch_embed" in mod and "19.5" in mod  # nested rows indented, % of wall
    assert "_op_fp8_rows_kernel" in ker and "FP8 quantise" in ker
    faster = summarise({**KERNELS, "_op_fp8_rows_kernel": (0.001, 144)}, MODULES, 0.38)
    both = _text(compare_table({"c": prof, "d": faster}, "side by side"))
    row = next(line for line in both.splitlines() if "FP8 quantise" in line)
    assert "0.0150" in row and "0.0050" in row and "-0.0100" in row
    assert "wall" in both and "GPU kernels" in both
