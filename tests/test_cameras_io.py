"""Known cameras from JSON or a COLMAP model (matched by image name or order), one-line errors for bad files, the
depth scale from known camera centres, and the preview PNG."""
import json

import numpy as np
import pytest
import torch

from lite3r_recon.cameras_io import load_known_cameras, similarity_scale
from lite3r_recon.errors import InvalidInput, MissingInput

NAMES = ["a.png", "b.png", "c.png"]
SIZES = [(160, 120)] * 3


def _K(f: float) -> list:
    return [[f, 0, 79.5], [0, f, 59.5], [0, 0, 1]]


def _E(tx: float) -> list:
    return [[1, 0, 0, tx], [0, 1, 0, 0], [0, 0, 1, 0]]


def test_json_forms(tmp_path):
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"fx": 100, "fy": 101, "cx": 79.5, "cy": 59.5}))
    cams = load_known_cameras(shared, NAMES, SIZES)
    assert cams["intrinsics"].shape == (3, 3, 3) and cams["extrinsics"] is None
    assert float(cams["intrinsics"][2, 1, 1]) == 101.0
    named = tmp_path / "named.json"  # out of order, matched by name; a path prefix is ignored
    named.write_text(json.dumps({"cameras": [
        {"image": f"x/{n}", "intrinsics": _K(100 + i), "extrinsics_w2c": _E(i), "width": 160, "height": 120}
        for i, n in reversed(list(enumerate(NAMES)))]}))
    cams = load_known_cameras(named, NAMES, SIZES, poses=True, flag="--cameras")
    assert [float(k[0, 0]) for k in cams["intrinsics"]] == [100, 101, 102]
    assert [float(e[0, 3]) for e in cams["extrinsics"]] == [0, 1, 2]
    ordered = tmp_path / "ordered.json"  # a bare list, in input order, 4x4 extrinsics
    ordered.write_text(json.dumps([{"intrinsics": _K(90), "extrinsics_w2c": _E(i) + [[0, 0, 0, 1]]} for i in range(3)]))
    assert load_known_cameras(ordered, NAMES, SIZES, poses=True)["extrinsics"].shape == (3, 3, 4)


def test_colmap_model(tmp_path):
    from lite3r_recon.colmap import ColmapScene, write_colmap

    E = torch.tensor([_E(i) for i in range(3)], dtype=torch.float32)
    K = torch.tensor([_K(100 + i) for i in range(3)], dtype=torch.float32)
    empty = torch.zeros(0, dtype=torch.long)
    no_points = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.uint8)
    write_colmap(tmp_path / "m", ColmapScene(NAMES, SIZES, E, K, *no_points, empty, empty, torch.zeros(0, 2)))
    cams = load_known_cameras(tmp_path / "m", list(reversed(NAMES)), SIZES, poses=True, flag="--cameras")
    torch.testing.assert_close(cams["intrinsics"].float(), K.flip(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(cams["extrinsics"].float(), E.flip(0), atol=1e-5, rtol=0)
    with pytest.raises(InvalidInput, match="camera is 160x120 px, image a.png is 320x240"):
        load_known_cameras(tmp_path / "m", NAMES, [(320, 240)] * 3)


@pytest.mark.parametrize("content, match", [
    ("{not json", r"not valid JSON \(.* at line 1"),
    ("[]", "expected a camera object"),
    (json.dumps({"fx": 100}), r"expected \"intrinsics\""),
    (json.dumps({"intrinsics": [[1, 0], [0, 1]]}), r"intrinsics: expected a finite 3x3 matrix"),
    (json.dumps({"fx": -5, "fy": 5, "cx": 1, "cy": 1}), "fx, fy > 0"),
    (json.dumps([{"intrinsics": _K(9)}] * 2), "2 cameras for 3 views"),
    (json.dumps([{"image": "a.png", "intrinsics": _K(9)}, {"intrinsics": _K(9)}]), "every camera an \"image\" name"),
    (json.dumps([{"image": n, "intrinsics": _K(9)} for n in NAMES[:2]]), "no camera for image c.png"),
    (json.dumps([{"intrinsics": _K(9), "extrinsics_w2c": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]}] * 3),
     "not a rotation"),
])
def test_bad_camera_files(tmp_path, content, match):
    bad = tmp_path / "cams.json"
    bad.write_text(content)
    with pytest.raises(InvalidInput, match=match) as e:
        load_known_cameras(bad, NAMES, SIZES, poses="rotation" in match)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_missing_and_pose_errors(tmp_path):
    with pytest.raises(MissingInput, match="--cameras .*none.json: no such JSON file or COLMAP model folder"):
        load_known_cameras(tmp_path / "none.json", NAMES, SIZES, flag="--cameras")
    only_k = tmp_path / "k.json"
    only_k.write_text(json.dumps([{"intrinsics": _K(9)}] * 3))
    with pytest.raises(InvalidInput, match="needs \"extrinsics_w2c\""):
        load_known_cameras(only_k, NAMES, SIZES, poses=True, flag="--cameras")
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidInput, match="not a text"):
        load_known_cameras(binary, NAMES, SIZES)


def test_similarity_scale():
    g = torch.Generator().manual_seed(0)
    known = torch.randn(5, 3, generator=g, dtype=torch.float64)
    R = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    R = R * torch.sign(torch.det(R))
    pred = (known @ R.T) / 2.5 + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # known = 2.5 x pred, rotated
    assert similarity_scale(pred, known) == pytest.approx(2.5, rel=1e-9)
    assert similarity_scale(pred[:1], known[:1]) == 1.0  # one camera: no scale to measure


