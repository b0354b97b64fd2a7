"""recon.synthetic (exact, consistent geometry; deterministic) and recon.datasets (loaders return the cameras and
depth that generated a scene; bad files are skipped with a warning naming them)."""
import warnings

import numpy as np
import pytest
import torch

from lite3r_recon import datasets, formats, synthetic


def _project(points, E, K):
    cam = points @ E[:3, :3].T + E[:3, 3]
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:3], cam[:, 2]


def test_render_sample_shapes_and_determinism():
    a = synthetic.render_sample(3, views=2, size=(42, 56))
    b = synthetic.render_sample(3, views=2, size=(42, 56))
    c = synthetic.render_sample(4, views=2, size=(42, 56))
    assert a["images"].shape == (2, 3, 42, 56) and a["depth"].shape == (2, 42, 56)
    assert a["extrinsics"].shape == (2, 3, 4) and a["intrinsics"].shape == (2, 3, 3)
    assert a["images"].min() >= 0 and a["images"].max() <= 1 and a["mask"].dtype == torch.bool
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["depth"], c["depth"])
    assert 0.3 < a["mask"].float().mean() < 1.0  # geometry and some background
    torch.testing.assert_close(a["depth"] > 0, a["mask"])


def test_depth_reprojects_consistently_across_views():
    s = synthetic.render_sample(7, views=8, size=(70, 84))  # neighbouring views on the arc
    from lite3r_backbones.cameras import unproject_depth

    pts = unproject_depth(s["depth"][None].double(), s["extrinsics"][None].double(), s["intrinsics"][None].double())[0]
    H, W = s["depth"].shape[1:]
    for i, j in [(0, 1), (6, 7), (7, 6)]:
        p = pts[i][s["mask"][i]]
        uv, z = _project(p, s["extrinsics"][j].double(), s["intrinsics"][j].double())
        u, v = uv[:, 0].round().long(), uv[:, 1].round().long()
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H) & (z > 0)
        dj = s["depth"][j].double()[v[inside], u[inside]]
        zi = z[inside]
        rel = (zi - dj).abs() / zi
        visible = rel < 0.02  # points of view i seen by view j land on j's depth
        assert inside.sum() > 500
        assert visible.float().mean() > 0.6, (i, j, visible.float().mean())  # the rest: occluded in view j
        assert rel[visible].median() < 0.01  # exact geometry: only nearest-pixel rounding remains
        # the rest are occluded in view j: behind j's surface, not in front of it (up to pixels at object edges)
        assert ((zi - dj) / zi < -0.05).float().mean() < 0.03


def _scene(tmp_path, views=4, size=56, seed=11, image_format="jpg"):
    d = synthetic.write_scene(tmp_path / "scene_0000", seed=seed, views=views, size=size, image_format=image_format)
    return d, synthetic.make_scene(seed, views, size)


def test_loader_returns_generating_cameras_and_depth(tmp_path):
    d, scene = _scene(tmp_path, image_format="png")
    ds = datasets.open_dataset("synthetic", tmp_path, size=56)
    assert len(ds) == 1
    s = ds.sample(0, views=4)
    np.testing.assert_allclose(s["extrinsics"].numpy(), scene.extrinsics, atol=1e-6)
    np.testing.assert_allclose(s["intrinsics"].numpy(), scene.intrinsics, atol=1e-4)
    for i in range(4):
        img, depth = synthetic.render_view(scene, i)
        assert torch.equal(s["depth"][i], depth)  # PFM keeps float32 exactly
        assert (s["images"][i] - img).abs().max() <= 0.5 / 255 + 1e-6  # PNG: 8-bit rounding only
    torch.testing.assert_close(s["mask"], s["depth"] > 0)
    pairs = formats.read_pair(d / "cams" / "pair.txt")
    assert sorted(pairs) == [0, 1, 2, 3] and all(len(v) == 3 for v in pairs.values())
    # random view choice follows pair.txt: the reference and its best neighbours
    r = ds.sample(0, views=2, rng=np.random.default_rng(0))
    ref, other = (int(n.split("/")[-1][:8]) for n in r["names"])
    assert other == pairs[ref][0][0]


def test_loader_resize_and_normalize(tmp_path):
    _, scene = _scene(tmp_path, size=56)
    ds = datasets.open_dataset("blendedmvs", tmp_path / "scene_0000", size=(28, 42))
    s = ds.sample(0, views=4)
    assert s["images"].shape == (4, 3, 28, 42)
    # cover-scale 42/56 = 0.75 then centre crop rows (42 -> 28): 7 rows off the top
    K = scene.intrinsics[0] * np.array([[0.75], [0.75], [1]])
    K[:2, 2] += 0.5 * (0.75 - 1)  # pixel centres: (c + 0.5) s - 0.5 (a centred principal point stays centred)
    K[1, 2] -= 7
    np.testing.assert_allclose(s["intrinsics"][0].numpy(), K, atol=1e-4)
    n = ds.sample(0, views=4, normalize=True)
    torch.testing.assert_close(n["extrinsics"][0], torch.eye(4)[:3], atol=1e-5, rtol=0)
    from lite3r_backbones.cameras import unproject_depth

    pts = unproject_depth(n["depth"][None], n["extrinsics"][None], n["intrinsics"][None])[0]
    assert pts.norm(dim=-1)[n["mask"]].mean().item() == pytest.approx(1.0, rel=1e-4)


