"""Deployment: FP8Linear vs the fake-quant linear it came from, the deployed tiny student vs the QAT student, and the
artifact round trip (bit-identical tensors, identical outputs). CPU, seconds."""
import copy
import json

import pytest
import torch
from torch import nn

import lite3r
from lite3r_recon import deploy, models


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """The PyTorch references of lite3r, not the Triton kernels through the CPU interpreter (conftest sets
    TRITON_INTERPRET=1): these tests are about deployment and benchmarking, the kernels have their own tests."""
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def _tiny_student(topk: float = 0.25, fp8: bool = True) -> nn.Module:
    """vggt-tiny as a QAT student with non-zero proj_l, so the linear branch counts in the outputs."""
    from lite3r_backbones import build_backbone

    torch.manual_seed(0)
    model = models.make_student(build_backbone("vggt-tiny").eval(), lite3r.SLAConfig(topk=topk), fp8=fp8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_l" in name:
                p.normal_(0, 0.05)
    return model.eval()


def _images(views: int = 2, size: int = 56) -> torch.Tensor:
    return torch.rand(1, views, 3, size, size, generator=torch.Generator().manual_seed(1))


def _spread_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """|x - ref| over the spread of ref (random weights give small spreads around a large mean)."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / (ref - ref.mean()).norm())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("shape", [(3, 48), (2, 7, 48), (1, 48)], ids=["tokens", "batch-odd", "single-token"])
def test_fp8_linear_matches_fake_quant(shape):
    """Each deployed FP8Linear computes what its FP8FakeQuantLinear computed (same quantised weights and activation
    scales), within fp32 rounding when W8A8 runs and within the activation-quantisation error when weight-only."""
    torch.manual_seed(0)
    qat = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 32))
    lite3r.convert_to_fp8_qat(qat)  # no attention here: swap_attention would refuse
    assert all(isinstance(m, lite3r.FP8FakeQuantLinear) for m in (qat[0], qat[2]))
    x = torch.randn(*shape, 48)
    x.view(-1, 48)[-1] = 0.0  # an all-zero token: its scale is clamped, its output is the bias
    with torch.no_grad():
        ref = qat(x)
        dep = deploy.deploy_model(copy.deepcopy(qat), dtype=torch.float32, compile_mode=None)
        assert all(isinstance(m, lite3r.FP8Linear) for m in (dep[0], dep[2]))
        assert dep[0].weight.dtype == torch.float8_e4m3fn and dep[0].weight_scale.dtype == torch.float32
        out = dep(x)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-2, rel


def test_fp8_weights_are_the_fake_quant_weights():
    """The stored float8 weight times its per-row scale is exactly the fake-quantised weight."""
    torch.manual_seed(0)
    qat = nn.Sequential(nn.Linear(64, 32))
    lite3r.convert_to_fp8_qat(qat)  # no attention here: swap_attention would refuse
    w_dq = lite3r.fp8_fake_quant(qat[0].weight.detach(), axis=-1)
    dep = deploy.deploy_model(copy.deepcopy(qat), dtype=torch.float32, compile_mode=None)
    w = dep[0].weight.float() * dep[0].weight_scale.float().reshape(-1, 1)
    torch.testing.assert_close(w, w_dq, rtol=0, atol=0)


def _cams(out: dict, hw) -> dict:
    from lite3r_backbones import to_cameras

    return {k: v.float() for k, v in to_cameras("vggt-tiny", out, hw).items() if k in ("depth", "extrinsics")}


def test_deployed_tiny_student_matches_qat_student():
    """Deployed (FP8Linear, eager) vs the fp32 QAT student it came from, as error over each output's spread.
    fp32 deployment: only the GEMM path differs, within 1e-3. bf16 deployment: within twice the error of running
    the QAT student itself in bf16 (+1e-3), the flash-attention rule for a lower-precision path."""
    student = _tiny_student()
    images = _images()
    hw = images.shape[-2:]
    with torch.no_grad():
        ref = _cams(student(images), hw)
        bf16_qat = deploy.cast_floating(copy.deepcopy(student), torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base = _cams(bf16_qat(images), hw)
        outs = {}
        for dtype in (torch.float32, torch.bfloat16):
            dep = deploy.deploy_model(copy.deepcopy(student), dtype=dtype, compile_mode=None)
            assert any(isinstance(m, lite3r.FP8Linear) for m in dep.modules())
            assert not any(isinstance(m, lite3r.FP8FakeQuantLinear) for m in dep.modules())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                outs[dtype] = _cams(dep(images), hw)
    for key in ("depth", "extrinsics"):
        assert torch.isfinite(outs[torch.bfloat16][key]).all()
        assert _spread_err(outs[torch.float32][key], ref[key]) < 1e-3, key
        budget = 2 * _spread_err(base[key], ref[key]) + 1e-3
        assert _spread_err(outs[torch.bfloat16][key], ref[key]) < budget, key


def test_artifact_round_trip(tmp_path):
    """save_artifact -> load_artifact rebuilds the model from the file alone: same tensors bit for bit (fp8 weights,
    fp32 scales, bf16 rest), same outputs, SLA settings kept; refuses to overwrite; rejects a foreign file."""
    from safetensors.torch import save_file

    student = _tiny_student(topk=0.5)
    dep = deploy.deploy_model(student, dtype=torch.bfloat16, compile_mode=None)
    path = tmp_path / "tiny.lite3r.safetensors"
    config = models.save_artifact(dep, path)
    assert config["backbone"] == "vggt-tiny" and config["sla"]
    loaded = models.load_artifact(path)

    sd_a, sd_b = dep.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert any(v.dtype == torch.float8_e4m3fn for v in sd_b.values())
    for key in sd_a:
        assert sd_a[key].dtype == sd_b[key].dtype, key
        assert torch.equal(_bits(sd_a[key]), _bits(sd_b[key])), key
    assert models._sla_settings(loaded) == models._sla_settings(dep)

    images = _images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, out_b = dep(images), loaded(images)
    for key, val in out_a.items():
        if isinstance(val, torch.Tensor):
            assert torch.equal(val, out_b[key]), key

    with pytest.raises(FileExistsError):
        models.save_artifact(dep, path)
    foreign = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a lite3r deploy artifact"):
        models.load_artifact(foreign)


def test_cast_floating_keeps_fp8():
    """Module.to(bf16) would turn float8 weights into bf16; cast_floating leaves FP8Linear alone."""
    qat = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))
    lite3r.convert_to_fp8_qat(qat)  # no attention here: swap_attention would refuse
    dep = deploy.deploy_model(qat, dtype=torch.bfloat16, compile_mode=None)
    assert dep[0].weight.dtype == torch.float8_e4m3fn and dep[0].weight_scale.dtype == torch.float32
    assert dep[1].weight.dtype == torch.bfloat16


def test_cli_export_writes_a_loadable_artifact(tmp_path):
    """`lite3r export --out F` (fresh vggt-tiny student): the artifact loads with FP8Linear and SLA modules, and the
    same path again is refused without --overwrite."""
    from typer.testing import CliRunner

    from lite3r_cli.app import app

    out = tmp_path / "tiny.lite3r.safetensors"
    result = CliRunner().invoke(app, ["export", "--out", str(out), "--topk", "0.5"])
    assert result.exit_code == 0, result.output
    model = models.load_artifact(out)
    assert any(isinstance(m, lite3r.FP8Linear) for m in model.modules())
    assert {m.topk for m in model.modules() if isinstance(m, lite3r.SLAAttention)} == {0.5}
    again = CliRunner().invoke(app, ["export", "--out", str(out)])
    assert again.exit_code != 0 and isinstance(again.exception, FileExistsError)


@pytest.mark.slow
def test_exported_artifact_runs_in_eval_reconstruct_and_bench(tmp_path):
    """`lite3r export RUN` of a tiny trained student: the artifact is what `--student` loads in eval, reconstruct and
    bench (detected: one door, models.load_model); it takes fp32 inputs without the caller's autocast (the same
    outputs as under bf16 autocast, bit for bit), and its results equal the student's within bf16 + FP8 rounding.
    `--out` that is not .safetensors is one error line, nothing written."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from lite3r_cli import bench, evaluate, reconstruct
    from lite3r_cli.app import app
    from lite3r_recon.errors import InvalidInput
    from lite3r_recon.synthetic import render_sample

    student = models.make_student(models.dense_model("vggt-tiny"), lite3r.SLAConfig(topk=0.5))
    with torch.no_grad():
        for p in models.trainable(student).values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    models.save_student(student, tmp_path / "run" / "student.safetensors", {"backbone": "vggt-tiny"})
    art = tmp_path / "tiny.lite3r.safetensors"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(art)])
    assert result.exit_code == 0, result.output
    assert models.read_artifact_config(art)["teacher_source"]["kind"] == "shipped"

    net = models.load_model("vggt-tiny", student=art)
    assert any(isinstance(m, lite3r.FP8Linear) for m in net.modules())
    images = _images()
    with torch.no_grad():
        plain = net(images)  # fp32 images, no autocast around it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wrapped = net(images)
        ref = _cams(student(images), images.shape[-2:])
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain if torch.is_tensor(plain[k]))
    for key, val in _cams(plain, images.shape[-2:]).items():
        assert _spread_err(val, ref[key]) < 0.05, key  # bf16 + FP8 GEMMs vs the fp32 QAT student (measured 0.01)

    runs = {}
    for name, path in (("student", tmp_path / "run"), ("artifact", art)):
        runs[name] = evaluate.evaluate("vggt-tiny", student=path, max_scenes=1, views=2, quiet=True, device="cpu")
    for k in ("abs_rel", "rmse", "chamfer", "delta1"):  # measured: within 0.5 %
        a, s = runs["artifact"]["mean"][k], runs["student"]["mean"][k]
        assert abs(a - s) <= 0.03 * abs(s) + 1e-3, (k, a, s)
    for k in ("rot_err", "trans_err"):  # degrees, one view pair: the session-11 teacher's camera head reads the
        a, s = runs["artifact"]["mean"][k], runs["student"]["mean"][k]  # features, FP8 moves it (measured 2.0 deg)
        assert abs(a - s) <= 4.0, (k, a, s)

    sample = render_sample(7, views=2, size=(56, 70))
    paths = []
    for i, view in enumerate(sample["images"]):
        paths.append(tmp_path / f"view{i}.png")
        Image.fromarray((np.asarray(view).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(paths[-1])
    cams = {}
    for name, path in (("student", tmp_path / "run"), ("artifact", art)):
        reconstruct.reconstruct(paths, model="vggt-tiny", student=path, size=70, out=tmp_path / f"{name}.ply",
                                json_path=tmp_path / f"{name}.json", quiet=True, device="cpu", preview=False)
        cams[name] = json.loads((tmp_path / f"{name}.json").read_text())["cameras"]
    for a, s in zip(cams["artifact"], cams["student"]):
        assert np.abs(np.subtract(a["extrinsics_w2c"], s["extrinsics_w2c"])).max() < 0.05
        assert abs(a["depth_max"] - s["depth_max"]) <= 0.05 * s["depth_max"]

    cfg = bench.BenchConfig(model="vggt-tiny", views=(2,), res=56, student=str(art), device="cpu", variants=("a", "d"))
    rows = {r["variant"]: r for r in bench.run_bench(cfg, log=lambda line: None)["results"]}
    assert rows["d"]["latency_s"] > 0 and np.isfinite(rows["d"]["depth_rel"])  # (a): the teacher it records

    bad = tmp_path / "art.ply"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(bad)])
    assert isinstance(result.exception, InvalidInput) and ".safetensors" in str(result.exception)
    assert not bad.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["sla", "sla+fp8"])