def test_preview_png(tmp_path):
    from PIL import Image

    from lite3r_backbones.cameras import unproject_depth
    from lite3r_recon.preview import top_view_axes, write_preview
    from lite3r_recon.synthetic import render_sample

    s = render_sample(2, views=3, size=(56, 70))
    pts = unproject_depth(s["depth"], s["extrinsics"], s["intrinsics"])[s["mask"]]
    col = (s["images"].permute(0, 2, 3, 1) * 255).to(torch.uint8)[s["mask"]]
    path = write_preview(tmp_path / "p.png", s["images"], s["depth"], torch.rand(3, 56, 70), pts, col,
                         s["extrinsics"], pixels=s["mask"] | True)
    assert Image.open(path).size[0] > 800
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_preview(path, s["images"], s["depth"], torch.rand(3, 56, 70), pts, col, s["extrinsics"])
    axes = top_view_axes(s["extrinsics"])
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(axes[2], [0, 0, 1], atol=0.05)  # the synthetic world has z up


def test_reconstruct_with_known_cameras(tmp_path):
    """--cameras conditions DA3 (cam_enc gets the cameras in network pixels) and the export holds the given poses
    and intrinsics; --intrinsics replaces VGGT's; --cameras is refused for VGGT (no pose conditioning)."""
    from PIL import Image

    from lite3r_cli import reconstruct as R
    from lite3r_recon import models
    from lite3r_recon.synthetic import render_sample

    s = render_sample(6, views=3, size=(60, 80))
    for i, im in enumerate(s["images"]):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / f"v{i}.png")
    cams = [{"image": f"v{i}.png", "intrinsics": s["intrinsics"][i].tolist(),
             "extrinsics_w2c": s["extrinsics"][i].tolist()} for i in range(3)]
    (tmp_path / "cams.json").write_text(json.dumps({"cameras": cams}))
    net = models.load_model("da3-tiny")
    seen = {}
    net.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    out = R.reconstruct(sorted(tmp_path.glob("v*.png")), model="da3-tiny", size=70, out=tmp_path / "d.ply", quiet=True,
                        cameras=tmp_path / "cams.json", net=net, preview=False)
    assert seen["extrinsics"].shape == (1, 3, 3, 4) and seen["intrinsics"].shape == (1, 3, 3, 3)
    scale = 70 / 80  # 80x60 -> 70x56 (height rounded to a multiple of 14): fx scales by 70/80
    torch.testing.assert_close(seen["intrinsics"][0, :, 0, 0], s["intrinsics"][:, 0, 0] * scale, rtol=1e-5, atol=0)
    for i, view in enumerate(out["cameras"]):
        np.testing.assert_allclose(view["extrinsics_w2c"], s["extrinsics"][i].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(view["intrinsics"])[0, 0], float(s["intrinsics"][i, 0, 0]) * scale,
                                   rtol=1e-5)
    assert out["known_cameras"] == str(tmp_path / "cams.json")
    v = R.reconstruct(sorted(tmp_path.glob("v*.png")), model="vggt-tiny", size=70, out=tmp_path / "v.ply", quiet=True,
                      intrinsics=tmp_path / "cams.json", preview=False, device="cpu")
    K_net = np.asarray(v["cameras"][2]["intrinsics"])  # the given one, resized with the image: 80x60 -> 70x56
    K0 = s["intrinsics"][2].double().numpy()
    np.testing.assert_allclose(K_net[[0, 1, 0, 1], [0, 1, 2, 2]], [K0[0, 0] * 70 / 80, K0[1, 1] * 56 / 60,
                               (K0[0, 2] + 0.5) * 70 / 80 - 0.5, (K0[1, 2] + 0.5) * 56 / 60 - 0.5], rtol=1e-5)
    with pytest.raises(InvalidInput, match="--cameras: poses condition DA3 models only"):
        R.reconstruct(sorted(tmp_path.glob("v*.png")), model="vggt-tiny", size=70, out=tmp_path / "x.ply",
                      quiet=True, cameras=tmp_path / "cams.json")


def test_reconstruct_json_round_trip(tmp_path):
    """The cameras JSON that reconstruct writes is a known-cameras file: its intrinsics in original pixels map back
    to the same network intrinsics; an old file without them is a one-line error."""
    from PIL import Image

    from lite3r_cli import reconstruct as R

    for i in range(2):
        Image.fromarray(np.full((60, 80, 3), 40 + 100 * i, np.uint8)).save(tmp_path / f"v{i}.png")
    shared = tmp_path / "k.json"
    shared.write_text(json.dumps({"fx": 70, "fy": 72, "cx": 39.5, "cy": 29.5}))
    files = sorted(tmp_path.glob("v*.png"))
    first = R.reconstruct(files, model="vggt-tiny", size=70, out=tmp_path / "a.ply", json_path=tmp_path / "a.json",
                          quiet=True, intrinsics=shared, preview=False, device="cpu")
    given = [[70, 0, 39.5], [0, 72, 29.5], [0, 0, 1]]
    np.testing.assert_allclose(first["cameras"][0]["intrinsics_original"].numpy(), given, rtol=1e-5, atol=1e-4)
    again = load_known_cameras(tmp_path / "a.json", [str(f) for f in files], [(80, 60)] * 2, poses=True)
    torch.testing.assert_close(again["intrinsics"][1], torch.tensor([[70, 0, 39.5], [0, 72, 29.5], [0, 0, 1]],
                                                                   dtype=torch.float64), rtol=1e-5, atol=1e-4)
    meta = json.loads((tmp_path / "a.json").read_text())
    for c in meta["cameras"]:
        del c["intrinsics_original"]
    (tmp_path / "old.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidInput, match="without intrinsics_original"):
        load_known_cameras(tmp_path / "old.json", [str(f) for f in files], [(80, 60)] * 2)
