"""ViT block of the ResTok encoder/decoder (SPEC "ViT blocks", NOTES #8, #9) and 2D RoPE.

RoPE tables and attention masks depend only on the token layout, which changes only at the
merging blocks, so callers build them once per layout and cache them (SPEC "Speed").
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint

from models.onednn_linear import Linear, linear


@functools.cache
def flex_attention_api():
    """(create_block_mask, compiled flex_attention) on torch >= 2.5, else None. Imported on first
    use on CUDA only: the module imports torch's symbolic shapes and sympy (~0.5 s in every
    process that imports the models, and most never run on CUDA)."""
    try:  # FlexAttention: block-sparse masked attention on CUDA
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - older torch
        return None
    return create_block_mask, torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask):
    return flex_attention_api()[1](q, k, v, block_mask=block_mask)


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """pos [T, 2] (row, col) -> angles [T, head_dim/2] in float64 (NOTES #8).

    The first half of the head dim rotates by the row, the second by the column; each axis has
    head_dim/4 frequencies theta^(-2i/(head_dim/2)) over adjacent pairs (Flux-style).
    """
    axis_dim = head_dim // 2
    omega = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device="cpu") / axis_dim)
    pos = pos.to(torch.float64)
    return torch.cat([pos[:, :1] * omega, pos[:, 1:2] * omega], dim=-1)


@dataclass
class Layout:
    """Everything attention needs for one token layout, on one device."""

    cos: torch.Tensor  # [T, head_dim/2] float32
    sin: torch.Tensor
    mask: torch.Tensor | None  # [T, T] bool, True = may attend (SDPA)
    block_mask: object = None  # FlexAttention BlockMask on CUDA

    @staticmethod
    def build(
        pos: torch.Tensor, levels: torch.Tensor | None, head_dim: int, theta: float, device: torch.device
    ) -> "Layout":
        ang = rope_angles(pos, head_dim, theta)
        # Tables computed once in float64 and cast to float32, like the release (NOTES #8).
        cos = ang.cos().float().to(device)
        sin = ang.sin().float().to(device)
        mask = block_mask = None
        if levels is not None:
            lv = levels.to(device)
            mask = lv[:, None] >= lv[None, :]  # query level >= key level (SPEC "encoder mask")
            if device.type == "cuda" and flex_attention_api() is not None:

                def mask_mod(b, h, q, kv):
                    return lv[q] >= lv[kv]

                T = lv.numel()
                block_mask = flex_attention_api()[0](mask_mod, None, None, T, T, device=device)
        return Layout(cos, sin, mask, block_mask)

    def rope_matrices(self) -> torch.Tensor:
        """[T, head_dim/2, 2, 2] rotation matrices [[cos, -sin], [sin, cos]] (fixture layout)."""
        return torch.stack([self.cos, -self.sin, self.sin, self.cos], -1).unflatten(-1, (2, 2))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [..., T, head_dim] (computed in fp32, cast back)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Fused qkv without bias plus q_bias/v_bias (k bias is zero, not a parameter), qk LayerNorm
    over the head dim, RoPE after the norm, scale 1/sqrt(head_dim) (NOTES #9)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        B, T, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = linear(x, self.qkv.weight, bias).view(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd]
        # Under autocast LayerNorm returns fp32; attention kernels want one dtype.
        q = apply_rope(self.q_norm(q), layout.cos, layout.sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), layout.cos, layout.sin).to(v.dtype)
        # FlexAttention runs compiled only; under a dispatch mode (FlopCounterMode, ...) Dynamo
        # does not compile and the mode has no rule for the op: SDPA with the same mask instead.
        if layout.block_mask is not None and x.is_cuda and _get_current_dispatch_mode() is None:
            out = _flex(q, k, v, layout.block_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-LN block with LayerScale (init 1.0). A residual merging block passes `merge`, which
    runs between the attention residual and the MLP (SPEC "merging block", paper Alg. 2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, layout: Layout, merge=None) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), layout)
        if merge is not None:
            x = merge(x)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


def run_block(blk: Block, x: torch.Tensor, layout: Layout, merge=None, ckpt: bool = False) -> torch.Tensor:
    """One ViT block; with ckpt (and autograd on) its activations are recomputed in the backward."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(blk, x, layout, merge, use_reentrant=False)
    return blk(x, layout, merge)