def test_deployed_student_compiles_with_the_sla_kernels_gpu(monkeypatch, fp8):
    """Paths (c) and (d) as `lite3r bench` builds them: the SLA kernels (auto backend) traced into the compiled
    blocks under bf16 autocast with no graph break. Compiled and eager bf16 differ by rounding only: each within
    twice the eager bf16 model's error against the same model deployed in fp32 (+1e-3)."""
    from lite3r_recon.models import infer as forward

    monkeypatch.setenv("LITE3R_BACKEND", "auto")
    student = _tiny_student(fp8=fp8)
    images = _images(views=4, size=126).cuda()
    hw = images.shape[-2:]
    ref = deploy.deploy_model(copy.deepcopy(student), device="cuda", dtype=torch.float32, compile_mode=None)
    eager = deploy.deploy_model(copy.deepcopy(student), device="cuda", compile_mode=None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = deploy.deploy_model(student, device="cuda", compile_mode="default")
    want, base, got = (_cams(forward(m, images), hw) for m in (ref, eager, compiled))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for key in ("depth", "extrinsics"):
        budget = 2 * _spread_err(base[key].cpu(), want[key].cpu()) + 1e-3
        assert _spread_err(got[key].cpu(), want[key].cpu()) < budget, key


def test_export_from_the_official_vggt_1b_state_dict(shared_reference, tmp_path):
    """`lite3r export` of the official-format VGGT-1B checkpoint (the recipe state dict, tracking head included):
    loaded strictly with no skipped prefix, deployed (FP8 linears, SLA on global attention) and written as one
    artifact whose header holds the backbone, the SLA modules and the SLAConfig."""
    import importlib.util

    from safetensors import safe_open

    from lite3r_cli import export as export_cmd

    spec = importlib.util.spec_from_file_location("weights_recipe", shared_reference / "weights_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sd = recipe.recipe_state_dict(str(shared_reference / "vggt_1b_state_dict_manifest.json"))
    n_track = sum(k.startswith("track_head.") for k in sd)
    assert n_track == 394  # what the official file carries and `export` must not refuse
    out = tmp_path / "vggt-1b.lite3r.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = export_cmd.export(out=out, model="vggt-1b", weights=sd, topk=0.05)
    finally:
        torch.set_num_threads(threads)
    del sd
    assert config["backbone"] == "vggt-1b" and len(config["sla"]) == 24  # the 24 global attention layers
    assert config["sla_config"]["topk"] == 0.05 and config["sla_config"]["scopes"] == ["global"]
    assert models.read_artifact_config(out) == json.loads(json.dumps(config))  # the header, as JSON
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert sum(k.startswith("track_head.") for k in keys) >= n_track  # the head is deployed, not dropped
        assert f.get_slice("aggregator.global_blocks.0.attn.qkv.weight").get_dtype() in ("F8_E4M3", "float8_e4m3fn")
