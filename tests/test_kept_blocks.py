"""Sparsity as a count (issue 17): `kept_blocks` key blocks per query block next to the kept fraction, exact K in
sla_attention (reference and kernels), carried by SLAConfig / SLAAttention / the student JSON / the deploy artifact,
and exposed by `lite3r train|bench|export --kept-blocks N`, with the bench reporting the K and fraction it ran."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lite3r

FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


class Attn(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, pos=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def record_kept(monkeypatch, module, name):
    """Wraps module.name (a block-map function returning a LUT) to record each LUT's K."""
    seen, fn = [], getattr(module, name)

    def spy(*args, **kwargs):
        lut = fn(*args, **kwargs)
        seen.append(lut.shape[-1])
        return lut

    monkeypatch.setattr(module, name, spy)
    return seen


def test_kept_fraction_gives_exactly_k_where_k_over_mk_does_not():
    """For every Mk <= 400 and K <= Mk + 3: the fraction sla_attention passes gives K = min(K, Mk) through the ceil
    both lite3r and the kernels apply; the naive K / Mk gives K + 1 for some (the reason for the half block)."""
    naive_wrong = 0
    for n_k in range(1, 401):
        for kept in range(1, n_k + 4):
            frac = lite3r._kept_fraction(kept, n_k)
            assert lite3r._num_kept(frac, n_k) == min(kept, n_k), (kept, n_k)
            assert lite3r.num_kept_blocks(n_k * 64 - 5, topk=0.5, kept_blocks=kept) == min(kept, n_k)
            naive_wrong += kept < n_k and math.ceil(kept / n_k * n_k) != kept
    assert naive_wrong > 0
    assert lite3r.num_kept_blocks(1374 * 32, topk=0.05) == math.ceil(0.05 * 687)  # no count: the fraction's K
    kernels = pytest.importorskip("lite3r_kernels")
    if kernels.AVAILABLE:
        assert all(kernels.sla.num_kept(lite3r._kept_fraction(kk, m), m) == min(kk, m)
                   for m in range(1, 300) for kk in range(1, m + 2))


@FAST
@given(N=st.integers(1, 400), block=st.sampled_from([8, 16, 32]), kept=st.integers(1, 60), seed=st.integers(0, 99))
def test_sla_attention_keeps_exactly_kept_blocks(N, block, kept, seed):
    """Reference path: the LUT has K = min(kept, Mk) columns whatever topk says, and the output is the reference's
    over that LUT (the top-K blocks of lite3r.sla_block_map at K); all blocks kept = dense attention."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, N, 16, generator=gen) for _ in range(3))
    n_k = -(-N // block)
    with pytest.MonkeyPatch.context() as mp:
        seen = record_kept(mp, lite3r, "_block_map")
        out = lite3r.sla_attention(q, k, v, topk=0.9, block_q=block, block_k=block, kept_blocks=kept)
    assert seen == [min(kept, n_k)]
    lut = lite3r._block_map(q, k, lite3r._kept_fraction(kept, n_k), block, block)
    want = lite3r.sla_reference(q, k, v, lut, block_q=block, block_k=block)[0]
    assert torch.equal(out, want)
    if kept >= n_k:
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_kernels_keep_exactly_kept_blocks(monkeypatch):
    """Kernel path (Triton interpreter on CPU): the LUT the fused forward gets has K = kept_blocks, for counts where
    kept / Mk would round to K + 1 (7 of 25 key blocks); output = the reference's at that K."""
    kernels = pytest.importorskip("lite3r_kernels")
    if not kernels.AVAILABLE or not kernels.supports(torch.zeros(1)):
        pytest.skip("needs triton (interpreter on CPU)")
    from lite3r_kernels.sla import attention

    monkeypatch.setenv("LITE3R_BACKEND", "triton")
    gen = torch.Generator().manual_seed(3)
    N, block = 25 * 16 - 3, 16  # Mk = 25
    q, k, v = (torch.randn(1, 1, N, 16, generator=gen) for _ in range(3))
    for kept in (7, 14):
        assert math.ceil(kept / 25 * 25) == kept + 1  # the naive fraction is wrong here
        seen = record_kept(monkeypatch, attention, "sla_block_map")
        out = lite3r.sla_attention(q, k, v, topk=0.01, block_q=block, block_k=block, kept_blocks=kept)
        assert seen == [kept]
        monkeypatch.setenv("LITE3R_BACKEND", "torch")
        want = lite3r.sla_attention(q, k, v, topk=0.01, block_q=block, block_k=block, kept_blocks=kept)
        monkeypatch.setenv("LITE3R_BACKEND", "triton")
        assert (out - want).abs().max() < 1e-4


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_kept_blocks_validated(bad):
    with pytest.raises(lite3r.Lite3rError, match="kept_blocks"):
        lite3r.SLAConfig(kept_blocks=bad)
    with pytest.raises(lite3r.Lite3rError, match="kept_blocks"):
        lite3r.SLAAttention(Attn(), kept_blocks=bad)
    q = torch.randn(1, 1, 64, 16)
    # the typed() check (on in the tests) may refuse a non-int first, naming the argument too
    with pytest.raises((lite3r.Lite3rError, TypeError), match="kept_blocks"):
        lite3r.sla_attention(q, q, q, topk=0.5, block_q=16, block_k=16, kept_blocks=bad)


