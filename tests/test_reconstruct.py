"""`lite3r reconstruct` (cli/reconstruct.py on lite3r_recon.pointcloud): unprojection, confidence filtering, PLY/GLB + JSON output,
overwrite refusal, one-line input errors; the tiny VGGT end to end, dense and as a lite3r student."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from lite3r_cli import reconstruct as R
from lite3r_recon import pointcloud as P

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def _camera(seed: int, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random w2c [R|t] and pixel intrinsics with skew, in float64."""
    g = torch.Generator().manual_seed(seed + 1)
    rot = _rotation(seed)
    t = torch.randn(3, generator=g, dtype=torch.float64)
    f = 20 + 80 * torch.rand(2, generator=g, dtype=torch.float64)
    K = torch.tensor([[f[0], 0.3, W / 2], [0, f[1], H / 2], [0, 0, 1]], dtype=torch.float64)
    return torch.cat([rot, t[:, None]], 1), K


def test_unproject_by_hand():
    """Identity pose: pixel (v=1, u=2) at depth 4 with f=2, c=(0,0) is (4, 2, 4); a camera at world position c
    looking along world +x sees a point at depth d straight ahead at c + d * x."""
    K = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1]])
    E = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)
    depth = torch.full((3, 4), 4.0)
    pts = P.unproject(depth, E, K)
    assert pts.shape == (3, 4, 3)
    assert torch.allclose(pts[1, 2], torch.tensor([4.0, 2.0, 4.0]))
    assert torch.allclose(pts[0, 0], torch.tensor([0.0, 0.0, 4.0]))
    # camera at c = (1, 2, 3) whose optical axis (z_cam) is world +x, y_cam = world -z (x_cam = world +y)
    rot = torch.tensor([[0.0, 1, 0], [0, 0, -1], [1, 0, 0]])  # rows: camera axes in world coordinates
    c = torch.tensor([1.0, 2.0, 3.0])
    E = torch.cat([rot, (-rot @ c)[:, None]], 1)
    K = torch.tensor([[10.0, 0, 2], [0, 10.0, 1], [0, 0, 1]])  # pixel (v=1, u=2) is the principal point
    pts = P.unproject(torch.full((1, 3, 4), 5.0), E[None], K[None])
    assert torch.allclose(pts[0, 1, 2], c + torch.tensor([5.0, 0, 0]))
    assert torch.allclose(P.camera_centers(E), c)
    # one pixel right (u=3): x_cam = 0.1 * 5 = 0.5 -> world +y
    assert torch.allclose(pts[0, 1, 3], c + torch.tensor([5.0, 0.5, 0]))


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 10_000), views=st.integers(1, 3))
def test_unprojected_points_reproject_to_their_pixel_and_depth(seed, views):
    H, W = 5, 7
    cams = [_camera(seed * 7 + i, H, W) for i in range(views)]
    E = torch.stack([c[0] for c in cams]).float()
    K = torch.stack([c[1] for c in cams]).float()
    depth = 0.5 + 10 * torch.rand(views, H, W, generator=torch.Generator().manual_seed(seed))
    pts = P.unproject(depth, E, K).double()
    cam = torch.einsum("sij,shwj->shwi", E[..., :3].double(), pts) + E[:, None, None, :, 3].double()
    pix = torch.einsum("sij,shwj->shwi", K.double(), cam)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    torch.testing.assert_close(cam[..., 2], depth.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pix[..., 0] / pix[..., 2], u.expand(views, H, W), rtol=0, atol=1e-3)
    torch.testing.assert_close(pix[..., 1] / pix[..., 2], v.expand(views, H, W), rtol=0, atol=1e-3)
    # camera centres: R c + t = 0
    c = P.camera_centers(E).double()
    torch.testing.assert_close(torch.einsum("sij,sj->si", E[..., :3].double(), c) + E[..., 3].double(),
                               torch.zeros(views, 3, dtype=torch.float64), rtol=0, atol=1e-4)


