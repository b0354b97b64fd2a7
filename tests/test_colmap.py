"""COLMAP export: a synthetic scene with exact cameras written, read back by pycolmap (counts, centres,
projections in COLMAP's +0.5 pixel convention), the original-image intrinsics, bundle adjustment, errors."""
import numpy as np
import pytest
import torch

pycolmap = pytest.importorskip("pycolmap")

from lite3r_recon.colmap import (ColmapScene, model_to_original, points_to_original, read_colmap,  # noqa: E402
                                 write_colmap)
from lite3r_recon.synthetic import render_sample  # noqa: E402


def _project(E: torch.Tensor, K: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """World points X [N, 3] -> pixels [N, 2] of camera (E w2c, K) (integer pixel centres)."""
    cam = X.double() @ E[:, :3].double().T + E[:, 3].double()
    uv = cam @ K.double().T
    return uv[:, :2] / uv[:, 2:]


def _scene(views: int = 3, n: int = 40, noise: float = 0.0) -> tuple[ColmapScene, dict]:
    """GT cameras of a synthetic scene, n points seen by every view (their exact projections, original pixels)."""
    s = render_sample(3, views=views, size=(70, 98))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.5
    X[:, 2] = X[:, 2].abs() + 0.2  # above the ground, near the scene centre the cameras look at
    xy = torch.stack([_project(s["extrinsics"][i], s["intrinsics"][i], X) for i in range(views)])  # [S, n, 2]
    ext = s["extrinsics"].clone().double()
    ext[1:, :, 3] += noise * torch.randn(views - 1, 3, generator=g, dtype=torch.float64)
    scene = ColmapScene(
        names=[f"view_{i:02d}.png" for i in range(views)], sizes=[(98, 70)] * views, extrinsics=ext.float(),
        intrinsics=s["intrinsics"], points=X.float(),
        colours=torch.randint(0, 256, (n, 3), generator=g).to(torch.uint8),
        obs_point=torch.arange(n).repeat(views), obs_view=torch.arange(views).repeat_interleave(n),
        obs_xy=xy.reshape(-1, 2).float())
    return scene, s


@pytest.mark.parametrize("binary", [True, False])
def test_written_model_reads_back(tmp_path, binary):
    scene, s = _scene()
    out = tmp_path / "sparse"
    summary = write_colmap(out, scene, binary=binary)
    assert summary["images"] == 3 and summary["points3D"] == 40 and summary["observations"] == 120
    assert summary["reprojection_error_px"] < 1e-3  # exact projections: the +0.5 shift is applied to both
    assert (out / ("images.bin" if binary else "images.txt")).is_file()
    rec = pycolmap.Reconstruction(str(out))
    assert rec.num_images() == 3 and rec.num_points3D() == 40 and rec.num_cameras() == 3
    for image in rec.images.values():
        i = int(image.name[5:7])
        R, t = s["extrinsics"][i, :, :3].double(), s["extrinsics"][i, :, 3].double()
        np.testing.assert_allclose(image.projection_center(), (-R.T @ t).numpy(), atol=1e-5)
        cam = rec.cameras[image.camera_id]
        assert (cam.width, cam.height) == (98, 70)
        K = s["intrinsics"][i].double()
        np.testing.assert_allclose(cam.params, [K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5], rtol=1e-6)
        # pycolmap's own projection of a point = our projection + 0.5 (COLMAP's pixel centres)
        X = scene.points[:5].double()
        ours = _project(s["extrinsics"][i], s["intrinsics"][i], X).numpy() + 0.5
        theirs = np.stack([cam.img_from_cam(image.cam_from_world() * x.numpy()) for x in X])
        np.testing.assert_allclose(theirs, ours, atol=1e-3)
    for pid, point in rec.points3D.items():
        assert point.track.length() == 3
        np.testing.assert_array_equal(point.color, scene.colours[pid - 1].numpy())
    back = read_colmap(out)
    assert back["names"] == scene.names and back["sizes"] == scene.sizes
    torch.testing.assert_close(back["extrinsics"], s["extrinsics"], atol=1e-5, rtol=0)
    torch.testing.assert_close(back["intrinsics"], s["intrinsics"], atol=1e-4, rtol=1e-6)


def test_bundle_adjustment_reduces_the_error(tmp_path):
    scene, _ = _scene(views=4, n=60, noise=0.05)
    summary = write_colmap(tmp_path / "ba", scene, bundle_adjust=True, refine_focal_length=False)
    assert summary["reprojection_error_px"] > 0.5
    assert summary["reprojection_error_px_after_ba"] < 0.1 * summary["reprojection_error_px"]


def test_original_image_geometry():
    """The pixel map of load_images (identity intrinsics in) takes network intrinsics / pixels back exactly."""
    A = torch.tensor([[[0.5, 0, -0.25 + 3], [0, 0.5, -0.25 - 7], [0, 0, 1]]], dtype=torch.float64)
    K0 = torch.tensor([[[300.0, 0, 199.5], [0, 310.0, 149.5], [0, 0, 1]]], dtype=torch.float64)
    K_net = A @ K0
    torch.testing.assert_close(model_to_original(A, K_net), K0)
    X = torch.tensor([[0.3, -0.2, 2.0]], dtype=torch.float64)
    uv0 = (X @ K0[0].T)[:, :2] / 2.0
    uv_net = (X @ K_net[0].T)[:, :2] / 2.0
    torch.testing.assert_close(points_to_original(A, uv_net[None]), uv0[None])


def test_refuses_to_overwrite_and_bad_scenes(tmp_path):
    scene, _ = _scene()
    write_colmap(tmp_path / "m", scene)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_colmap(tmp_path / "m", scene)
    write_colmap(tmp_path / "m", scene, overwrite=True, binary=False)
    assert (tmp_path / "m" / "images.txt").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_colmap(tmp_path / "no" / "such", scene)
    with pytest.raises(ValueError, match="colours"):
        ColmapScene(scene.names, scene.sizes, scene.extrinsics, scene.intrinsics, scene.points, scene.colours[:3],
                    scene.obs_point, scene.obs_view, scene.obs_xy)
    with pytest.raises(ValueError, match="obs_view out of range"):
        ColmapScene(scene.names, scene.sizes, scene.extrinsics, scene.intrinsics, scene.points, scene.colours,
                    scene.obs_point, scene.obs_view + 5, scene.obs_xy)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such COLMAP model folder"):
        read_colmap(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a COLMAP model"):
        read_colmap(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cameras.txt").write_text("1 OPENCV 100 80 90 91 50 40 0.1 0 0 0\n")
    (bad / "images.txt").write_text("1 1 0 0 0 0 0 0 1 a.png\n\n")
    (bad / "points3D.txt").write_text("")
    with pytest.raises(ValueError, match="OPENCV.*pinhole"):
        read_colmap(bad)
    (bad / "cameras.bin").write_bytes(b"\x00\x01")
    (bad / "cameras.txt").unlink()
    with pytest.raises(ValueError, match="cannot read the COLMAP model"):
        read_colmap(bad)


def _prediction(S: int = 3, H: int = 28, W: int = 42):
    """A prediction of a synthetic scene at network size, and the pixel map of a 2x resize + 5 px crop offset."""
    s = render_sample(5, views=S, size=(H, W))
    cams = {"extrinsics": s["extrinsics"], "intrinsics": s["intrinsics"],
            "depth": torch.where(s["mask"], s["depth"], 1.0)}
    A = torch.tensor([[0.5, 0, -0.25], [0, 0.5, -0.25 - 5], [0, 0, 1]], dtype=torch.float64).expand(S, 3, 3)
    sizes = [(2 * W, 2 * H + 10)] * S
    return s, cams, A, sizes


def test_scene_from_prediction_dense(tmp_path):
    from lite3r_recon.colmap import scene_from_prediction

    s, cams, A, sizes = _prediction()
    keep = s["mask"].clone()
    scene = scene_from_prediction([f"dir/v{i}.png" for i in range(3)], sizes, A, s["images"], cams, keep,
                                  max_points=500)
    assert scene.names == ["v0.png", "v1.png", "v2.png"] and len(scene.points) == 500
    assert scene.obs_xy[:, 1].min() >= -0.5 and scene.obs_xy[:, 1].max() <= sizes[0][1] - 0.5
    torch.testing.assert_close(scene.intrinsics, model_to_original(A, s["intrinsics"]).float())
    summary = write_colmap(tmp_path / "dense", scene)
    # each point projects back onto its own pixel of the ORIGINAL image: the pixel map is applied consistently
    assert summary["points3D"] == 500 and summary["reprojection_error_px"] < 1e-3


def test_scene_from_prediction_tracks(tmp_path):
    from lite3r_recon.colmap import grid_queries, scene_from_prediction

    s, cams, A, sizes = _prediction()
    q = grid_queries(s["mask"][0], 30)
    assert 0 < len(q) <= 30 and bool(s["mask"][0][q[:, 1].long(), q[:, 0].long()].all())
    # exact tracks: frame-0 points projected into every view
    from lite3r_recon.pointcloud import unproject

    X = unproject(cams["depth"], cams["extrinsics"], cams["intrinsics"])[0][q[:, 1].long(), q[:, 0].long()]
    track = torch.stack([_project(s["extrinsics"][i], s["intrinsics"][i], X) for i in range(3)]).float()
    vis = torch.ones(3, len(q))
    vis[2, :5] = 0.1  # not seen in view 2 (below 0.2)
    scene = scene_from_prediction(["a.png", "b.png", "c.png"], sizes, A, s["images"], cams, s["mask"],
                                  tracks={"query": q, "track": track, "vis": vis, "conf": torch.ones(3, len(q))})
    inside = ((track[..., 0] >= -0.5) & (track[..., 0] <= 41.5) & (track[..., 1] >= -0.5) & (track[..., 1] <= 27.5))
    seen = inside & (vis >= 0.2)
    multi = seen.sum(0) >= 2  # queries seen only in frame 0 are not tracks
    assert 0 < len(scene.points) == int(multi.sum()) < len(q)
    assert len(scene.obs_point) == int(seen[:, multi].sum())
    summary = write_colmap(tmp_path / "tracks", scene, bundle_adjust=True)
    assert summary["reprojection_error_px"] < 1e-3 and summary["reprojection_error_px_after_ba"] < 1e-3
    assert grid_queries(torch.zeros(5, 5, dtype=torch.bool), 10).shape == (0, 2)


# ------------------------------------------------------------------------------------------------ through the CLI
def _lite3r(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, LITE3R_BACKEND="torch")
    return subprocess.run([sys.executable, "-m", "lite3r_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def synthetic_scene(tmp_path_factory):
    """A synthetic scene on disk (BlendedMVS layout, 160x120 images) and its exact intrinsics as --intrinsics JSON."""
    import json

    from lite3r_recon import formats
    from lite3r_recon.synthetic import write_scene

    root = write_scene(tmp_path_factory.mktemp("scene") / "scene", seed=1, views=3, size=(120, 160))
    cams = sorted((root / "cams").glob("*_cam.txt"))
    known = [{"image": c.name.replace("_cam.txt", ".jpg"), "intrinsics": formats.read_cam(c).intrinsic.tolist()}
             for c in cams]
    (root / "known.json").write_text(json.dumps({"cameras": known}))
    return root, np.stack([np.asarray(k["intrinsics"]) for k in known])


def test_cli_colmap_export_of_a_synthetic_scene(tmp_path, synthetic_scene):
    """`lite3r reconstruct --colmap`: pycolmap reads the model; one image per view with the camera centres of the
    cameras JSON, the given intrinsics of the original 160x120 images (COLMAP's +0.5), the kept points (coloured);
    then --ba on tracks of the tracking head lowers the reprojection error; a preview PNG beside the cloud."""
    import json

    root, K = synthetic_scene
    sparse, js = tmp_path / "sparse", tmp_path / "cams.json"
    r = _lite3r("reconstruct", root / "blended_images", "--model", "vggt-tiny", "--size", 112, "--device", "cpu",
                "--intrinsics", root / "known.json", "--colmap", sparse, "--json", js, "--out", tmp_path / "s.ply")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s.png").is_file()
    meta = json.loads(js.read_text())
    rec = pycolmap.Reconstruction(str(sparse))
    assert rec.num_images() == 3 and rec.num_cameras() == 3
    assert rec.num_points3D() == min(meta["points_kept"], 100_000) == meta["colmap"]["points3D"]
    by_name = {im.name: im for im in rec.images.values()}
    for i, view in enumerate(meta["cameras"]):
        image = by_name[f"{i:08d}.jpg"]
        np.testing.assert_allclose(image.projection_center(), view["center"], atol=1e-4)
        cam = rec.cameras[image.camera_id]
        assert (cam.width, cam.height) == (160, 120)
        np.testing.assert_allclose(cam.params, [K[i, 0, 0], K[i, 1, 1], K[i, 0, 2] + 0.5, K[i, 1, 2] + 0.5], rtol=1e-5)
    assert meta["colmap"]["reprojection_error_px"] < 1e-2  # every point on its own pixel of the original image
    colours = np.stack([p.color for p in rec.points3D.values()])
    assert colours.std() > 0

    ba = _lite3r("reconstruct", root / "blended_images", "--model", "vggt-tiny", "--size", 140, "--device", "cpu",
                 "--intrinsics", root / "known.json", "--colmap", tmp_path / "ba", "--colmap-text", "--ba",
                 "--tracks", 64, "--json", tmp_path / "ba.json", "--out", tmp_path / "ba.ply", "--no-preview")
    assert ba.returncode == 0, ba.stderr[-2000:]
    info = json.loads((tmp_path / "ba.json").read_text())["colmap"]
    assert info["format"] == "text" and (tmp_path / "ba" / "points3D.txt").is_file()
    assert 0 < info["points3D"] <= 64 and info["reprojection_error_px_after_ba"] < info["reprojection_error_px"]
    assert not (tmp_path / "ba.png").exists()


@pytest.mark.parametrize("args, match", [
    (["--intrinsics", "{bad}"], r"--intrinsics .*bad.json: not valid JSON"),
    (["--cameras", "{root}/known.json"], "--cameras: poses condition DA3 models only"),
    (["--ba"], "--ba: bundle adjustment refines the COLMAP model: give --colmap DIR"),
    (["--tracks", "-1"], "--tracks -1"),
])
def test_cli_bad_camera_and_colmap_options(tmp_path, synthetic_scene, args, match):
    import re

    root, _ = synthetic_scene
    (tmp_path / "bad.json").write_text("{\"cameras\": [")
    args = [a.format(bad=tmp_path / "bad.json", root=root) for a in args]
    r = _lite3r("reconstruct", root / "blended_images", "--model", "vggt-tiny", "--size", 70, "--device", "cpu",
                "--out", tmp_path / "o.ply", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), r.stderr[-2000:]
    assert not (tmp_path / "o.ply").exists()
