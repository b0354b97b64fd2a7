"""Camera geometry, in one place: every pose / extrinsics / unprojection function of lite3r.

Conventions: extrinsics are OpenCV world-to-camera [..., 3, 4] (x_cam = R x_world + t), intrinsics pixel
[..., 3, 3] with pixel centres at integer coordinates (VGGT), quaternions xyzw. The two pose encodings are the
backbones' own ([t, quat, fov_h, fov_w]): VGGT's of the world-to-camera pose, DA3's of the camera-to-world pose.
The backbones, the datasets, the metrics, the losses and the commands all import from here.
"""
from __future__ import annotations

import torch
from torch import Tensor
from lite3r_recon.errors import InvalidInput


# ------------------------------------------------------------------------------------------------ rigid motions
def se3_inverse(E: Tensor) -> Tensor:
    """[..., 3, 4] world-to-camera -> [..., 3, 4] camera-to-world (closed form)."""
    Rt = E[..., :3, :3].transpose(-1, -2)
    return torch.cat([Rt, -(Rt @ E[..., :3, 3:])], -1)


def compose(A: Tensor, B: Tensor) -> Tensor:
    """(A o B) for [..., 3, 4] rigid transforms: x -> A(B(x))."""
    R = A[..., :3, :3] @ B[..., :3, :3]
    t = A[..., :3, :3] @ B[..., :3, 3:] + A[..., :3, 3:]
    return torch.cat([R, t], -1)


def unproject_depth(depth: Tensor, extrinsics: Tensor, intrinsics: Tensor) -> Tensor:
    """World points [..., H, W, 3] of depth maps [..., H, W] seen by w2c OpenCV cameras `extrinsics` [..., 3, 4]
    (x_cam = R x_world + t) with pixel `intrinsics` [..., 3, 3] (skew honoured), in depth's dtype and
    differentiable. Pixel centres at integer coordinates, as VGGT: (v, u) -> depth * K^-1 [u, v, 1] -> R^T (x - t)."""
    H, W = depth.shape[-2:]
    K = intrinsics.to(depth.dtype)
    R, t = extrinsics.to(depth.dtype)[..., :3, :3], extrinsics.to(depth.dtype)[..., :3, 3]
    v, u = torch.meshgrid(torch.arange(H, device=depth.device, dtype=depth.dtype),
                          torch.arange(W, device=depth.device, dtype=depth.dtype), indexing="ij")
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy, skew = K[..., 0, 2, None, None], K[..., 1, 2, None, None], K[..., 0, 1, None, None]
    y = (v - cy) / fy
    x = (u - cx - skew * y) / fx
    cam = torch.stack([x * depth, y * depth, depth], dim=-1)  # [..., H, W, 3]
    return torch.einsum("...ji,...hwj->...hwi", R, cam - t[..., None, None, :])


@torch.no_grad()
def project_tracks(query: Tensor, world_points: Tensor, depth: Tensor, extrinsics: Tensor, intrinsics: Tensor,
                   mask: Tensor, *, occlusion_tol: float = 0.03) -> tuple[Tensor, Tensor]:
    """Ground-truth tracks of pixels of frame 0 through every frame, from exact depth and cameras.

    query [B,N,2] integer pixels (x, y) of frame 0; world_points [B,S,H,W,3] (`unproject_depth`), depth and mask
    [B,S,H,W], extrinsics [B,S,3,4] w2c, intrinsics [B,S,3,3] -> (tracks [B,S,N,2] pixels, vis [B,S,N] bool). A point
    is visible in frame s when it projects in front of the camera, inside the image, onto a valid pixel whose depth
    agrees with the point's to `occlusion_tol` (relative): otherwise something nearer hides it. A query without
    valid depth is visible nowhere."""
    B, S, H, W = depth.shape
    u, v = query.long().unbind(-1)
    b = torch.arange(B, device=depth.device)[:, None]
    world, valid = world_points[b, 0, v, u].float(), mask[b, 0, v, u]  # [B,N,3], [B,N]
    cam = torch.einsum("bsij,bnj->bsni", extrinsics[..., :3].float(), world) + extrinsics[:, :, None, :, 3].float()
    z = cam[..., 2]
    xy = torch.einsum("bsij,bsnj->bsni", intrinsics.float(), cam)[..., :2] / z.clamp_min(1e-6)[..., None]
    x, y = xy.unbind(-1)
    inside = (z > 1e-6) & (x >= -0.5) & (x <= W - 0.5) & (y >= -0.5) & (y <= H - 0.5)
    ui, vi = x.round().long().clamp(0, W - 1), y.round().long().clamp(0, H - 1)
    s = torch.arange(S, device=depth.device)[None, :, None]
    seen, ok = depth[b[:, :, None], s, vi, ui].float(), mask[b[:, :, None], s, vi, ui]
    vis = inside & ok & ((seen - z).abs() <= occlusion_tol * z) & valid[:, None]
    return xy, vis