def test_point_cloud_filters_by_confidence_percentile_and_keeps_colours():
    S, H, W = 2, 4, 5
    images = torch.rand(S, 3, H, W)
    E = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand(S, 3, 4)
    K = torch.tensor([[5.0, 0, 2], [0, 5.0, 2], [0, 0, 1]]).expand(S, 3, 3)
    depth = torch.ones(S, H, W)
    depth[0, 0, 0] = float("nan")  # never kept
    depth[1, 0, 0] = -1.0  # behind the camera: never kept
    conf = torch.arange(S * H * W, dtype=torch.float32).reshape(S, H, W)
    cams = dict(extrinsics=E, intrinsics=K, depth=depth, depth_conf=conf)
    pts, col, stats, thr = P.point_cloud(images, cams, 50.0)
    assert thr == pytest.approx(19.5)  # median of 0..39
    assert pts.shape == (19, 3) and col.shape == (19, 3) and col.dtype == torch.uint8  # view 1 less its pixel 0
    assert [s["points_kept"] for s in stats] == [0, 19] and stats[0]["points_total"] == H * W
    expect = (images[1].permute(1, 2, 0).reshape(-1, 3) * 255).round().to(torch.uint8)[1:]
    assert torch.equal(col, expect)
    torch.testing.assert_close(pts, P.unproject(depth, E, K)[1].reshape(-1, 3)[1:])
    pts, col, stats, thr = P.point_cloud(images, cams, 0.0)
    assert pts.shape[0] == S * H * W - 2 and [s["points_kept"] for s in stats] == [H * W - 1, H * W - 1]
    for bad in (-1, 100, 150):
        with pytest.raises(ValueError, match="conf-percentile"):
            P.point_cloud(images, cams, bad)


def test_point_cloud_drops_padding_pixels():
    """Padding (load_images' mask False) yields no points, no statistics and no say in the confidence percentile."""
    S, H, W = 2, 4, 5
    E = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand(S, 3, 4)
    K = torch.tensor([[5.0, 0, 2], [0, 5.0, 2], [0, 0, 1]]).expand(S, 3, 3)
    conf = torch.arange(S * H * W, dtype=torch.float32).reshape(S, H, W)
    cams = dict(extrinsics=E, intrinsics=K, depth=torch.ones(S, H, W), depth_conf=conf)
    pixels = torch.ones(S, H, W, dtype=torch.bool)
    pixels[:, 0] = False  # the top row of both views is padding
    pts, _, stats, _ = P.point_cloud(torch.rand(S, 3, H, W), cams, 0.0, pixels)
    assert pts.shape[0] == S * (H - 1) * W and [s["points_total"] for s in stats] == [(H - 1) * W] * S
    _, _, _, thr = P.point_cloud(torch.rand(S, 3, H, W), cams, 50.0, pixels)
    assert thr == pytest.approx(float(conf[pixels].quantile(0.5)))
    with pytest.raises(ValueError, match="pixel mask"):
        P.point_cloud(torch.rand(S, 3, H, W), cams, 0.0, pixels[:, 1:])


