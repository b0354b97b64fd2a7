"""Procedural multi-view scenes with exact geometry, rendered by vectorised ray casting in torch.

A scene (a pure function of its seed): a finite textured ground plane (z = 0, world z up), boxes standing on it
(rotated about z) and spheres, each with a procedural texture (checker, stripes or value noise, plus fine noise).
Cameras sit on an orbit arc around the scene at one or two elevations, looking at its centre, like BlendedMVS /
DTU captures. Every pixel ray (pixel centres at integer coordinates, OpenCV camera: x right, y down, z forward) is
intersected with every primitive at once; the nearest hit gives the z-depth, the surface normal and the texture
colour, shaded Lambertian (ambient + one directional light). Rays that miss everything are background: depth 0,
invalid, sky in the image. The "compass" sky (an option) is fixed to the world, like a real sky with its sun side:
its horizon hue turns once around the azimuth and it fades to a zenith blue with elevation, so a view's heading can
be read from its sky, and the heading relative to view 0 only across views (the world's azimuth is random for each
scene). "plain" (the default, the held-out scenes' sky): a vertical gradient in image space that carries no heading.

    sample = render_sample(seed, views=4, size=(126, 168))   # in memory: images [S,3,H,W], depth, mask, cameras
    write_scene("scenes/scene_0000", seed=0, views=16, size=518)   # BlendedMVS format on disk
    make_scenes("scenes", num=100, views=16, size=518, seed=0)     # `lite3r make-scenes`
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from lite3r_recon.errors import InvalidInput, WouldOverwrite

AMBIENT = 0.35
BACKGROUND_TOP, BACKGROUND_BOTTOM = (0.55, 0.70, 0.95), (0.85, 0.90, 1.0)
ZENITH = (0.35, 0.50, 0.90)
SKIES = ("plain", "compass")
GROUND_HALF = 6.0  # the ground plane is the square |x|, |y| <= GROUND_HALF
TEXTURES = ("checker", "stripes", "noise")


# ------------------------------------------------------------------------------------------------ the scene
@dataclasses.dataclass(frozen=True)
class Primitive:
    kind: str  # plane | box | sphere
    center: tuple[float, float, float]
    size: tuple[float, float, float]  # box half extents; sphere (r, r, r); plane (half, half, 0)
    yaw: float  # rotation about z (boxes)
    texture: str
    scale: float  # texture period (world units)
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Scene:
    primitives: tuple[Primitive, ...]
    light: tuple[float, float, float]  # unit direction towards the light
    extrinsics: np.ndarray  # [S,3,4] world-to-camera, float64
    intrinsics: np.ndarray  # [S,3,3] pixels, float64
    size: tuple[int, int]  # (H, W)
    sky: str = "plain"  # plain | compass (see the module docstring)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 8 or w < 8:
        raise InvalidInput(f"image size must be at least 8x8, got {h}x{w}")
    return h, w


def look_at(center: np.ndarray, target: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-to-camera [3,4] (OpenCV) of a camera at `center` looking at `target` with world `up` above."""
    f = target - center
    f = f / np.linalg.norm(f)
    r = np.cross(f, np.asarray(up, dtype=np.float64))
    r = r / np.linalg.norm(r)
    d = np.cross(f, r)
    R = np.stack([r, d, f])
    return np.concatenate([R, -(R @ center)[:, None]], 1)


ARC = (90.0, 200.0)  # degrees of azimuth the cameras of a scene span (drawn uniformly in this range)


