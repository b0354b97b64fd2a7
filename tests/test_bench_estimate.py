"""Dense paths past --dense-max-views (issue 17): not run, their latency estimated from the measured per-layer cost
(lite3r_recon.layer_cost), marked in the table and the JSON; the shapes the estimate times are the ones the blocks
see at that many views."""
import json

import pytest
import torch
from typer.testing import CliRunner

from lite3r_cli import bench
from lite3r_recon import models
from lite3r_recon.deploy import repeated_blocks
from lite3r_recon.layer_cost import estimate_latency


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")  # PyTorch references, not the kernels in the interpreter


def _seen_shapes(model, views, res):
    """(block class, input shapes) of every block call of a real forward at `views`."""
    seen = []
    hooks = [b.register_forward_pre_hook(
        lambda m, a, k: seen.append((type(m).__name__, [list(t.shape) for t in [*a, *k.values()]
                                                        if isinstance(t, torch.Tensor)])), with_kwargs=True)
        for b in repeated_blocks(model)]
    models.infer(model, torch.rand(1, views, 3, res, res))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["vggt-tiny", "da3-tiny"])
def test_estimate_times_the_shapes_the_blocks_see(name):
    """From 2- and 4-view forwards, the estimate's groups at 7 views have exactly the input shapes (and call counts)
    a 7-view forward gives its blocks; timed directly or extrapolated from 1/8 and 1/4 of the growing sizes, every
    group's time is positive and the total is blocks + rest."""
    model = models.dense_model(name)
    seen = _seen_shapes(model, 7, 56)
    for direct in (128, 0):
        est = estimate_latency(model, lambda images: models.infer(model, images), 7, res=56,
                               device=torch.device("cpu"), direct_views=direct, repeats=1)
        got: dict = {}  # (class, shapes) -> calls (blocks of one class may differ in weights: q/k norm or not)
        for g in est["groups"]:
            got[g["block"], repr(g["shapes"])] = got.get((g["block"], repr(g["shapes"])), 0) + g["calls"]
        want: dict = {}
        for b, s in seen:
            want[b, repr(s)] = want.get((b, repr(s)), 0) + 1
        assert got == want
        assert all(g["seconds"] > 0 for g in est["groups"]) and est["rest_s"] >= 0
        assert est["latency_s"] == pytest.approx(est["blocks_s"] + est["rest_s"])
        assert est["blocks_s"] == pytest.approx(sum(g["calls"] * g["seconds"] for g in est["groups"]))
        assert all(("1/8" in g["how"]) == (direct == 0) for g in est["groups"])


def test_bench_estimates_dense_paths_past_dense_max_views(tmp_path):
    """--dense-max-views 4 with views 2,6: (b) measured at 2 views, estimated at 6 (no memory, no error, 'est.' in
    the table, `estimated` and its per-layer groups in the JSON); (c) measured at both, its speed-up against the
    estimate. The default (256) leaves small runs as they were: nothing estimated."""
    from lite3r_cli.app import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "vggt-tiny", "--views", "2,6", "--variants", "b,c", "--res", "56",
                                      "--dense-max-views", "4", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "est." in result.output
    rows = {(r["variant"], r["views"]): r for r in json.loads(out.read_text())["results"]}
    est = rows["b", 6]
    assert est["estimated"] and est["peak_gib"] is None and est["depth_rel"] is None and est["latencies_s"] == []
    assert est["latency_s"] == pytest.approx(est["estimate"]["latency_s"]) and est["estimate"]["groups"]
    assert not rows["b", 2].get("estimated") and not rows["c", 6].get("estimated")
    assert rows["c", 6]["speedup_vs_b"] == pytest.approx(est["latency_s"] / rows["c", 6]["latency_s"])
    assert rows["c", 6]["err_ref"] == "c"  # the first measured path at 6 views is the error reference
    assert bench.BenchConfig().dense_max_views == 256
    with pytest.raises(ValueError, match="dense-max-views"):
        bench.BenchConfig(dense_max_views=-1)
