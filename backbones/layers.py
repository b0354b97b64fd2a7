"""Shared ViT pieces for the VGGT and Depth Anything 3 backbones.

State-dict names follow DINOv2 / the official VGGT code (``qkv``, ``proj``, ``q_norm``, ``k_norm``, ``ls1.gamma``,
``mlp.fc1`` ...), so official checkpoints load without renaming. The attention module follows the lite3r contract
(docs/architecture.md): ``qkv``/``proj`` linears, an int ``num_heads``, optional ``q_norm``/``k_norm`` over the head
dim, optional ``rope``, a ``scope`` attribute ("frame" = within one view, "global" = across views, "camera" = across the
one token per view of a camera/pose trunk: too few tokens for block sparsity, SLA leaves it alone) and
``forward(x [B,N,C], pos [B,N,2] | None = None)``. ``lite3r.swap_attention`` finds these modules by that structure;
nothing SLA- or FP8-specific lives here.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from lite3r_recon.errors import InvalidInput

Scope = Literal["frame", "global", "camera"]  # camera: across views, one token per view (pose trunks)


class LayerScale(nn.Module):
    """Per-channel residual scale (key ``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form, as DINOv2/VGGT) -> fc2."""

    # dataflow (read by lite3r.fuse_fp8_inputs): fc1 alone reads the input, fc2 alone reads act's output
    dataflow_input = "fc1"
    dataflow_feeds = {"act": "fc2"}

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


ROPE_TABLE_DIMS = 6  # rope_table's rank: how RoPE2D tells a precomputed table from raw positions [B, N, 2]


def rope_table(pos: Tensor, head_dim: int, frequency: float = 100.0) -> Tensor:
    """RoPE2D's angles, cos and sin for positions `pos` [B, N, 2] (y, x): [3, B, 1, N, 2, head_dim/2] fp32.

    What every block's RoPE2D would compute from `pos` for fp32 tokens, computed once: a model builds it in its
    forward and passes it to every block in place of `pos` (gpt-fast's precomputed freqs), so the cos/sin are not
    recomputed per block and per head under torch.compile. The angles ride along for tokens of another dtype
    (RoPE rounds the angle to the token dtype before cos/sin)."""
    if head_dim % 4:
        raise InvalidInput(f"RoPE2D needs a head dim divisible by 4, got {head_dim}")
    d = head_dim // 2
    inv_freq = 1.0 / (frequency ** (torch.arange(0, d, 2, device=pos.device).float() / d))  # [d/2]
    ang = pos.to(torch.float32)[..., None] * inv_freq  # [B, N, 2, d/2]
    ang = torch.cat((ang, ang), dim=-1)  # [B, N, 2, d]
    return torch.stack((ang, ang.cos(), ang.sin()))[:, :, None]  # [3, B, 1, N, 2, d]


class RoPE2D(nn.Module):
    """2D rotary position embedding (the DUSt3R/VGGT form; no parameters, no buffers).

    The head dim D is split in two halves: the first half rotates with the row (y) position, the second with the
    column (x) position. Within a half of size d, frequencies are ``frequency ** (-2i/d)`` for i < d/2, and the
    rotation pairs feature j with feature j + d/2 ("rotate half"). Angles are computed in fp32 and cast to the token
    dtype before cos/sin, exactly as the official table lookup does, but straight from ``pos`` (no ``pos.max()``
    host sync), so it traces cleanly under torch.compile. ``pos`` may also be ``rope_table(pos, D, frequency)``,
    computed once by the model for all its blocks (same result, bit for bit).
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = float(frequency)

    def table(self, pos: Tensor, head_dim: int) -> Tensor:
        return rope_table(pos, head_dim, self.frequency)

    def forward(self, t: Tensor, pos: Tensor) -> Tensor:
        # t [B, H, N, D], pos [B, N, 2] (integer or float positions: y, x) or its table [3, B, 1, N, 2, D/2]
        table = pos if pos.dim() == ROPE_TABLE_DIMS else self.table(pos, t.shape[-1])  # rank: static under compile
        d = t.shape[-1] // 2
        if t.dtype == torch.float32:
            cos, sin = table[1], table[2]  # [B, 1, N, 2, d]
        else:
            ang = table[0].to(t.dtype)
            cos, sin = ang.cos(), ang.sin()
        t = t.unflatten(-1, (2, d))  # [B, H, N, 2, d]  (y half, x half)
        t1, t2 = t.chunk(2, dim=-1)
        rotated = torch.cat((-t2, t1), dim=-1)
        if torch.is_grad_enabled():
            return (t * cos + rotated * sin).flatten(-2)
        # inference: t is rotated in place (the same roundings; one full-size temporary where the sum made three:
        # issue 17's peak), so the caller hands t over - every attention here replaces q / k by their rotation
        return t.mul_(cos).add_(rotated.mul_(sin)).flatten(-2)

    def extra_repr(self) -> str:
        return f"frequency={self.frequency:g}"


def patch_positions(batch: int, h: int, w: int, num_special: int, device=None) -> Tensor:
    """RoPE positions [batch, num_special + h*w, 2] as (y, x): patches at (1.., 1..), special tokens at (0, 0)."""
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    grid = torch.cartesian_prod(ys, xs) + 1  # [h*w, 2]
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat((special, grid), dim=0).expand(batch, -1, -1)


class Attention(nn.Module):
    """Multi-head self-attention: qkv -> (q_norm, k_norm) -> rope -> SDPA (scale D**-0.5) -> proj."""

    dataflow_input = "qkv"  # the one child that reads the input (lite3r.fuse_fp8_inputs)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope: nn.Module | None = None,
        scope: Scope = "global",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise InvalidInput(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        self.scope = scope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, scope={self.scope!r}"


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)).

    ``init_values=None`` builds no LayerScale (plain residual, no ``ls*.gamma`` keys).
    """

    dataflow_feeds = {"norm1": "attn", "norm2": "mlp"}  # pre-norm: each norm's output is read by one child alone

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope: nn.Module | None = None,
        scope: Scope = "global",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, rope=rope, scope=scope
        )  # q/k norm eps stays torch's 1e-5 default in both official models
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        # inference: the MLP half over at most this many tokens at a time (per token, so the same to rounding): its
        # [tokens, 4C] hidden activations bounded (11.5 GB in bf16 at 1024 VGGT views, x2 with GELU); set by the model's config
        self.mlp_chunk: int | None = None

    def forward(self, x: Tensor, pos: Tensor | None = None, inplace: bool = False) -> Tensor:
        """``inplace`` (inference, grad off): the output is written into x, which the caller must not need again -
        the residual stream is never copied (at 128 DA3-Large views each copy is 0.7 GB in fp32); the same values
        to rounding. Where the output's dtype is not x's (a bf16 stream, an fp32 LayerScale), as without it. Without
        it x is left as it was, and at inference the MLP half is added into the attention half's new tensor."""
        inference = not torch.is_grad_enabled()
        inplace = inplace and inference
        y = self.attn(self.norm1(x), pos=pos)
        if not (inplace and _add_scaled_(x, y, self.ls1)):
            x, inplace = _add_scaled(x, y, self.ls1), False
        del y
        # x may take the MLP half in place: the caller's (inplace, then it must) or this block's own new tensor
        must, may = inplace, inference
        n = self.mlp_chunk
        if n is None or x.shape[:-1].numel() <= n or not inference:
            y = self.mlp(self.norm2(x))
            if may and _add_scaled_(x, y, self.ls2):
                return x
            if must:
                raise _not_addable(x, y)
            return _add_scaled(x, y, self.ls2)
        flat, out = x.reshape(-1, x.shape[-1]), None
        for i in range(0, flat.shape[0], n):
            rows = flat[i:i + n]
            y = self.mlp(self.norm2(rows))  # each chunk reads only its own rows
            # (every chunk has the same dtypes: in place throughout, or never)
            if not (out is None and may and _add_scaled_(rows, y, self.ls2)):
                if must:
                    raise _not_addable(rows, y)
                y = _add_scaled(rows, y, self.ls2)
                if out is None:
                    out = y.new_empty((flat.shape[0], y.shape[-1]))
                out[i:i + n] = y
            del y  # (not alive through the next chunk's MLP)
        return x if out is None else out.view(x.shape)