def make_scene(seed: int, views: int = 16, size: int | tuple[int, int] = 518, *,
               arc: tuple[float, float] = ARC, sky: str = "plain") -> Scene:
    """The scene and cameras of `seed` (numpy Generator; nothing global is touched). `arc`: the range of the azimuth
    span of the cameras in degrees (narrower: smaller baselines between neighbouring views); `sky`: SKIES."""
    if sky not in SKIES:
        raise InvalidInput(f"sky must be one of {', '.join(SKIES)}, got {sky!r}")
    if views < 1:
        raise InvalidInput(f"views must be >= 1, got {views}")
    if not 0 <= arc[0] <= arc[1] <= 360:
        raise InvalidInput(f"arc must be (min, max) degrees with 0 <= min <= max <= 360, got {arc}")
    H, W = _hw(size)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5CE7E])
    color = lambda: tuple(float(c) for c in rng.uniform(0.1, 0.95, 3))  # noqa: E731
    prims = [Primitive("plane", (0.0, 0.0, 0.0), (GROUND_HALF, GROUND_HALF, 0.0), 0.0, "checker",
                       float(rng.uniform(0.3, 0.7)), color(), color())]
    placed: list[tuple[float, float, float]] = []  # (x, y, footprint radius)
    n_obj = int(rng.integers(4, 9))
    for _ in range(200):
        if len(placed) >= n_obj:
            break
        kind = "box" if rng.random() < 0.55 else "sphere"
        if kind == "box":
            hx, hy, hz = rng.uniform(0.15, 0.55), rng.uniform(0.15, 0.55), rng.uniform(0.15, 0.8)
            foot = math.hypot(hx, hy)
        else:
            hx = hy = hz = rng.uniform(0.2, 0.6)
            foot = hx
        x, y = rng.uniform(-1.8, 1.8, 2)
        if any(math.hypot(x - px, y - py) < foot + pr + 0.05 for px, py, pr in placed):
            continue
        z = hz if kind == "box" or rng.random() < 0.7 else hz + rng.uniform(0.1, 0.6)  # some spheres float
        placed.append((x, y, foot))
        prims.append(Primitive(kind, (float(x), float(y), float(z)), (float(hx), float(hy), float(hz)),
                               float(rng.uniform(0, math.pi)), TEXTURES[int(rng.integers(3))],
                               float(rng.uniform(0.08, 0.3)), color(), color()))
    az = rng.uniform(0, 2 * math.pi)
    light = np.array([math.cos(az), math.sin(az), rng.uniform(0.8, 2.0)])
    light = tuple(float(v) for v in light / np.linalg.norm(light))

    # cameras: an arc of azimuths at one or two elevations, looking at the scene centre (jittered)
    az0, span = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(*arc))
    rings = 2 if views >= 8 else 1
    elev = np.radians(rng.uniform(20, 32, rings) + np.arange(rings) * 15)
    fov = math.radians(rng.uniform(45, 60))
    f = 0.5 * W / math.tan(0.5 * fov)
    K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]], dtype=np.float64)
    E = []
    for i in range(views):
        t = (i + 0.5) / views
        a = az0 + span * (t - 0.5) + rng.normal(0, 0.03)
        e = elev[i % rings] + rng.normal(0, 0.03)
        r = rng.uniform(4.2, 5.5)
        target = np.array([*rng.normal(0, 0.15, 2), rng.uniform(0.2, 0.5)])
        center = target + r * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
        E.append(look_at(center, target))
    return Scene(tuple(prims), light, np.stack(E), np.repeat(K[None], views, 0), (H, W), sky)


# --------------------------------------------------------------------------------------------- ray casting
# Scenes are cast in batches: every ray of every view of every scene at once, primitive slot by slot (slot k of each
# scene: its k-th primitive, or none), so a batch of scenes costs a few hundred kernel launches on a GPU.
KIND_CODES = {"plane": 0, "box": 1, "sphere": 2}


def _safe(d: Tensor) -> Tensor:
    return torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)