def test_config_carries_kept_blocks_to_modules_and_json(monkeypatch):
    """SLAConfig(kept_blocks) -> every swapped SLAAttention (attribute, repr, and the K its forward selects); the JSON
    round trip keeps it; None (the default) keeps the fraction."""
    cfg = lite3r.SLAConfig(topk=0.5, kept_blocks=3, scopes=None)
    assert lite3r.SLAConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert lite3r.SLAConfig().kept_blocks is None and lite3r.SLAConfig.from_json({"topk": 0.1}).kept_blocks is None
    net = nn.Sequential(Attn(), Attn())
    assert lite3r.convert_to_sla(net, cfg) == 2
    assert [m.kept_blocks for m in net] == [3, 3] and "kept_blocks=3" in repr(net[0])
    seen = record_kept(monkeypatch, lite3r, "_block_map")
    net(torch.randn(1, 200, 32))  # Mk = 4 at 64-token blocks: the fraction 0.5 would keep 2
    assert seen == [3, 3]


def test_train_config_and_student_json(tmp_path):
    """TrainConfig(kept_blocks) -> its SLAConfig; the saved student's JSON and load_student keep it."""
    from lite3r_backbones import build_backbone
    from lite3r_recon import models
    from lite3r_recon.errors import InvalidInput
    from lite3r_recon.train_config import TrainConfig

    cfg = TrainConfig(kept_blocks=5)
    assert cfg.sla_config().kept_blocks == 5 and TrainConfig().sla_config().kept_blocks is None
    assert TrainConfig.from_json(cfg.to_json()).kept_blocks == 5
    for bad in (0, 1.5):
        with pytest.raises(InvalidInput, match="--kept-blocks"):
            TrainConfig(kept_blocks=bad)
    teacher = build_backbone("vggt-tiny").eval()
    student = models.make_student(teacher, cfg.sla_config())
    path = tmp_path / "student.safetensors"
    models.save_student(student, path, {"backbone": "vggt-tiny"})
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["sla_config"]["kept_blocks"] == 5
    assert models.student_config(info)[0].kept_blocks == 5
    loaded = models.load_student(path, teacher)
    assert {m.kept_blocks for m in loaded.modules() if isinstance(m, lite3r.SLAAttention)} == {5}