def _add_scaled(x: Tensor, y: Tensor, ls: nn.Module) -> Tensor:
    """x + ls(y) as a new tensor, computed as _add_scaled_ computes it in place (one addcmul: in-place and
    out-of-place blocks give the same bits, so a model keeping more layers - blocks out of place - is unchanged)."""
    if isinstance(ls, LayerScale):
        return torch.addcmul(x, y, ls.gamma)
    return x + ls(y)


def _add_scaled_(x: Tensor, y: Tensor, ls: nn.Module) -> bool:
    """x += ls(y) in place, without a temporary of ls(y), when that keeps x's dtype (else False, x untouched)."""
    if isinstance(ls, LayerScale) and torch.promote_types(x.dtype, torch.promote_types(y.dtype, ls.gamma.dtype)) \
            == x.dtype:
        x.addcmul_(y, ls.gamma)
        return True
    if isinstance(ls, nn.Identity) and torch.promote_types(x.dtype, y.dtype) == x.dtype:
        x.add_(y)
        return True
    return False


def _not_addable(x: Tensor, y: Tensor) -> RuntimeError:
    # the attention half was added in place, so the MLP half must be too
    return RuntimeError(f"in-place block: the MLP output ({y.dtype}) cannot be added into the stream ({x.dtype})")


def frame_chunks(blk: nn.Module, x: Tensor, pos: Tensor | None, frames: int | None) -> Tensor:
    """blk(x, pos) of a per-frame block (frame attention) over chunks of `frames` frames of x [F, N, C]: the same
    result, a chunk's activations at a time (inference; None or >= F: one call). Written into x where the output
    dtype is x's, so the caller must not need x afterwards. pos: positions [F, N, 2] or a RoPE table with the frames
    on its second axis."""
    if frames is None or frames >= x.shape[0]:
        return blk(x, pos)
    out = None
    for f in range(0, x.shape[0], frames):
        n = min(frames, x.shape[0] - f)
        chunk = x[f:f + n]
        y = blk(chunk, _frames_of(pos, f, n), inplace=True)
        out = (x if y.dtype == x.dtype else y.new_empty(x.shape)) if out is None else out
        if y is not chunk:  # (not added in place: another dtype)
            out[f:f + n] = y
    return out