# ------------------------------------------------------------------------------------------------ end to end
def _write_images(folder, colours, hw=(60, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(colours):
        p = folder / f"view{i}.png"
        Image.fromarray(np.tile(np.array(c, np.uint8), (*hw, 1))).save(p)
        paths.append(p)
    return paths


class FakeDA3(nn.Module):
    """Stands in for da3-tiny (to_cameras passes its outputs through): known cameras and depth, so the written
    point cloud can be checked point by point."""

    name = "da3-tiny"

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.cams = None

    def forward(self, images):
        B, S, _, H, W = images.shape
        cams = [_camera(100 + i, H, W) for i in range(S)]
        E = torch.stack([c[0] for c in cams]).float()[None]
        K = torch.stack([c[1] for c in cams]).float()[None]
        depth = 1 + torch.rand(B, S, H, W, generator=torch.Generator().manual_seed(0))
        conf = torch.rand(B, S, H, W, generator=torch.Generator().manual_seed(1))
        self.cams = dict(extrinsics=E, intrinsics=K, depth=depth, depth_conf=conf)
        return dict(self.cams)


def test_written_ply_and_json_hold_the_unprojected_points(tmp_path):
    paths = _write_images(tmp_path / "imgs", [RED, BLUE])
    net = FakeDA3()
    out, js = tmp_path / "scene.ply", tmp_path / "cams.json"
    s = R.reconstruct([tmp_path / "imgs"], model="da3-tiny", size=70, conf_percentile=25, out=out, json_path=js,
                      quiet=True, net=net)
    c = {k: v[0] for k, v in net.cams.items()}
    keep = c["depth_conf"] >= torch.quantile(c["depth_conf"].flatten().double(), 0.25).float()
    expected = P.unproject(c["depth"], c["extrinsics"], c["intrinsics"])[keep]
    cloud = trimesh.load(out)
    assert isinstance(cloud, trimesh.PointCloud)
    assert len(cloud.vertices) == s["points_kept"] == int(keep.sum()) == math.ceil(0.75 * keep.numel())
    np.testing.assert_allclose(cloud.vertices, expected.numpy(), rtol=1e-5, atol=1e-5)
    colours = np.asarray(cloud.colors)[:, :3]
    n0 = int(keep[0].sum())
    assert (colours[:n0] == RED).all() and (colours[n0:] == BLUE).all()
    meta = json.loads(js.read_text())
    assert meta["views"] == 2 and meta["image_hw"] == [56, 70] and meta["points_kept"] == s["points_kept"]
    assert [v["image"] for v in meta["cameras"]] == [str(p) for p in paths]
    assert [v["points_kept"] for v in meta["cameras"]] == [n0, int(keep[1].sum())]
    np.testing.assert_allclose(meta["cameras"][1]["extrinsics_w2c"], c["extrinsics"][1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(meta["cameras"][0]["intrinsics"], c["intrinsics"][0].numpy(), rtol=1e-6)
    # GLB holds the same points
    glb = tmp_path / "scene.glb"
    R.reconstruct(paths, model="da3-tiny", size=70, conf_percentile=25, out=glb, quiet=True, net=net, preview=False)
    geoms = list(trimesh.load(glb).geometry.values())
    assert sum(len(g.vertices) for g in geoms) == s["points_kept"]


def test_refuses_to_overwrite_without_the_flag(tmp_path):
    paths = _write_images(tmp_path / "imgs", [RED])
    out, js = tmp_path / "scene.ply", tmp_path / "cams.json"
    out.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        R.reconstruct(paths, model="da3-tiny", size=70, out=out, quiet=True, net=FakeDA3())
    assert out.read_text() == "mine"
    js.write_text("mine too")
    with pytest.raises(FileExistsError, match="cams.json"):
        R.reconstruct(paths, model="da3-tiny", size=70, out=tmp_path / "other.ply", json_path=js, quiet=True,
                      net=FakeDA3())
    assert js.read_text() == "mine too" and not (tmp_path / "other.ply").exists()
    R.reconstruct(paths, model="da3-tiny", size=70, out=out, json_path=js, overwrite=True, quiet=True, net=FakeDA3())
    assert len(trimesh.load(out).vertices) > 0 and json.loads(js.read_text())["views"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams.json", "imgs", "scene.ply", "scene.png"]  # no temp


@pytest.mark.parametrize("case, error, match", [
    ("empty", ValueError, "no images"),
    ("corrupt", ValueError, "bad.png: cannot read image"),
    ("missing", FileNotFoundError, "nope.png: no such image file"),
    ("model", ValueError, "--model 'vggt-2b': unknown backbone"),
    ("suffix", ValueError, "--out .*expected a .ply or .glb"),
    ("size", ValueError, "--size 50"),
    ("mode", ValueError, "--mode 'stretch'"),
    ("weights", FileNotFoundError, "--weights .*no such checkpoint"),
])
def test_bad_input_gives_one_line_errors(tmp_path, case, error, match):
    good = _write_images(tmp_path / "imgs", [RED])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    kw = dict(model="vggt-tiny", size=70, out=tmp_path / "o.ply", quiet=True)
    inputs = {"empty": [tmp_path / "empty"], "corrupt": [good[0], tmp_path / "bad.png"],
              "missing": [tmp_path / "nope.png"]}.get(case, good)
    kw.update({"model": {"model": "vggt-2b"}, "suffix": {"out": tmp_path / "o.obj"}, "size": {"size": 50},
               "mode": {"mode": "stretch"}, "weights": {"weights": tmp_path / "w.safetensors"}}.get(case, {}))
    with pytest.raises(error, match=match) as e:
        R.reconstruct(inputs, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o.ply").exists()


def test_vggt_tiny_dense_and_student(tmp_path, monkeypatch):
    """The real tiny VGGT: dense, then a lite3r student (non-zero proj_l) loaded through lite3r_recon.models.load_student.
    The student's SLA / FP8 ops run the PyTorch reference: the Triton interpreter takes minutes on a CPU."""
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    from safetensors.torch import save_file

    import lite3r
    from lite3r_recon import models
    from lite3r_recon.train_config import TrainConfig

    paths = _write_images(tmp_path / "imgs", [RED, BLUE])
    s = R.reconstruct(paths, model="vggt-tiny", size=70, conf_percentile=50, out=tmp_path / "d.ply",
                      json_path=tmp_path / "d.json", quiet=True, device="cpu")
    cloud = trimesh.load(tmp_path / "d.ply")
    assert len(cloud.vertices) == s["points_kept"] and 0 < s["points_kept"] <= s["points_total"] // 2 + 2
    assert s["points_total"] == 2 * 56 * 70 and np.isfinite(cloud.vertices).all()
    colours = {tuple(c) for c in np.asarray(cloud.colors)[:, :3].tolist()}
    assert colours <= {RED, BLUE}
    # per view: the kept points lie at the predicted depths in front of that view's camera
    meta = json.loads((tmp_path / "d.json").read_text())
    n0 = meta["cameras"][0]["points_kept"]
    for view, sl in ((0, slice(0, n0)), (1, slice(n0, None))):
        E = np.asarray(meta["cameras"][view]["extrinsics_w2c"])
        z = (cloud.vertices[sl] @ E[:, :3].T + E[:, 3])[:, 2]
        lo, hi = meta["cameras"][view]["depth_min"], meta["cameras"][view]["depth_max"]
        assert ((z > lo * (1 - 1e-4)) & (z < hi * (1 + 1e-4))).all()

    cfg = TrainConfig()
    student = models.make_student(models.dense_model(cfg.backbone, None, seed=cfg.seed), cfg.sla_config())
    params = {n: torch.randn_like(p) * 0.1 for n, p in student.named_parameters() if p.requires_grad}
    info = {"format": models.STUDENT_FORMAT, "backbone": cfg.backbone, "config": cfg.to_json(), "step": 1, "params": sorted(params),
            "teacher": None}
    save_file(params, str(tmp_path / "student.safetensors"), metadata={"lite3r_train": json.dumps(info)})
    net = models.load_model("vggt-tiny", student=tmp_path, device=torch.device("cpu"))
    assert any(isinstance(m, lite3r.SLAAttention) for m in net.modules())
    loaded = dict(net.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in params.items())
    s2 = R.reconstruct(paths, model="vggt-tiny", student=tmp_path, size=70, out=tmp_path / "s.ply", quiet=True,
                       device="cpu")
    assert s2["student"] == str(tmp_path) and len(trimesh.load(tmp_path / "s.ply").vertices) == s2["points_kept"] > 0
