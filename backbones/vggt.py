"""VGGT (Visual Geometry Grounded Transformer), state-dict compatible with the official facebook/VGGT-1B weights.

Architecture (written from the official facebookresearch/vggt code; see DESIGN.md section 4):
- ``aggregator.patch_embed``: DINOv2 ViT-L/14 with 4 register tokens (24 blocks, LayerNorm eps 1e-6, antialiased
  bicubic pos-embed interpolation), run per frame on ImageNet-normalised images; its final-norm patch tokens are
  the input tokens.
- per frame: [camera token, 4 register tokens, patches]; frame 0 uses the first of the two learned camera/register
  tokens, the other frames the second. RoPE2D (frequency 100) positions are (row+1, col+1) for patches and (0, 0)
  for the 5 special tokens.
- ``aggregator.frame_blocks[i]`` (attention within each frame, ``scope="frame"``) then
  ``aggregator.global_blocks[i]`` (attention over all S frames' tokens, ``scope="global"``), i < 24, both with q/k
  LayerNorm and RoPE. Layer i's output is concat(frame_i, global_i) [B, S, P, 2048].
- ``camera_head``: LayerNorm'd camera tokens of the last layer, 4 refinement iterations of adaLN modulation by the
  embedded current pose (a learned empty pose first), a 4-block trunk at 2048 (attention across the S camera
  tokens), pose_branch MLP delta; activation: translation/quaternion linear, FoV relu.
- ``depth_head`` / ``point_head``: DPT over layers (4, 11, 17, 23); depth ``exp`` + conf ``1+exp``; world points
  ``inv_log`` + conf ``1+exp``. Heads run in fp32 (the official code disables autocast for them).

Pose encoding: [t (3), quaternion xyzw (4), fov_h, fov_w]; extrinsics are OpenCV world-to-camera [R|t] with frame
0 as the world; intrinsics have the principal point at the image centre.

Memory-lean inference (``lean=True``, default): the aggregator keeps only the layer outputs the heads read
(4, 11, 17, 23 - the camera head reads the last) instead of all 24; the DPT heads run ``frames_chunk_size`` frames
at a time. Keeping fewer layers is bit-identical to ``lean=False``; frame chunks equal one big batch to float
rounding (tested). ``head_dtype="bfloat16"`` runs the camera and DPT heads under bf16 autocast instead of fp32 (the
head activations stay fp32). Error vs fp32 heads on the parity input (VGGT-1B recipe weights, 2 x 196 x 280, CPU;
``python -m lite3r_backbones ../shared/reference``), as rms / max error over the output's std:
pose_enc 4.2e-3 / 8.2e-3, depth 4.1e-2 / 1.3e-1, depth_conf 2.6e-2 / 1.0e-1, world_points 2.5e-3 / 1.0e-2,
world_points_conf 2.6e-2 / 1.1e-1 (depth and the confidences have a tiny spread with random weights, std ~2e-3
around ~1 and ~2: relative to their magnitude the max error is < 3e-4).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cameras import mat_to_quat, quat_to_mat  # noqa: F401  (camera geometry: backbones/cameras.py)
from .cameras import vggt_pose_decoding as pose_encoding_to_extri_intri
from .cameras import vggt_pose_encoding as extri_intri_to_pose_encoding
from .heads import DPTHead
from .kept import KeptLayer
from .layers import (Block, DinoViT, Mlp, RoPE2D, chunk_frames, frame_chunks, init_vit_weights, patch_positions,
                     set_token_chunk)
from .track_head import TrackHead
from lite3r_recon.errors import InvalidInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VGGTConfig:
    """Architecture + inference options. Architecture fields must match the checkpoint; the rest are free."""

    name: str = "vggt-1b"
    img_size: int = 518  # the DINOv2 pos-embed grid (37 x 37); any multiple of 14 runs (interpolated)
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # frame/global block pairs
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_embed_depth: int = 24  # DINOv2 trunk blocks
    patch_embed_heads: int = 16
    rope_freq: float = 100.0
    init_values: float = 0.01
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_iterations: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_head_features_2: int = 32
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True  # the tracking head (runs only when forward gets query_points)
    track_features: int = 128
    track_hidden_size: int = 384
    track_depth: int = 6  # update-transformer layers
    track_corr_levels: int = 7  # correlation pyramid levels: images need >= 2 * 2**(levels-1) px a side
    track_iters: int = 4
    # inference / memory options (do not change the weights)
    lean: bool = True  # keep only the aggregator layers the heads read
    frames_chunk_size: int | None = 8  # DPT heads over this many frames at a time (None: all at once)
    kept_fp8: bool = False  # kept layers as FP8 + per-token scales (inference; backbones/kept.py, on when deployed)
    mlp_chunk_tokens: int | None = None  # inference: per-token work (MLPs, SLA projections, frame blocks) in chunks
    head_dtype: str = "float32"  # "float32" (official) or "bfloat16" (autocast, measured error in docs)
    grad_checkpointing: bool = False  # recompute aggregator blocks in backward (training only)

    def __post_init__(self):
        if self.embed_dim % self.num_heads or self.embed_dim % self.patch_embed_heads:
            raise InvalidInput(f"{self.name}: embed_dim {self.embed_dim} must be divisible by the head counts")
        if (self.embed_dim // self.num_heads) % 4:
            raise InvalidInput(f"{self.name}: head dim must be a multiple of 4 for 2D RoPE")
        if len(self.intermediate_layer_idx) != 4 or not all(0 <= i < self.depth for i in self.intermediate_layer_idx):
            raise InvalidInput(f"{self.name}: intermediate_layer_idx needs 4 indices in [0, {self.depth})")
        if self.head_dtype not in ("float32", "bfloat16"):
            raise InvalidInput(f"{self.name}: head_dtype must be 'float32' or 'bfloat16', got {self.head_dtype!r}")
        if self.track_hidden_size % 8 or self.track_features % 2:
            raise InvalidInput(f"{self.name}: track_hidden_size must be divisible by 8 (heads), track_features even")
        if self.frames_chunk_size is not None and self.frames_chunk_size < 1:
            raise InvalidInput(f"{self.name}: frames_chunk_size must be >= 1 or None")
        if self.mlp_chunk_tokens is not None and self.mlp_chunk_tokens < 1:
            raise InvalidInput(f"mlp_chunk_tokens must be >= 1 or None, got {self.mlp_chunk_tokens}")


CONFIGS: dict[str, VGGTConfig] = {
    "vggt-1b": VGGTConfig(),
    # Same code, small: ~1.2 M parameters; forward+backward of 2-4 views at 126x168 in about a second on CPU.
    "vggt-tiny": VGGTConfig(
        name="vggt-tiny",
        embed_dim=64,
        depth=6,
        num_heads=4,
        patch_embed_depth=2,
        patch_embed_heads=4,
        intermediate_layer_idx=(1, 3, 4, 5),
        camera_trunk_depth=1,
        camera_num_heads=4,
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
        dpt_head_features_2=16,
        track_features=16,
        track_hidden_size=32,
        track_depth=1,
        track_corr_levels=3,
    ),
    # The GPU study's teacher (lite3r pretrain --size small): ~24 M parameters, 16 views at 252x252 give 5,264
    # tokens in global attention (83 key blocks of 64).
    "vggt-small": VGGTConfig(
        name="vggt-small",
        embed_dim=256,
        depth=8,
        num_heads=4,
        patch_embed_depth=4,
        patch_embed_heads=4,
        intermediate_layer_idx=(1, 3, 5, 7),
        camera_trunk_depth=1,
        camera_num_heads=4,
        dpt_features=64,
        dpt_out_channels=(64, 128, 256, 256),
        dpt_head_features_2=32,
        enable_track=False,  # pretraining has no tracking loss; a 1B-size tracker would add 47 M parameters
    ),
}


# ----------------------------------------------------------------------------------------------- aggregator


def _first_and_rest(token: Tensor, B: int, S: int) -> Tensor:
    """[1, 2, X, C] -> [B*S, X, C]: index 0 for frame 0, index 1 for frames 1..S-1."""
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    rest = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat((first, rest), dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """Alternating frame/global attention over DINOv2 patch tokens (keys ``aggregator.*``)."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.patch_embed = DinoViT(
            embed_dim=C,
            depth=cfg.patch_embed_depth,
            num_heads=cfg.patch_embed_heads,
            patch_size=cfg.patch_size,
            img_size=cfg.img_size,
            mlp_ratio=cfg.mlp_ratio,
            num_register_tokens=cfg.num_register_tokens,
            init_values=1.0,
            interpolate_antialias=True,
            interpolate_offset=0.0,
        )
        self.rope = RoPE2D(cfg.rope_freq) if cfg.rope_freq > 0 else None
        self.head_dim = C // cfg.num_heads

        def block(scope: str) -> Block:
            return Block(
                C, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, init_values=cfg.init_values, qk_norm=True,
                rope=self.rope, scope=scope,
            )

        self.frame_blocks = nn.ModuleList([block("frame") for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([block("global") for _ in range(cfg.depth)])
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, C))

    def forward(
        self, images: Tensor, keep: Sequence[int] | None = None, checkpointing: bool = False, kept_fp8: bool = False,
        frames_chunk_size: int | None = 8, chunk_tokens: int | None = None,
    ) -> tuple[list[Tensor | None], int]:
        """images [B,S,3,H,W] in [0,1] -> (outputs, patch_start_idx).

        ``outputs[i]`` is concat(frame_i, global_i) [B, S, P, 2C] for i in ``keep`` (default: every layer) and
        None for the others; P = patch_start_idx + (H/14)(W/14). ``checkpointing`` recomputes each frame/global
        block in backward (while training with grad enabled) instead of storing its activations. ``kept_fp8``:
        the outputs are ``KeptFP8`` (patch tokens FP8, packed ``frames_chunk_size`` frames at a time; the special
        tokens exact), indexed like the tensors. ``chunk_tokens`` (inference): the frame blocks run over chunks of
        frames of at most that many tokens, in place (frame attention is per frame; the global blocks chunk their
        per-token work themselves, layers.set_token_chunk).
        """
        B, S, _, H, W = images.shape
        depth = len(self.frame_blocks)
        keep = set(range(depth)) if keep is None else set(keep)
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
        x = ((images - mean) / std).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)  # [B*S, N, C]
        dt = patches.dtype
        tokens = torch.cat(
            (_first_and_rest(self.camera_token, B, S).to(dt), _first_and_rest(self.register_token, B, S).to(dt), patches),
            dim=1,
        )  # [B*S, P, C]
        del x, patches  # the normalised images and patch tokens: 2 x 3 GB at 1024 views, needed no more
        P, C = tokens.shape[1:]
        pos = patch_positions(B * S, H // self.patch_size, W // self.patch_size, self.patch_start_idx, images.device)
        pos_global = pos.reshape(B, S * P, 2)
        if self.rope is not None:  # cos/sin once per forward, shared by all 2 x depth blocks; every frame has the
            # same positions, so one frame's table serves the frame blocks (1.1 GB less at 1024 views)
            pos, pos_global = self.rope.table(pos[:1], self.head_dim), self.rope.table(pos_global, self.head_dim)

        def run(blk: nn.Module, x: Tensor, p: Tensor, inplace: bool = True) -> Tensor:
            if checkpointing and self.training and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(blk, x, p, use_reentrant=False)
            return blk(x, pos=p, inplace=inplace)  # (inference: x is overwritten; grad enabled: a new tensor)

        frames = chunk_frames(chunk_tokens, P)  # None in training: run() handles checkpointing there
        outputs: list[Tensor | None] = [None] * depth
        for i in range(depth):
            # (in place: tokens is the last global output, already kept where it is kept)
            tokens = (run(self.frame_blocks[i], tokens.reshape(B * S, P, C), pos) if frames is None else
                      frame_chunks(self.frame_blocks[i], tokens.reshape(B * S, P, C), pos, frames))
            if i not in keep:
                tokens = run(self.global_blocks[i], tokens.reshape(B, S * P, C), pos_global)
                continue
            # a kept layer: the global block out of place, both halves stored after it - the frame half stored
            # first would hold the layer's storage through the global attention, the forward's peak (session 13:
            # +2.7 GiB at 1024 views)
            frame_out = tokens
            tokens = run(self.global_blocks[i], tokens.reshape(B, S * P, C), pos_global, inplace=False)
            layer = KeptLayer(2, self.patch_start_idx, fp8=kept_fp8, chunk=frames_chunk_size)
            layer.put(frame_out.reshape(B, S, P, C))
            del frame_out
            layer.put(tokens.reshape(B, S, P, C))
            outputs[i] = layer.result()
        return outputs, self.patch_start_idx


# ----------------------------------------------------------------------------------------------- camera head


class CameraHead(nn.Module):
    """Iterative camera refinement from the last layer's camera tokens (keys ``camera_head.*``)."""

    def __init__(self, dim_in: int, *, trunk_depth: int = 4, num_heads: int = 16, init_values: float = 0.01) -> None:
        super().__init__()
        self.target_dim = 9
        # the trunk attends across the S camera tokens of a scene: a cross-view ("global") attention
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, mlp_ratio=4, init_values=init_values, scope="camera") for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def forward(self, last_tokens: Tensor, num_iterations: int = 4) -> list[Tensor]:
        """last_tokens [B, S, P, dim_in] -> list (one per iteration) of activated pose encodings [B, S, 9]."""
        tok = self.token_norm(last_tokens[:, :, 0].to(self.token_norm.weight.dtype))  # [B, S, C]
        B, S, _ = tok.shape
        pred = None
        out = []
        for _ in range(num_iterations):
            if pred is None:
                cond = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1))
            else:
                cond = self.embed_pose(pred.detach())  # no backprop through the refinement history
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tok) * (1 + scale) + shift) + tok
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            pred = delta if pred is None else pred + delta
            out.append(torch.cat((pred[..., :7], F.relu(pred[..., 7:9])), dim=-1))  # t, quat linear; fov relu
        return out


