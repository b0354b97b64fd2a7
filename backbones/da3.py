"""Depth Anything 3 (any-view network), state-dict compatible with the official depth-anything/DA3-LARGE weights.

Architecture (written from the official ByteDance-Seed/Depth-Anything-3 code; see DESIGN.md section 4):
- ``backbone.pretrained``: DINOv2 ViT-L/14 (no registers, no mask token, bicubic pos-embed interpolation without
  antialias and with DINOv2's 0.1 offset; block LayerNorm eps 1e-6, final norm eps 1e-5). Per frame the tokens are
  [cls, patches]. Blocks ``>= alt_start`` (8) have q/k LayerNorm and 2D RoPE (frequency 100); among them the odd
  ones attend across all views (``scope="global"``, tokens of the S frames concatenated), all others within a
  frame (``scope="frame"``). RoPE positions: frame blocks use (row+1, col+1) for patches and (0, 0) for the first
  token; global blocks use (1, 1) for every patch and (0, 0) for the first token.
- at block ``alt_start`` the first token of every frame is replaced by a learned camera token
  (``camera_token[:, 0]`` for the reference view, ``camera_token[:, 1]`` for the others).
- with >= 3 views the reference view is chosen before block ``alt_start - 1`` (``ref_view_strategy``, default
  "saddle_balanced": the view whose cls-token similarity / norm / variance are closest to the median of the views)
  and moved to the front; the outputs are put back in the input order.
- outputs of layers 11, 15, 19, 23: concat(last frame-block output, normed layer output) [B, S, N, 2048]; the patch
  part feeds the DualDPT head (``heads_da3.py``), the first token of layer 23 (not normed) the camera decoder
  (``cam_dec``: 2 x (Linear + ReLU) -> t (3), quaternion xyzw (4), fov (2, ReLU)).
- ``pose_enc`` [t, q, fov_h, fov_w] decodes to camera-to-world [R|t]; ``extrinsics`` are its inverse (world to
  camera, OpenCV), intrinsics have fx = (W/2) / tan(fov_w/2) (tan clamped at 1e-6) and the principal point at the
  image centre.
- ``cam_enc`` (optional conditioning on known cameras): pose encoding of the camera-to-world matrices -> MLP ->
  LayerNorm -> 4 transformer blocks over the S view tokens -> LayerNorm; replaces the learned camera tokens.

Input normalisation: the official *network* does not normalise its input; the official input processor applies the
ImageNet mean/std before it. lite3r's contract is ``model(images in [0,1])`` for every backbone, so ``normalize=True``
(default) applies the ImageNet mean/std inside ``forward``; ``normalize=False`` feeds the input as it is (what the
parity fixture does; then call ``normalize_images`` yourself to reproduce the official pipeline).

Memory: only the 4 output layers are kept, each built (normed, in the head's dtype) as soon as it exists - or, with
``kept_fp8``, as FP8 + per-token scales (backbones/kept.py); the head runs ``frames_chunk_size`` frames at a time
and writes its outputs chunk by chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .cameras import da3_pose_decoding as pose_encoding_to_extri_intri  # camera geometry: backbones/cameras.py
from .cameras import da3_pose_encoding as extri_intri_to_pose_encoding
from .cameras import mat_to_quat, quat_to_mat, se3_inverse  # noqa: F401
from .heads_da3 import DualDPT
from .kept import KeptLayer
from .layers import (Block, DinoViT, Mlp, RoPE2D, chunk_frames, frame_chunks, init_vit_weights, patch_positions,
                     rope_table, set_token_chunk)
from .vggt import IMAGENET_MEAN, IMAGENET_STD
from lite3r_recon.errors import InvalidInput

REF_VIEW_STRATEGIES = ("first", "middle", "saddle_balanced", "saddle_sim_range")
REF_SELECTION_MIN_VIEWS = 3  # the official code reorders views only from 3 views on


@dataclass(frozen=True)
class DA3Config:
    name: str = "da3-large"
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    img_size: int = 518  # the learned position embedding's grid (interpolated to other sizes)
    mlp_ratio: float = 4.0
    out_layers: tuple[int, ...] = (11, 15, 19, 23)
    alt_start: int = 8  # first block with cross-view attention (odd blocks from here on) and camera tokens
    qknorm_start: int = 8
    rope_start: int = 8
    rope_freq: float = 100.0
    head_features: int = 256
    head_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    head_features_2: int = 32
    cam_enc_depth: int = 4
    cam_enc_heads: int = 16
    # inference options (read at every forward; may be changed with dataclasses.replace on model.config)
    normalize: bool = True  # apply the ImageNet mean/std inside forward (input in [0,1]); False: feed as is
    ref_view_strategy: str = "saddle_balanced"
    frames_chunk_size: int | None = 8
    kept_fp8: bool = False  # kept layers as FP8 + per-token scales (inference; backbones/kept.py, on when deployed)
    mlp_chunk_tokens: int | None = None  # inference: block MLPs over at most this many tokens at a time (layers.Block)
    with_ray: bool = False  # also return the aux head's ray / ray_conf (the official net drops them)
    grad_checkpointing: bool = False  # recompute the trunk blocks in backward (training only)

    def __post_init__(self):
        if self.ref_view_strategy not in REF_VIEW_STRATEGIES:
            raise InvalidInput(f"ref_view_strategy must be one of {REF_VIEW_STRATEGIES}, got {self.ref_view_strategy!r}")
        if len(self.out_layers) != 4 or not all(0 <= i < self.depth for i in self.out_layers):
            raise InvalidInput(f"out_layers must be 4 block indices < depth={self.depth}, got {self.out_layers}")
        if self.alt_start % 2:
            raise InvalidInput(f"alt_start must be even (the block that receives the camera tokens is a frame block), "
                             f"got {self.alt_start}")
        if len(self.head_out_channels) != 4:
            raise InvalidInput(f"head_out_channels needs 4 entries, got {self.head_out_channels}")
        if self.mlp_chunk_tokens is not None and self.mlp_chunk_tokens < 1:
            raise InvalidInput(f"mlp_chunk_tokens must be >= 1 or None, got {self.mlp_chunk_tokens}")


CONFIGS: dict[str, DA3Config] = {
    "da3-large": DA3Config(),
    # Same code, small: forward+backward of 2-4 views at 126x168 in well under a second on CPU.
    "da3-tiny": DA3Config(
        name="da3-tiny",
        embed_dim=64,
        depth=6,
        num_heads=2,
        img_size=224,
        out_layers=(1, 3, 4, 5),
        alt_start=2,
        qknorm_start=2,
        rope_start=2,
        head_features=32,
        head_out_channels=(16, 32, 64, 64),
        head_features_2=8,
        cam_enc_depth=1,
        cam_enc_heads=2,
    ),
    # The GPU study's teacher (lite3r pretrain da3 --size small): ~28 M parameters.
    "da3-small": DA3Config(
        name="da3-small",
        embed_dim=384,
        depth=12,
        num_heads=6,
        out_layers=(3, 7, 9, 11),
        alt_start=4,
        qknorm_start=4,
        rope_start=4,
        head_features=64,
        head_out_channels=(64, 128, 256, 256),
        head_features_2=32,
        cam_enc_depth=1,
        cam_enc_heads=6,
    ),
}


def normalize_images(images: Tensor) -> Tensor:
    """[..., 3, H, W] in [0,1] -> ImageNet-normalised (what the official DA3 input processor does)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------------- cameras