@torch.no_grad()
def normalize_scene(extrinsics: Tensor, intrinsics: Tensor, depth: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Ground truth in the frame VGGT predicts in: frame 0 is the world, unit mean distance of valid points to it.

    extrinsics [B,S,3,4] w2c, intrinsics [B,S,3,3], depth [B,S,H,W], mask [B,S,H,W] bool ->
    dict(extrinsics, intrinsics, depth, world_points [B,S,H,W,3], mask, scale [B]).
    """
    extrinsics, depth = extrinsics.float(), depth.float()
    mask = mask & torch.isfinite(depth) & (depth > 0)
    depth = torch.where(mask, depth, torch.zeros_like(depth))
    E = compose(extrinsics, se3_inverse(extrinsics[:, :1]))  # world := camera 0
    pts = unproject_depth(depth, E, intrinsics)
    dist = pts.norm(dim=-1) * mask
    scale = (dist.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)).clamp(1e-6, 1e6)  # [B]
    s = scale[:, None, None, None]
    E = torch.cat([E[..., :3], E[..., 3:] / scale[:, None, None, None]], -1)
    return dict(extrinsics=E, intrinsics=intrinsics.float(), depth=depth / s, world_points=pts / s[..., None],
                mask=mask, scale=scale)


# -------------------------------------------------------------------------------------------------- rotations
def quat_to_mat(q: Tensor) -> Tensor:
    """Quaternions xyzw [..., 4] (need not be unit) -> rotation matrices [..., 3, 3]."""
    i, j, k, r = q.unbind(-1)
    two_s = 2.0 / (q * q).sum(-1)
    m = torch.stack(
        (
            1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
            two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
            two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
        ),
        dim=-1,
    )
    return m.reshape(q.shape[:-1] + (3, 3))


def mat_to_quat(m: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> quaternions xyzw [..., 4] with w >= 0 (best-conditioned branch)."""
    if m.shape[-2:] != (3, 3):
        raise InvalidInput(f"expected rotation matrices [..., 3, 3], got {tuple(m.shape)}")
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.reshape(m.shape[:-2] + (9,)).unbind(-1)
    sq = torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=-1)
    pos = sq > 0  # sqrt of the positive part, with a zero (not inf) gradient where it is 0
    q_abs = torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))  # 2|r|,2|i|..
    cands = torch.stack(  # each row: (r, i, j, k) scaled by one of 4|r|, 4|i|, 4|j|, 4|k|
        (
            torch.stack((q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), -1),
            torch.stack((m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20), -1),
            torch.stack((m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21), -1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2), -1),
        ),
        dim=-2,
    ) / (2.0 * q_abs[..., None].clamp_min(0.1))
    best = q_abs.argmax(-1)[..., None, None].expand(*q_abs.shape[:-1], 1, 4)
    rijk = cands.gather(-2, best).squeeze(-2)
    q = rijk[..., [1, 2, 3, 0]]
    return torch.where(q[..., 3:4] < 0, -q, q)


# --------------------------------------------------------------------------------------------- pose encodings
def vggt_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """extrinsics [B,S,3,4] (w2c OpenCV), intrinsics [B,S,3,3] -> pose_enc [B,S,9] = [t, quat xyzw, fov_h, fov_w]."""
    H, W = image_hw
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    return torch.cat((extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]), dim=-1).float()


def vggt_pose_decoding(pose_enc: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """pose_enc [..., 9] -> (extrinsics [..., 3, 4] w2c OpenCV, intrinsics [..., 3, 3], principal point at centre)."""
    H, W = image_hw
    R = quat_to_mat(pose_enc[..., 3:7])
    extrinsics = torch.cat((R, pose_enc[..., :3, None]), dim=-1)
    fy = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    intrinsics = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = W / 2
    intrinsics[..., 1, 2] = H / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


def da3_pose_decoding(pose_enc: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """DA3 pose_enc [..., 9] -> (extrinsics w2c OpenCV [..., 3, 4], intrinsics [..., 3, 3]).

    The encoding holds the camera-to-world pose; fx = (W/2) / max(tan(fov_w/2), 1e-6), principal point at centre.
    """
    H, W = image_hw
    c2w = torch.cat((quat_to_mat(pose_enc[..., 3:7]), pose_enc[..., :3, None]), dim=-1)
    fy = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0).clamp_min(1e-6)
    fx = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0).clamp_min(1e-6)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    intrinsics = torch.stack(
        (fx, zero, zero + W / 2, zero, fy, zero + H / 2, zero, zero, one), dim=-1
    ).unflatten(-1, (3, 3))
    return se3_inverse(c2w), intrinsics


def da3_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """extrinsics (w2c, [..., 3, 4] or [..., 4, 4]) + intrinsics -> DA3 pose_enc [..., 9] of the camera-to-world pose."""
    H, W = image_hw
    c2w = se3_inverse(extrinsics[..., :3, :4])
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    quat = mat_to_quat(c2w[..., :3, :3])
    return torch.cat((c2w[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]), dim=-1).float()