# ----------------------------------------------------------------------------------------------- model


class VGGT(nn.Module):
    """VGGT model: ``forward(images [B,S,3,H,W] or [S,3,H,W] in [0,1], query_points=None) -> dict`` (official keys).

    Returns ``pose_enc`` [B,S,9] (last iteration), ``pose_enc_list``, ``depth`` [B,S,H,W,1], ``depth_conf``
    [B,S,H,W], ``world_points`` [B,S,H,W,3], ``world_points_conf`` [B,S,H,W], and ``images`` (the input, as the
    official model does at inference). H and W must be multiples of 14 (``load_images`` does that).
    With ``query_points`` [B,Q,2] or [Q,2] (pixels x, y of the input images, in frame 0) also ``track`` [B,S,Q,2]
    (pixels, last iteration; frame 0 is the query; ``track_list``: every iteration), ``vis`` and ``conf`` [B,S,Q]
    in (0, 1), from the tracking head
    (``track_head.*``, see track_head.py). The official VGGT-1B file loads strictly as it is; a model built with
    ``enable_track=False`` has no tracking head and skips those keys only when asked
    (``skip_prefixes=model.optional_checkpoint_prefixes``). The tracking head runs at the heads' precision
    (``head_dtype``; the official code runs it under the caller's autocast instead).

    ``config`` is read at every forward, so inference options (lean, frames_chunk_size, head_dtype,
    grad_checkpointing, camera_iterations) may be changed by replacing ``model.config``
    (``dataclasses.replace``); architecture fields must not change after construction.
    """

    @property
    def optional_checkpoint_prefixes(self) -> tuple[str, ...]:
        """Official-checkpoint keys of parts this model was built without; dropped only when the caller asks."""
        return () if self.track_head is not None else ("track_head.",)

    def __init__(self, config: VGGTConfig = VGGTConfig()) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        dim2 = 2 * config.embed_dim
        self.aggregator = Aggregator(config)
        self.camera_head = (
            CameraHead(dim2, trunk_depth=config.camera_trunk_depth, num_heads=config.camera_num_heads,
                       init_values=config.init_values)
            if config.enable_camera else None
        )
        dpt = dict(
            patch_size=config.patch_size, features=config.dpt_features, out_channels=config.dpt_out_channels,
            intermediate_layer_idx=config.intermediate_layer_idx, head_features_2=config.dpt_head_features_2,
        )
        self.point_head = (
            DPTHead(dim2, output_dim=4, activation="inv_log", conf_activation="expp1", **dpt)
            if config.enable_point else None
        )
        self.depth_head = (
            DPTHead(dim2, output_dim=2, activation="exp", conf_activation="expp1", **dpt)
            if config.enable_depth else None
        )
        self.track_head = (
            TrackHead(dim2, patch_size=config.patch_size, features=config.track_features, iters=config.track_iters,
                      out_channels=config.dpt_out_channels, intermediate_layer_idx=config.intermediate_layer_idx,
                      hidden_size=config.track_hidden_size, depth=config.track_depth,
                      corr_levels=config.track_corr_levels)
            if config.enable_track else None
        )
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh init (official scheme): trunc-normal linears, tiny special tokens, LayerScale at init_values."""
        init_vit_weights(self)
        nn.init.normal_(self.aggregator.camera_token, std=1e-6)
        nn.init.normal_(self.aggregator.register_token, std=1e-6)

    @property
    def kept_layers(self) -> list[int] | None:
        """Aggregator layers kept in memory: the DPT levels + the last (camera head) when lean, else all."""
        if not self.config.lean:
            return None
        return sorted(set(self.config.intermediate_layer_idx) | {self.config.depth - 1})

    def forward(self, images: Tensor, query_points: Tensor | None = None) -> dict[str, Tensor]:
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5 or images.shape[2] != 3:
            raise InvalidInput(f"expected images [B,S,3,H,W] or [S,3,H,W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if query_points is not None:
            query_points = self._check_queries(query_points, images.shape[0])
        cfg = self.config
        set_token_chunk(self, cfg.mlp_chunk_tokens)
        tokens, patch_start_idx = self.aggregator(images, self.kept_layers, cfg.grad_checkpointing,
                                                  kept_fp8=cfg.kept_fp8 and not torch.is_grad_enabled(),
                                                  frames_chunk_size=cfg.frames_chunk_size,
                                                  chunk_tokens=cfg.mlp_chunk_tokens)
        out: dict[str, Tensor] = {}
        with self._head_precision(images.device):
            if self.camera_head is not None:
                pose_list = self.camera_head(tokens[-1], self.config.camera_iterations)
                out["pose_enc"] = pose_list[-1]
                out["pose_enc_list"] = pose_list
            if self.depth_head is not None:
                depth, conf = self.depth_head(tokens, (H, W), patch_start_idx, self.config.frames_chunk_size)
                out["depth"], out["depth_conf"] = depth, conf
            if self.point_head is not None:
                pts, conf = self.point_head(tokens, (H, W), patch_start_idx, self.config.frames_chunk_size)
                out["world_points"], out["world_points_conf"] = pts, conf
            if query_points is not None:
                tracks, out["vis"], out["conf"] = self.track_head(
                    tokens, (H, W), patch_start_idx, query_points, frames_chunk_size=self.config.frames_chunk_size)
                out["track"], out["track_list"] = tracks[-1], tracks
        if not self.training:
            out["images"] = images
        return out

    def _check_queries(self, query_points: Tensor, batch: int) -> Tensor:
        if self.track_head is None:
            raise InvalidInput(f"{self.name} was built with enable_track=False: it cannot track query_points")
        if query_points.ndim == 2:
            query_points = query_points[None]
        if query_points.ndim != 3 or query_points.shape[-1] != 2 or query_points.shape[0] not in (1, batch):
            raise InvalidInput(f"expected query_points [B,Q,2] or [Q,2] (pixels x, y) for {batch} image batch(es), "
                             f"got {tuple(query_points.shape)}")
        if not query_points.is_floating_point():
            query_points = query_points.float()
        return query_points.expand(batch, -1, -1)

    def _head_precision(self, device: torch.device):
        if self.config.head_dtype == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    @staticmethod
    def to_cameras(out: dict, image_hw: tuple[int, int]) -> dict[str, Tensor]:
        """Model output -> extrinsics [B,S,3,4] (w2c OpenCV, frame 0 = world), intrinsics, depth, depth_conf."""
        extrinsics, intrinsics = pose_encoding_to_extri_intri(out["pose_enc"], image_hw)
        return dict(extrinsics=extrinsics, intrinsics=intrinsics, depth=out["depth"][..., 0], depth_conf=out["depth_conf"])



MODEL = VGGT


def head_dtype_error(model: VGGT, images: Tensor) -> dict[str, tuple[float, float]]:
    """Error of bf16 heads vs fp32 heads on ``images`` (one shared aggregator pass): {output: (rms/std, max/std)}."""
    H, W = images.shape[-2:]
    results = {}
    config = model.config
    with torch.inference_mode():
        tokens, psi = model.aggregator(images[None] if images.ndim == 4 else images, model.kept_layers)
        for dtype in ("float32", "bfloat16"):
            model.config = dataclasses.replace(config, head_dtype=dtype)
            with model._head_precision(images.device):
                out = {"pose_enc": model.camera_head(tokens[-1], config.camera_iterations)[-1]}
                out["depth"], out["depth_conf"] = model.depth_head(tokens, (H, W), psi, config.frames_chunk_size)
                out["world_points"], out["world_points_conf"] = model.point_head(tokens, (H, W), psi, config.frames_chunk_size)
            results[dtype] = {k: v.float() for k, v in out.items()}
    model.config = config
    errors = {}
    for k, ref in results["float32"].items():
        d = results["bfloat16"][k] - ref
        errors[k] = (float(d.square().mean().sqrt() / ref.std()), float(d.abs().max() / ref.std()))
    return errors