def _slots(scenes: list[Scene], device) -> list[dict[str, Tensor]]:
    """Per primitive slot, the scenes' parameters as tensors [B, ...] (kind -1: the scene has no such primitive)."""
    out = []
    for k in range(max(len(s.primitives) for s in scenes)):
        prims = [s.primitives[k] if k < len(s.primitives) else None for s in scenes]
        get = lambda f, empty: [empty if p is None else f(p) for p in prims]  # noqa: E731
        t = lambda v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
        out.append({"kind": t(get(lambda p: KIND_CODES[p.kind], -1), torch.int64),
                    "center": t(get(lambda p: p.center, (0.0, 0.0, 0.0))),
                    "size": t(get(lambda p: p.size, (1.0, 1.0, 1.0))),
                    "yaw": t(get(lambda p: p.yaw, 0.0)),
                    "texture": t(get(lambda p: TEXTURES.index(p.texture), 0), torch.int64),
                    "scale": t(get(lambda p: p.scale, 1.0)),
                    "color_a": t(get(lambda p: p.color_a, (0.0, 0.0, 0.0))),
                    "color_b": t(get(lambda p: p.color_b, (0.0, 0.0, 0.0)))})
    return out


def intersect(kind: Tensor, p: dict[str, Tensor], o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Rays o, d [N,3] (d unnormalised) against per-ray primitives (`kind` [N], parameters `p` gathered per ray)
    -> (t [N] of the first hit with t > 0, inf on a miss; unit normal [N,3])."""
    inf = torch.full_like(d[:, 0], math.inf)
    t_all, n_all = inf, torch.zeros_like(d)
    c, half = p["center"], p["size"]
    if bool((kind == 0).any()):  # plane z = 0 (the ground), |x|, |y| <= half
        t = -o[:, 2] / _safe(d[:, 2])
        x = o + t[:, None] * d
        ok = (kind == 0) & (t > 1e-6) & (x[:, 0].abs() <= half[:, 0]) & (x[:, 1].abs() <= half[:, 1])
        n = torch.zeros_like(d)
        n[:, 2] = 1.0
        t_all, n_all = torch.where(ok, t, t_all), torch.where(ok[:, None], n, n_all)
    if bool((kind == 2).any()):  # sphere of radius half_x
        r = half[:, 0]
        oc = o - c
        a = (d * d).sum(-1)
        b = (d * oc).sum(-1)
        disc = b * b - a * ((oc * oc).sum(-1) - r * r)
        t = (-b - disc.clamp_min(0).sqrt()) / a
        ok = (kind == 2) & (disc >= 0) & (t > 1e-6)
        n = (o + t[:, None] * d - c) / r[:, None]
        t_all, n_all = torch.where(ok, t, t_all), torch.where(ok[:, None], n, n_all)
    if bool((kind == 1).any()):  # box: slab test in the box frame (rotated about z by yaw)
        cy, sy = torch.cos(p["yaw"]), torch.sin(p["yaw"])

        def to_box(v):  # R^T v, R = rot_z(yaw) (box -> world)
            return torch.stack([cy * v[:, 0] + sy * v[:, 1], -sy * v[:, 0] + cy * v[:, 1], v[:, 2]], -1)

        ol, dl = to_box(o - c), to_box(d)
        inv = 1.0 / _safe(dl)
        t1, t2 = (-half - ol) * inv, (half - ol) * inv
        tmin, axis = torch.minimum(t1, t2).max(-1)
        tmax = torch.maximum(t1, t2).min(-1).values
        ok = (kind == 1) & (tmax >= tmin) & (tmin > 1e-6)
        nl = torch.zeros_like(d)
        nl.scatter_(1, axis[:, None], -torch.sign(dl.gather(1, axis[:, None])))
        n = torch.stack([cy * nl[:, 0] - sy * nl[:, 1], sy * nl[:, 0] + cy * nl[:, 1], nl[:, 2]], -1)  # R nl
        t_all, n_all = torch.where(ok, tmin, t_all), torch.where(ok[:, None], n, n_all)
    return t_all, n_all


def waves(x: Tensor, salt: int, count: int = 8, freq: float = 1.0) -> Tensor:
    """Smooth noise-like field in [0,1] at points x [N,3]: a sum of `count` plane waves with random directions,
    frequencies around `freq` (cycles per unit) and phases drawn from `salt` (cheap and deterministic)."""
    g = torch.Generator().manual_seed(int(salt) & 0x7FFFFFFF)
    w = torch.nn.functional.normalize(torch.randn(3, count, generator=g), dim=0)
    w = w * (freq * 2 * math.pi * (0.6 + 0.8 * torch.rand(count, generator=g)))
    phase = 2 * math.pi * torch.rand(count, generator=g)
    return 0.5 + 0.5 * torch.sin(x.float() @ w.to(x.device) + phase.to(x.device)).mean(-1) * math.sqrt(2.0)


def texture(p: dict[str, Tensor], x: Tensor, salt: int) -> Tensor:
    """Albedo [N,3] at world points x [N,3] of per-point primitives (parameters `p` gathered per point)."""
    q = x / p["scale"][:, None] + 0.5  # + 0.5: surfaces at integer coordinates (the ground at z = 0) do not flicker
    kind = p["texture"]
    m = (torch.floor(q).to(torch.int64).sum(-1) % 2).float()  # checker
    m = torch.where(kind == 1, 0.5 + 0.5 * torch.sin(2 * math.pi * (q[:, 0] + 0.7 * q[:, 1] + 0.4 * q[:, 2])), m)
    if bool((kind == 2).any()):
        m = torch.where(kind == 2, waves(q, salt, freq=0.5).clamp(0, 1), m)
    fine = 0.6 * waves(q, salt + 1, freq=2.0) + 0.4 * waves(q, salt + 2, freq=7.0)
    albedo = p["color_a"] * (1 - m[:, None]) + p["color_b"] * m[:, None]
    return (albedo * (0.6 + 0.8 * fine[:, None])).clamp(0, 1)


def compass_sky(d: Tensor) -> Tensor:
    """Sky colour [N,3] of world ray directions d [N,3] (z up): a horizon hue that turns once over the azimuth,
    fading to ZENITH as the ray rises (rays below the horizon keep a darker horizon colour)."""
    az = torch.atan2(d[:, 1], d[:, 0])[:, None]
    horizon = 0.55 + 0.35 * torch.cos(az - torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], device=d.device))
    elev = torch.asin((d[:, 2] / d.norm(dim=-1)).clamp(-1, 1))[:, None]
    up = (elev / (math.pi / 3)).clamp(0, 1)
    rgb = horizon * (1 - up) + torch.tensor(ZENITH, device=d.device) * up
    return torch.where(elev < 0, 0.8 * horizon, rgb)


def render_scenes(scenes: list[Scene], views: list[int] | None = None, *, device: str | torch.device | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Views `views` (default: all) of scenes of one size -> (images [B,V,3,H,W] float32 in [0,1], z-depth [B,V,H,W]
    float32, 0 where no surface), cast on `device` (default CPU) in one batch."""
    if not scenes or len({s.size for s in scenes}) != 1:
        raise InvalidInput("render_scenes needs at least one scene, all of the same image size")
    device = torch.device(device or "cpu")
    views = list(range(len(scenes[0].extrinsics))) if views is None else list(views)
    B, V, (H, W) = len(scenes), len(views), scenes[0].size
    f64 = dict(dtype=torch.float64, device=device)
    E = torch.as_tensor(np.stack([s.extrinsics[views] for s in scenes]), **f64)  # [B,V,3,4]
    K = torch.as_tensor(np.stack([s.intrinsics[views] for s in scenes]), **f64)
    R, t = E[..., :3], E[..., 3]
    centres = -(R.transpose(-1, -2) @ t[..., None])[..., 0]  # [B,V,3]
    v, u = torch.meshgrid(torch.arange(H, **f64), torch.arange(W, **f64), indexing="ij")
    pix = torch.stack([u.flatten(), v.flatten(), torch.ones(H * W, **f64)], -1)  # [HW,3]
    d = torch.einsum("pj,bvij,bvik->bvpk", pix, torch.linalg.inv(K), R)  # world directions, camera z = 1: t = z-depth
    d = d.float().reshape(-1, 3)
    o = centres.float()[:, :, None].expand(B, V, H * W, 3).reshape(-1, 3)
    scene_of = torch.arange(B, device=device).repeat_interleave(V * H * W)  # [N]
    slots = _slots(scenes, device)
    best = torch.full_like(d[:, 0], math.inf)
    hit = torch.full_like(scene_of, -1)
    normal = torch.zeros_like(d)
    for k, slot in enumerate(slots):
        tk, nk = intersect(slot["kind"][scene_of], {n: v[scene_of] for n, v in slot.items() if n != "kind"}, o, d)
        closer = tk < best
        best = torch.where(closer, tk, best)
        hit = torch.where(closer, torch.full_like(hit, k), hit)
        normal = torch.where(closer[:, None], nk, normal)
    x = o + best.clamp_max(1e9)[:, None] * d
    light = torch.tensor([s.light for s in scenes], dtype=torch.float32, device=device)[scene_of]
    shade = AMBIENT + (1 - AMBIENT) * (normal * light).sum(-1).clamp_min(0)
    top = torch.tensor(BACKGROUND_TOP, device=device)
    bottom = torch.tensor(BACKGROUND_BOTTOM, device=device)
    g = (v.flatten() / max(H - 1, 1)).float().repeat(B * V)[:, None]
    compass = torch.tensor([s.sky == "compass" for s in scenes], device=device)[scene_of]
    rgb = torch.where(compass[:, None], compass_sky(d), top * (1 - g) + bottom * g)
    for k, slot in enumerate(slots):
        sel = (hit == k).nonzero().squeeze(1)
        if sel.numel():
            b = scene_of[sel]
            rgb[sel] = texture({n: v[b] for n, v in slot.items()}, x[sel], salt=1000 * k) * shade[sel, None]
    depth = torch.where(hit >= 0, best, torch.zeros_like(best))
    images = rgb.clamp(0, 1).reshape(B, V, H, W, 3).permute(0, 1, 4, 2, 3).contiguous()
    return images, depth.reshape(B, V, H, W)


def render_view(scene: Scene, i: int) -> tuple[Tensor, Tensor]:
    """View `i` -> (image [3,H,W] float32 in [0,1], z-depth [H,W] float32, 0 where no surface), on the CPU."""
    img, depth = render_scenes([scene], [i])
    return img[0, 0], depth[0, 0]


def render_batch(seeds: list[int], views: int = 4, size: int | tuple[int, int] = (126, 168), *,
                 device: str | torch.device | None = None, arc: tuple[float, float] = ARC,
                 sky: str = "plain") -> dict[str, Tensor]:
    """The scenes of `seeds` rendered together on `device`: images [B,S,3,H,W], depth [B,S,H,W], mask, extrinsics
    [B,S,3,4] w2c, intrinsics [B,S,3,3] (float32, metric world), all on `device`."""
    scenes = [make_scene(s, views, size, arc=arc, sky=sky) for s in seeds]
    images, depth = render_scenes(scenes, device=device)
    dev = images.device
    return {"images": images, "depth": depth, "mask": depth > 0,
            "extrinsics": torch.as_tensor(np.stack([s.extrinsics for s in scenes]), dtype=torch.float32, device=dev),
            "intrinsics": torch.as_tensor(np.stack([s.intrinsics for s in scenes]), dtype=torch.float32, device=dev)}


def render_sample(seed: int, views: int = 4, size: int | tuple[int, int] = (126, 168), *,
                  device: str | torch.device | None = None) -> dict[str, Tensor]:
    """The scene of `seed` rendered in memory: images [S,3,H,W] float32 in [0,1], depth [S,H,W] (0: background),
    mask [S,H,W] bool (valid depth), extrinsics [S,3,4] w2c, intrinsics [S,3,3] (float32, metric world), on
    `device` (default CPU)."""
    return {k: v[0] for k, v in render_batch([seed], views, size, device=device).items()}


# --------------------------------------------------------------------------------------- BlendedMVS on disk
def view_pairs(extrinsics: np.ndarray, top: int = 10) -> dict[int, list[tuple[int, float]]]:
    """pair.txt content from view angles: for each view, the others ranked by a score peaking at a 15-degree
    baseline angle between their optical axes (too similar or too different views score lower)."""
    fwd = extrinsics[:, 2, :3]  # camera z axis in world coordinates
    cos = np.clip(fwd @ fwd.T, -1, 1)
    ang = np.degrees(np.arccos(cos))
    score = np.exp(-((ang - 15.0) ** 2) / (2 * np.where(ang < 15.0, 8.0, 20.0) ** 2))
    out = {}
    for i in range(len(fwd)):
        others = [j for j in np.argsort(-score[i], kind="stable") if j != i][:top]
        out[i] = [(int(j), float(score[i, j])) for j in others]
    return out


def write_scene(out: str | os.PathLike, seed: int, views: int = 16, size: int | tuple[int, int] = 518, *,
                overwrite: bool = False, image_format: str = "jpg") -> Path:
    """Render the scene of `seed` into `out` in BlendedMVS layout: blended_images/{id:08d}.jpg,
    cams/{id:08d}_cam.txt (+ cams/pair.txt), rendered_depth_maps/{id:08d}.pfm. Returns `out`."""
    from PIL import Image

    from lite3r_recon import formats
    from lite3r_recon.io import atomic_write_bytes, check_writable

    out = Path(out)
    if image_format not in ("jpg", "png"):
        raise InvalidInput(f"image_format must be jpg or png, got {image_format!r}")
    scene = make_scene(seed, views, size)
    for sub in ("blended_images", "cams", "rendered_depth_maps"):
        check_writable(out / sub, folder=True, create=True)
    for i in range(views):
        img, depth = render_view(scene, i)
        arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG" if image_format == "jpg" else "PNG",
                                  **({"quality": 95, "subsampling": 0} if image_format == "jpg" else {}))
        atomic_write_bytes(out / "blended_images" / f"{i:08d}.{image_format}", buf.getvalue(), overwrite=overwrite)
        formats.write_pfm(out / "rendered_depth_maps" / f"{i:08d}.pfm", depth.numpy(), overwrite=overwrite)
        valid = depth[depth > 0]
        lo, hi = (float(valid.min()) * 0.9, float(valid.max()) * 1.1) if valid.numel() else (0.1, 10.0)
        formats.write_cam(out / "cams" / f"{i:08d}_cam.txt", scene.extrinsics[i], scene.intrinsics[i],
                          (lo, (hi - lo) / 191, 192, hi), overwrite=overwrite)
    for sub, pattern in _VIEW_FILES.items():  # an earlier render with more views: its extra views would stay
        for f in (out / sub).glob(pattern):
            if int(f.name[:8]) >= views:
                f.unlink()
    formats.write_pair(out / "cams" / "pair.txt", view_pairs(scene.extrinsics), overwrite=overwrite)
    return out