def _frames_of(pos: Tensor | None, f: int, n: int) -> Tensor | None:
    """Frames f .. f+n of positions [F, N, 2] or of a RoPE table [3, F, 1, N, 2, d]; a table of one frame (the same
    positions in every frame: rope_table of patch_positions(1, ...)) broadcasts over any chunk as it is."""
    if pos is None or (pos.dim() == ROPE_TABLE_DIMS and pos.shape[1] == 1):
        return pos
    return pos.narrow(0 if pos.dim() == 3 else 1, f, n)


def chunk_frames(chunk_tokens: int | None, tokens_per_frame: int) -> int | None:
    """Frames per chunk for frame_chunks at inference (None: training, or no chunking asked)."""
    if chunk_tokens is None or torch.is_grad_enabled():
        return None
    return max(1, chunk_tokens // tokens_per_frame)


def set_token_chunk(model: nn.Module, tokens: int | None) -> None:
    """Inference: every Block of `model` runs its MLP, and every attention with a `chunk_tokens` option (lite3r's
    SLAAttention) its projections, over at most `tokens` tokens at a time (None: all at once). The models call it
    at every eager forward with their config's value (so modules swapped in later get it too); under torch.compile
    it is a no-op (the values of the last eager call or of deploy hold)."""
    if torch.compiler.is_compiling():
        return
    for m in model.modules():
        if isinstance(m, Block):
            m.mlp_chunk = tokens
        if hasattr(m, "chunk_tokens"):
            m.chunk_tokens = tokens


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: Conv2d(k=s=patch) then flatten. [B,3,H,W] -> [B, H/p * W/p, C]."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise InvalidInput(f"image size {H}x{W} is not a multiple of the patch size {p} (see backbones.load_images)")
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINOv2 ViT trunk (keys: cls_token, pos_embed, register_tokens, mask_token, patch_embed.proj, blocks.N, norm).

    ``forward(x [B,3,H,W]) -> [B, N_patch, C]``: the final-norm patch tokens (DINOv2's ``x_norm_patchtokens``).
    The learned position embedding (for ``img_size``) is bicubically interpolated to other grids as DINOv2 does
    (``interpolate_offset`` 0 -> exact output size; VGGT uses antialias=True, offset 0). ``make_block(i)`` may build
    each block differently (DA3 turns on q/k norm + RoPE from block 8); the default is a plain DINOv2 block whose
    attention has ``scope="frame"``. Token layout: [cls, registers..., patches...].
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = 14,
        img_size: int = 518,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 0,
        init_values: float | None = 1.0,
        norm_eps: float = 1e-6,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
        with_mask_token: bool = True,
        make_block: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        if make_block is None:

            def make_block(i: int) -> nn.Module:
                return Block(
                    embed_dim, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, norm_eps=norm_eps,
                    scope="frame",
                )

        self.blocks = nn.ModuleList([make_block(i) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # unused at inference; kept so DINOv2-derived checkpoints (VGGT's) load strictly
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if with_mask_token else None

    def interpolated_pos_embed(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """Position embedding [1, 1 + h*w, C] for an h x w patch grid."""
        n = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n))
        if h * w == n and h == w:
            return self.pos_embed.to(dtype)
        pe = self.pos_embed.float()
        patch_pe = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, C, m, m]
        if self.interpolate_offset:
            kw = dict(scale_factor=((h + self.interpolate_offset) / m, (w + self.interpolate_offset) / m))
        else:
            kw = dict(size=(h, w))
        patch_pe = F.interpolate(patch_pe, mode="bicubic", antialias=self.interpolate_antialias, **kw)
        patch_pe = patch_pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((pe[:, :1], patch_pe), dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """[B,3,H,W] -> [B, 1 + R + N, C]: patch embed, cls token, position embedding, register tokens."""
        B, _, H, W = x.shape
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(B, -1, -1).to(t.dtype), t), dim=1)
        t = t + self.interpolated_pos_embed(H // self.patch_size, W // self.patch_size, t.dtype)
        if self.register_tokens is not None:
            t = torch.cat((t[:, :1], self.register_tokens.expand(B, -1, -1).to(t.dtype), t[:, 1:]), dim=1)
        return t

    def forward(self, x: Tensor) -> Tensor:
        t = self.prepare_tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 1 + self.num_register_tokens :]


def init_vit_weights(module: nn.Module) -> None:
    """timm/DINOv2-style init for freshly built (not loaded) models: trunc-normal(0.02) linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, DinoViT):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
            nn.init.normal_(m.cls_token, std=1e-6)
            if m.register_tokens is not None:
                nn.init.normal_(m.register_tokens, std=1e-6)