class CameraDec(nn.Module):
    """Camera token [B, S, 2C] -> pose_enc [B, S, 9] (t, quaternion xyzw, relu'd fov_h, fov_w)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_qvec = nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, token: Tensor) -> Tensor:
        f = self.backbone(token).float()
        return torch.cat((self.fc_t(f), self.fc_qvec(f), self.fc_fov(f)), dim=-1)


class CameraEnc(nn.Module):
    """Known cameras -> camera tokens [B, S, C] (used instead of the learned ones when cameras are given)."""

    def __init__(self, dim: int, *, depth: int = 4, num_heads: int = 16) -> None:
        super().__init__()
        self.pose_branch = Mlp(9, dim // 2, dim)
        self.token_norm = nn.LayerNorm(dim)
        # attention over the S view tokens of one sample: cross-view
        self.trunk = nn.Sequential(*[Block(dim, num_heads, init_values=0.01, scope="camera") for _ in range(depth)])
        self.trunk_norm = nn.LayerNorm(dim)

    def forward(self, extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
        tokens = self.token_norm(self.pose_branch(extri_intri_to_pose_encoding(extrinsics, intrinsics, image_hw)))
        return self.trunk_norm(self.trunk(tokens))


# ----------------------------------------------------------------------------------------------- reference view


def select_reference_view(x: Tensor, strategy: str) -> Tensor:
    """x [B, S, N, C] (first token = cls) -> index [B] of the reference view."""
    B, S = x.shape[:2]
    if S <= 1 or strategy == "first":
        return torch.zeros(B, dtype=torch.long, device=x.device)
    if strategy == "middle":
        return torch.full((B,), S // 2, dtype=torch.long, device=x.device)
    cls = x[:, :, 0]
    unit = cls / cls.norm(dim=-1, keepdim=True)
    sim = unit @ unit.mT - torch.eye(S, device=x.device, dtype=x.dtype)
    if strategy == "saddle_sim_range":
        return (sim.max(-1).values - sim.min(-1).values).argmax(1)

    def unit_range(m: Tensor) -> Tensor:
        lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
        return (m - lo) / (hi - lo + 1e-8)

    score = sum((unit_range(m) - 0.5).abs() for m in (sim.sum(-1) / (S - 1), cls.norm(dim=-1), unit.var(dim=-1)))
    return score.argmin(1)


def reference_order(ref: Tensor, S: int) -> Tensor:
    """[B] reference indices -> [B, S] view order with the reference first, the others in input order."""
    pos = torch.arange(S, device=ref.device).expand(ref.shape[0], S)
    order = torch.where((pos > 0) & (pos <= ref[:, None]), pos - 1, pos)
    order[:, 0] = ref
    return order


def _take_views(x: Tensor, order: Tensor) -> Tensor:
    return x[torch.arange(x.shape[0], device=x.device)[:, None], order]


def _views_back(x: Tensor, back: Tensor | None) -> Tensor:
    return x if back is None else _take_views(x, back)


# ----------------------------------------------------------------------------------------------- model


class DA3(nn.Module):
    """Depth Anything 3: ``forward(images [B,S,3,H,W] or [S,3,H,W] in [0,1], extrinsics=None, intrinsics=None)``.

    Returns ``depth`` [B,S,H,W], ``depth_conf`` [B,S,H,W], ``extrinsics`` [B,S,3,4] (w2c OpenCV), ``intrinsics``
    [B,S,3,3], ``pose_enc`` [B,S,9] (the camera decoder's raw output) and, with ``config.with_ray``, ``ray`` /
    ``ray_conf``. H and W must be multiples of 14. ``extrinsics``/``intrinsics`` (w2c [B,S,3|4,4], [B,S,3,3]) condition
    the network on known cameras through ``cam_enc`` as the official ``forward`` does.
    See the module docstring for ``config.normalize``.
    """

    optional_checkpoint_prefixes: tuple[str, ...] = ()

    def __init__(self, config: DA3Config = DA3Config()) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        c = config
        self.backbone = nn.Module()
        self.backbone.pretrained = DinoViT(
            embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, patch_size=c.patch_size,
            img_size=c.img_size, mlp_ratio=c.mlp_ratio, init_values=1.0, norm_eps=1e-6,
            interpolate_antialias=False, interpolate_offset=0.1, with_mask_token=False, make_block=self._make_block,
        )
        vit = self.backbone.pretrained
        vit.norm = nn.LayerNorm(c.embed_dim)  # the official final norm keeps torch's eps 1e-5
        vit.camera_token = nn.Parameter(torch.zeros(1, 2, c.embed_dim))
        self.head = DualDPT(
            2 * c.embed_dim, patch_size=c.patch_size, features=c.head_features, out_channels=c.head_out_channels,
            head_features_2=c.head_features_2,
        )
        self.cam_dec = CameraDec(2 * c.embed_dim)
        self.cam_enc = CameraEnc(c.embed_dim, depth=c.cam_enc_depth, num_heads=c.cam_enc_heads)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def _make_block(self, i: int) -> Block:
        c = self.config
        return Block(
            c.embed_dim, c.num_heads, mlp_ratio=c.mlp_ratio, init_values=1.0, norm_eps=1e-6,
            qk_norm=i >= c.qknorm_start, rope=RoPE2D(c.rope_freq) if i >= c.rope_start else None,
            scope="global" if i >= c.alt_start and i % 2 == 1 else "frame",
        )

    def reset_parameters(self) -> None:
        """Fresh init for models not loaded from a checkpoint: trunc-normal linears, small special tokens."""
        init_vit_weights(self)
        nn.init.normal_(self.backbone.pretrained.camera_token, std=0.02)

    def attention_scopes(self) -> dict[str, str]:
        """fqn -> "frame" | "global" | "camera" for every attention module (what ``lite3r.swap_attention`` filters on)."""
        return {n: m.scope for n, m in self.named_modules() if hasattr(m, "qkv") and hasattr(m, "scope")}

    def forward(self, images: Tensor, extrinsics: Tensor | None = None, intrinsics: Tensor | None = None) -> dict:
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5 or images.shape[2] != 3:
            raise InvalidInput(f"expected images [B,S,3,H,W] or [S,3,H,W], got {tuple(images.shape)}")
        if (extrinsics is None) != (intrinsics is None):
            raise InvalidInput("extrinsics and intrinsics must be given together (or neither)")
        H, W = images.shape[-2:]
        cam_tokens = None
        if extrinsics is not None:
            with torch.autocast(images.device.type, enabled=False):
                cam_tokens = self.cam_enc(extrinsics.float(), intrinsics.float(), (H, W))
        head_dtype = self.head.norm.weight.dtype  # fp32 as the official net; bf16 once deployed (lite3r bench)
        set_token_chunk(self, self.config.mlp_chunk_tokens)
        feats, cam_token = self._backbone(images, cam_tokens, head_dtype,
                                          kept_fp8=self.config.kept_fp8 and not torch.is_grad_enabled())
        with torch.autocast(images.device.type, enabled=False):
            out = self.head(feats, (H, W), self.config.frames_chunk_size, self.config.with_ray)
            pose_enc = self.cam_dec(cam_token.float())
            out["extrinsics"], out["intrinsics"] = pose_encoding_to_extri_intri(pose_enc, (H, W))
            out["pose_enc"] = pose_enc
        return out

    def _backbone(self, images: Tensor, cam_tokens: Tensor | None, feats_dtype: torch.dtype | None = None,
                  kept_fp8: bool = False) -> tuple[list[Tensor], Tensor]:
        """images [B,S,3,H,W] (normalised here when ``config.normalize``) -> (4 patch-token tensors [B, S, N_patch,
        2C] in ``feats_dtype`` (default: as computed) - KeptFP8 with ``kept_fp8`` -, last-layer camera token
        [B, S, 2C])."""
        c, vit = self.config, self.backbone.pretrained
        B, S, _, H, W = images.shape
        h, w = H // c.patch_size, W // c.patch_size
        # the normalised copy lives only for the patch embedding (3 GB at 1024 views)
        x = vit.prepare_tokens((normalize_images(images) if c.normalize else images).flatten(0, 1))
        x = x.unflatten(0, (B, S))  # [B, S, 1 + h*w, C]
        N, C = x.shape[2:]
        pos_frame = patch_positions(B * S, h, w, 1, device=x.device)  # [B*S, N, 2]
        one = torch.ones(1, N, 2, dtype=pos_frame.dtype, device=x.device)
        one[:, 0] = 0
        pos_global = one.repeat(1, S, 1).expand(B, -1, -1)  # patches (1, 1), first token (0, 0)
        if c.rope_start < len(vit.blocks):  # cos/sin once per forward, shared by every RoPE block; one frame's
            # table serves all frames (they share their positions)
            pos_frame = rope_table(pos_frame[:1], C // c.num_heads, c.rope_freq)
            pos_global = rope_table(pos_global, C // c.num_heads, c.rope_freq)
        back = None  # the view order back to the input's, once the reference view is moved to the front
        feats, cam_token = [], None
        ckpt = c.grad_checkpointing and self.training and torch.is_grad_enabled()
        frames = chunk_frames(c.mlp_chunk_tokens, N)  # inference: the frame blocks a chunk of frames at a time

        def run(blk: nn.Module, t: Tensor, pos: Tensor, inplace: bool = True) -> Tensor:
            if ckpt:
                return torch.utils.checkpoint.checkpoint(blk, t, pos, use_reentrant=False)
            return blk(t, pos, inplace=inplace)  # (inference: t is overwritten; grad enabled: a new tensor)

        for i, blk in enumerate(vit.blocks):
            if i == c.alt_start - 1 and S >= REF_SELECTION_MIN_VIEWS and cam_tokens is None:
                order = reference_order(select_reference_view(x, c.ref_view_strategy), S)
                x, back = _take_views(x, order), torch.argsort(order, dim=1)
            if i == c.alt_start:
                if cam_tokens is None:
                    tok = vit.camera_token.to(x.dtype)
                    cam = torch.cat((tok[:, :1].expand(B, 1, C), tok[:, 1:].expand(B, S - 1, C)), dim=1)
                else:
                    cam = cam_tokens.to(x.dtype)
                x = torch.cat((cam[:, :, None], x[:, :, 1:]), dim=2)
            # a kept layer is concat(last frame-block output, normed layer output) of the patches, in input order;
            # at a global block the block runs out of place and both halves are stored after it (the frame half
            # stored first would hold the layer's storage through the global attention, the forward's peak)
            layer = None
            if i in c.out_layers:
                layer = KeptLayer(2, 0, fp8=kept_fp8, chunk=c.frames_chunk_size, dtype=feats_dtype, order=back)
            if blk.attn.scope == "global":
                frame_out = x  # (x here is the last frame-block output: blocks alternate)
                x = run(blk, x.reshape(B, S * N, C), pos_global, inplace=layer is None).reshape(B, S, N, C)
                if layer is not None:
                    layer.put(frame_out[:, :, 1:])
                    cam_local = _views_back(frame_out[:, :, 0], back).clone()  # (not a view holding frame_out)
                del frame_out
            else:  # (in place in chunks: x is the last block's output, already kept where it is kept)
                t = x.reshape(B * S, N, C)
                x = (run(blk, t, pos_frame) if frames is None else frame_chunks(blk, t, pos_frame, frames))
                x = x.reshape(B, S, N, C)
                if layer is not None:
                    layer.put(x[:, :, 1:])
                    cam_local = _views_back(x[:, :, 0], back)
            if layer is not None:
                layer.put(x[:, :, 1:], vit.norm)
                feats.append(layer.result())
                cam_token = torch.cat((cam_local, _views_back(x[:, :, 0], back)), dim=-1)
        return feats, cam_token

    @staticmethod
    def to_cameras(out: dict, image_hw: tuple[int, int]) -> dict[str, Tensor]:
        """Model output -> extrinsics [B,S,3,4] (w2c OpenCV), intrinsics [B,S,3,3], depth [B,S,H,W], depth_conf."""
        H, W = image_hw
        if tuple(out["depth"].shape[-2:]) != (H, W):
            raise InvalidInput(f"image_hw {(H, W)} does not match the depth maps {tuple(out['depth'].shape[-2:])}")
        return {k: out[k] for k in ("extrinsics", "intrinsics", "depth", "depth_conf")}


MODEL = DA3