_VIEW_FILES = {"blended_images": "[0-9]" * 8 + ".*", "cams": "[0-9]" * 8 + "_cam.txt",
               "rendered_depth_maps": "[0-9]" * 8 + ".pfm"}


def rendered_as(scene: Path) -> tuple[int, tuple[int, int]]:
    """(views, (H, W)) of a scene folder write_scene made, read from its files."""
    from PIL import Image

    cams = sorted((scene / "cams").glob(_VIEW_FILES["cams"]))
    images = sorted((scene / "blended_images").glob(_VIEW_FILES["blended_images"]))
    if not images:
        return len(cams), (0, 0)
    with Image.open(images[0]) as im:
        return len(cams), (im.height, im.width)


def _check_kept(out: Path, kept: list[int], views: int, hw: tuple[int, int], seed: int) -> None:
    """A one-line error unless the scenes make-scenes would keep in `out` are what was asked for: the parameters in
    its scenes.json (views, size, seed) and each kept scene's files (views, image size)."""
    def fmt(v, size, s):
        return f"--views {v} --size {size[0] if size[0] == size[1] else f'{size[0]},{size[1]}'}" + (
            f" --seed {s}" if s is not None else "")

    asked = fmt(views, hw, seed)
    found = None
    try:
        saved = json.loads((out / "scenes.json").read_text()) if (out / "scenes.json").is_file() else None
    except (OSError, ValueError):
        saved = None
    if saved and kept and (saved.get("views"), list(saved.get("size") or []), saved.get("seed")) != \
            (views, list(hw), seed):
        found = (fmt(saved.get("views"), list(saved.get("size") or [0, 0]), saved.get("seed")), "scenes.json")
    for k in kept if found is None else ():
        v, size = rendered_as(out / f"scene_{k:04d}")
        if (v, size) != (views, tuple(hw)):
            found = (fmt(v, size, None), f"scene_{k:04d}")
            break
    if found is not None:
        raise WouldOverwrite(f"{out} holds scenes made with {found[0]} ({found[1]}), not {asked}: ask for those to "
                             f"add scenes, or pass --overwrite to re-render every scene")


