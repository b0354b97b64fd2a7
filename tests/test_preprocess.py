"""backbones.load_images: official crop/pad geometry, intrinsics adjustment, clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from lite3r_backbones import list_images, load_images
from lite3r_backbones.preprocess import target_hw


def _write(path, w, h, mode="RGB", color=(200, 30, 60)):
    if mode == "RGBA":
        Image.new("RGBA", (w, h), color + (0,)).save(path)
    else:
        Image.new(mode, (w, h), color).save(path)
    return path


def _K(w, h, f=500.0):
    return np.array([[f, 0, w / 2], [0, f * 1.1, h / 2], [0, 0, 1]], dtype=np.float64)


@pytest.mark.parametrize(
    "mode,size,wh,expect",
    [
        ("crop", 518, (640, 480), (392, 518)),  # 480 * 518/640 = 388.5 -> 392 (multiple of 14)
        ("crop", 518, (480, 960), (518, 518)),  # tall: 1036 -> centre-cropped to 518
        ("pad", 518, (640, 480), (518, 518)),
        ("pad", 518, (480, 640), (518, 518)),
        ("crop", 168, (168, 126), (126, 168)),  # already the target size
    ],
)
def test_shapes(tmp_path, mode, size, wh, expect):
    p = _write(tmp_path / "a.png", *wh)
    images, K = load_images([p], mode=mode, size=size)
    assert images.shape == (1, 3) + expect and images.dtype == torch.float32 and K is None
    assert images.shape[-1] % 14 == 0 and images.shape[-2] % 14 == 0
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_pad_is_white_and_content_centred(tmp_path):
    p = _write(tmp_path / "a.png", 640, 480, color=(0, 0, 0))
    images, _ = load_images([p], mode="pad")
    # 640x480 -> 518x392 (388.5 rounds to 392), 63 rows of white above and below
    assert torch.all(images[0, :, :63] == 1.0) and torch.all(images[0, :, 63 + 392 :] == 1.0)
    assert torch.all(images[0, :, 63 : 63 + 392] == 0.0)


def test_mask_marks_real_pixels_in_pad_and_mixed_crop(tmp_path):
    """with_mask: False exactly on the white padding (pad mode, and crop mode padding a narrower image to the
    widest); the rest of the return is unchanged."""
    p = _write(tmp_path / "a.png", 640, 480, color=(0, 0, 0))
    images, K, mask = load_images([p], mode="pad", with_mask=True)
    assert mask.shape == (1, 518, 518) and mask.dtype == torch.bool and K is None
    assert torch.equal(mask[0], (images[0] == 0.0).all(0))  # black content, white padding
    assert torch.equal(images, load_images([p], mode="pad")[0])
    tall = _write(tmp_path / "b.png", 480, 960, color=(0, 0, 0))  # crop: 518 x 518; the wide one is 518 x 392
    images, _, mask = load_images([p, tall], mode="crop", with_mask=True)
    assert mask[1].all() and not mask[0].all()
    assert torch.equal(mask[0], (images[0] == 0.0).all(0)) and int(mask[0].sum()) == 392 * 518


@pytest.mark.parametrize("mode,wh", [("crop", (640, 480)), ("crop", (480, 960)), ("pad", (640, 480)), ("pad", (480, 640))])
def test_intrinsics_follow_the_pixels(tmp_path, mode, wh):
    """A 3D point projects to the same image content before and after preprocessing."""
    w0, h0 = wh
    p = _write(tmp_path / "a.png", w0, h0)
    K0 = _K(w0, h0)
    images, K = load_images([p, p], mode=mode, intrinsics=np.stack([K0, K0]))
    H, W = images.shape[-2:]
    assert K.shape == (2, 3, 3) and K.dtype == torch.float32
    X = np.array([0.3, -0.2, 2.0])
    u0 = K0 @ X
    u0 = u0[:2] / u0[2]
    u1 = K[0].double().numpy() @ X
    u1 = u1[:2] / u1[2]
    # expected: per-axis resize of pixel-centre coordinates ((u + 0.5) s - 0.5), then the crop (negative) or pad
    th, tw = target_hw(h0, w0, mode)
    off_y = (H - th) // 2 if mode == "pad" else -((th - H) // 2)
    off_x = (W - tw) // 2 if mode == "pad" else 0
    expect = np.array([(u0[0] + 0.5) * tw / w0 - 0.5 + off_x, (u0[1] + 0.5) * th / h0 - 0.5 + off_y])
    np.testing.assert_allclose(u1, expect, atol=1e-3)


def test_mixed_shapes_padded_to_largest(tmp_path):
    a = _write(tmp_path / "a.png", 640, 480)
    b = _write(tmp_path / "b.png", 640, 320)
    images, K = load_images([a, b], intrinsics=np.stack([_K(640, 480), _K(640, 320)]))
    assert images.shape == (2, 3, 392, 518)
    # b: 320 * 518/640 = 259 -> 252 rows (18.5 patches rounds to even), padded by 140 rows (70 on top)
    assert torch.all(images[1, :, :70] == 1.0) and not torch.all(images[1, :, 70] == 1.0)
    assert abs(float(K[1, 1, 2]) - ((160 + 0.5) * 252 / 320 - 0.5 + 70)) < 1e-3


def test_rgba_on_white(tmp_path):
    p = _write(tmp_path / "a.png", 140, 140, mode="RGBA", color=(0, 0, 0))
    images, _ = load_images([p], size=140)
    assert torch.all(images == 1.0)


def test_folder_and_errors(tmp_path):
    for n in ("b.png", "a.jpg"):
        _write(tmp_path / n, 100, 80)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    images, _ = load_images(tmp_path, size=140)
    assert images.shape[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_images(empty)
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        load_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file"):
        load_images([tmp_path / "missing.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.png: cannot read image"):
        load_images([bad])
    trunc = tmp_path / "trunc.jpg"
    data = (tmp_path / "a.jpg").read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="trunc.jpg: cannot read image"):
        load_images([trunc])
    with pytest.raises(ValueError, match="mode must be"):
        load_images([tmp_path / "a.jpg"], mode="resize")
    with pytest.raises(ValueError, match="multiple of 14"):
        load_images([tmp_path / "a.jpg"], size=500)
    with pytest.raises(ValueError, match=r"intrinsics must be \[1, 3, 3\]"):
        load_images([tmp_path / "a.jpg"], intrinsics=np.eye(3))