def test_cli_export_kept_blocks_round_trip(tmp_path):
    """`lite3r export --kept-blocks 2`: the artifact's per-module settings and SLAConfig carry it, load_artifact's
    modules run with it."""
    from typer.testing import CliRunner

    from lite3r_cli.app import app
    from lite3r_recon import models

    out = tmp_path / "tiny.lite3r.safetensors"
    result = CliRunner().invoke(app, ["export", "--out", str(out), "--kept-blocks", "2"])
    assert result.exit_code == 0, result.output
    config = models.read_artifact_config(out)
    assert config["sla"] and {s["kept_blocks"] for s in config["sla"].values()} == {2}
    assert config["sla_config"]["kept_blocks"] == 2
    model = models.load_artifact(out)
    assert {m.kept_blocks for m in model.modules() if isinstance(m, lite3r.SLAAttention)} == {2}
    old = {**config, "sla": {k: {n: v for n, v in s.items() if n != "kept_blocks"} for k, s in config["sla"].items()}}
    with torch.device("meta"):  # an artifact written before kept_blocks existed: the fraction, as it was
        from safetensors.torch import load_file

        skeleton = models._skeleton(old, load_file(str(out)))
    assert {m.kept_blocks for m in skeleton.modules() if isinstance(m, lite3r.SLAAttention)} == {None}


@pytest.mark.parametrize("command", ["train", "bench", "export"])
def test_cli_rejects_bad_kept_blocks(command):
    """Through the console entry point: exit code 2 and one line naming --kept-blocks, before anything is built."""
    proc = subprocess.run([sys.executable, "-m", "lite3r_cli", command, "--kept-blocks", "0",
                           *(["--device", "cpu"] if command != "export" else ["--out", "/nonexistent/x"])],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "kept-blocks" in lines[0].replace("_", "-"), \
        proc.stderr


def test_bench_reports_kept_blocks_and_fraction(tmp_path):
    """`lite3r bench --kept-blocks 2` (tiny, CPU): the SLA rows report K = 2 of Mk key blocks (Mk from the tokens of
    the first SLA module: 2 views of 105 tokens at 64-token blocks) and K / Mk; the dense row none; the table shows
    them; with the fraction, K is the kernels' ceil(topk * Mk)."""
    from typer.testing import CliRunner

    from lite3r_cli.app import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--views", "2", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                                      "--variants", "b,c", "--kept-blocks", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    by = {r["variant"]: r for r in data["results"]}
    assert by["b"]["kept_blocks"] is None and by["b"]["kept_frac"] is None
    tokens = 2 * (5 + (140 // 14) ** 2)  # camera + 4 register tokens + 10 x 10 patches per view
    assert by["c"]["key_blocks"] == -(-tokens // 64) and by["c"]["kept_blocks"] == 2
    assert by["c"]["kept_frac"] == pytest.approx(2 / by["c"]["key_blocks"])
    assert "kept_blocks=2" in result.output and f"2 / {by['c']['key_blocks']}" in result.output
    out2 = tmp_path / "bench2.json"
    result = CliRunner().invoke(app, ["bench", "--views", "2", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                                      "--variants", "c", "--topk", "0.3", "--json", str(out2)])
    assert result.exit_code == 0, result.output
    row = json.loads(out2.read_text())["results"][0]
    assert row["kept_blocks"] == math.ceil(0.3 * row["key_blocks"])


def test_sparsity_watch_is_traced_without_graph_break():
    """The bench's pre-hook on the first SLA module under torch.compile: no graph break, and it still reports."""
    from torch._dynamo.testing import CompileCounter

    from lite3r_cli.bench import watch_sparsity

    torch._dynamo.reset()
    net = nn.Sequential(Attn(), Attn())
    lite3r.convert_to_sla(net, lite3r.SLAConfig(kept_blocks=3, scopes=None))
    used = watch_sparsity(net)
    counter = CompileCounter()
    torch.compile(net, backend=counter, fullgraph=True)(torch.randn(1, 300, 32))
    assert counter.frame_count == 1
    assert used() == {"key_blocks": 5, "kept_blocks": 3, "kept_frac": 3 / 5}