def test_bad_files_are_skipped_with_a_warning_naming_them(tmp_path):
    d, _ = _scene(tmp_path, views=6)
    (d / "rendered_depth_maps" / "00000000.pfm").write_bytes(b"Pf\n56 56\n-1.0\n\0\0")  # truncated
    (d / "blended_images" / "00000001.jpg").write_bytes(b"not a jpeg")
    formats.write_pfm(d / "rendered_depth_maps" / "00000002.pfm", np.zeros((56, 56)), overwrite=True)  # empty
    cam = formats.read_cam(d / "cams" / "00000003_cam.txt")
    formats.write_cam(d / "cams" / "00000003_cam.txt", cam.extrinsic, cam.intrinsic, (0.0, 1.0), overwrite=True)
    (d / "blended_images" / "00000000_masked.jpg").write_bytes(b"ignored")
    ds = datasets.open_dataset("blendedmvs", tmp_path, size=56)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = ds.sample(0, views=2)
    msgs = " | ".join(str(x.message) for x in w)
    for name in ("00000000.pfm: truncated", "00000001.jpg: cannot read", "00000002.pfm: empty depth",
                 "00000003_cam.txt: depth_min 0.0 <= 0"):
        assert name in msgs, (name, msgs)
    # evenly spaced views 0 and 5 first; 0 is unusable, so the next usable one (4) replaces it
    assert [n.split("/")[-1] for n in s["names"]] == ["00000005.jpg", "00000004.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="scene_0000: only 2 usable views of 6, 3 asked"):
            ds.sample(0, views=3)
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        datasets.open_dataset("blendedmvs", tmp_path / "nothing")
    with pytest.raises(ValueError, match="no BlendedMVS scenes"):
        datasets.open_dataset("blendedmvs", d / "cams")


def test_dtu64_layout_pose_only(tmp_path):
    _, scene = _scene(tmp_path, views=3, size=56)
    base = tmp_path / "dtu" / "dtu64"
    (base / "Cameras").mkdir(parents=True)
    for i in range(3):
        E = scene.extrinsics[i].copy()
        E[:, 3] *= 1000.0  # millimetres
        formats.write_cam(base / "Cameras" / f"{i:08d}_cam.txt", E, scene.intrinsics[i], (425.0, 2.5))
    src = tmp_path / "scene_0000" / "blended_images"
    for scan, digits in ((24, 6), (37, 8)):
        (base / f"scan{scan}" / "image").mkdir(parents=True)
        for i in range(3):
            from PIL import Image

            Image.open(src / f"{i:08d}.jpg").save(base / f"scan{scan}" / "image" / f"{i:0{digits}d}.png")
    with pytest.warns(UserWarning, match="scan40"):
        ds = datasets.open_dataset("dtu64", tmp_path / "dtu", size=56)
    assert len(ds) == 2
    for k in range(2):
        s = ds.sample(k, views=3, normalize=True)
        assert not s["mask"].any()
        ref = datasets.normalize_sample({"extrinsics": torch.from_numpy(scene.extrinsics).float(),
                                         "depth": torch.zeros(3, 56, 56), "mask": torch.zeros(3, 56, 56, dtype=bool),
                                         "intrinsics": torch.from_numpy(scene.intrinsics).float()})
        torch.testing.assert_close(s["extrinsics"], ref["extrinsics"], atol=1e-4, rtol=1e-4)  # mm scale removed
    with pytest.raises(FileNotFoundError, match="Cameras"):
        datasets.open_dataset("dtu64", tmp_path)


def test_make_scenes_command_is_deterministic_and_resumes(tmp_path):
    from typer.testing import CliRunner

    from lite3r_cli.app import app

    r = CliRunner().invoke(app, ["make-scenes", str(tmp_path / "a"), "--num", "2", "--views", "2", "--size", "28",
                                 "--seed", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    synthetic.make_scenes(tmp_path / "b", num=2, views=2, size=28, seed=5, quiet=True, workers=1)
    for f in sorted((tmp_path / "a").rglob("*.pfm")) + sorted((tmp_path / "a").rglob("*_cam.txt")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f
    info = synthetic.make_scenes(tmp_path / "a", num=3, views=2, size=28, seed=5, quiet=True, workers=1)
    assert info["rendered"] == 1  # the two complete scenes are kept