def _one_thread() -> None:
    torch.set_num_threads(1)


def make_scenes(out: str | os.PathLike, num: int = 100, views: int = 16, size: int | tuple[int, int] = 518,
                seed: int = 0, *, overwrite: bool = False, quiet: bool = False, workers: int | None = None) -> dict:
    """`lite3r make-scenes`: `num` scenes out/scene_{k:04d} (scene k has seed `seed + k`), with a progress bar.
    Existing complete scenes are kept (so a killed run resumes); --overwrite re-renders them. `workers`
    processes (default: one per CPU core) render scenes in parallel."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from lite3r_recon.io import atomic_write_json, check_writable, console

    if num < 1 or views < 1:
        raise InvalidInput(f"--num and --views must be >= 1, got {num} and {views}")
    H, W = _hw(size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WouldOverwrite(f"{out} is a file, expected a folder for the scenes")
    check_writable(out, folder=True, create=True)
    t0 = time.perf_counter()
    todo = [k for k in range(num) if overwrite or not (out / f"scene_{k:04d}" / "cams" / "pair.txt").is_file()]
    _check_kept(out, sorted(set(range(num)) - set(todo)), views, (H, W), seed)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    con = console(quiet)
    with Progress(TextColumn("[bold blue]make-scenes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=con, disable=quiet) as progress:
        task = progress.add_task("scenes", total=num, completed=num - len(todo))
        args = [(out / f"scene_{k:04d}", seed + k, views, (H, W)) for k in todo]  # pair.txt is written last
        if workers == 1:
            for a in args:
                write_scene(*a, overwrite=True)
                progress.advance(task)
        else:  # one single-threaded process per core: torch's intra-op threads gain little on these small ops
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread) as ex:
                for f in cf.as_completed([ex.submit(write_scene, *a, overwrite=True) for a in args]):
                    f.result()
                    progress.advance(task)
    made = len(todo)
    info = {"format": "blendedmvs", "generator": "lite3r synthetic", "num": num, "views": views, "size": [H, W],
            "seed": seed, "scenes": [f"scene_{k:04d}" for k in range(num)], "rendered": made,
            "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out / "scenes.json", info, overwrite=True)
    con.print(f"wrote {num} scenes x {views} views ({H}x{W}) to {out} in {info['seconds']} s ({made} rendered)")
    return info


__all__ = ["Primitive", "Scene", "look_at", "make_scene", "make_scenes", "render_batch", "render_sample",
           "render_scenes", "render_view", "view_pairs", "write_scene"]
