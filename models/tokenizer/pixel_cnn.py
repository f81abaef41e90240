"""MaskGIT-VQGAN-style pixel CNN encoder/decoder (SPEC "CNN encoder"/"CNN decoder", NOTES #2-#4).

Module names follow the release so its weights load by name. 3x3 convs use the conv's own zero
padding (no separate pad copy, SPEC "Speed").
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fp32_region(device: torch.device):
    """Autocast off (fp32 parts of SPEC); meta tensors have no autocast (shape-only runs)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for reference runs


class Fp32Conv2d(nn.Conv2d):
    """Conv2d computed in fp32 whatever its parameters' dtype: a DeepSpeed bf16 engine casts every
    weight to bf16, so the fp32 regions (SPEC "CNN decoder", NOTES #11) cast weights and input
    explicitly. Same parameters and state-dict names as nn.Conv2d; gradients reach the bf16 weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        return self._conv_forward(x.to(dt), self.weight.to(dt), _cast(self.bias, dt))


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever its parameters' dtype (see Fp32Conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        return F.group_norm(x.to(dt), self.num_groups, _cast(self.weight, dt), _cast(self.bias, dt), self.eps)


def _recomputed_if(ckpt: bool, fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x); with ckpt (and autograd on) only x is kept and fn's activations are recomputed in
    the backward (tokenizer.activation_checkpointing)."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


def _norm(channels: int, groups: int, fp32: bool = False) -> nn.GroupNorm:
    return (Fp32GroupNorm if fp32 else nn.GroupNorm)(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, bias-free convs.

    With a channel change the release's 1x1 `nin_shortcut` (out->out) is applied to the branch
    output, so the block is h + W.h with no path from the input (NOTES #3, shortcut_on_branch);
    otherwise it is a normal in->out shortcut on the input.
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, shortcut_on_branch: bool, fp32: bool = False):
        super().__init__()
        conv = Fp32Conv2d if fp32 else nn.Conv2d
        self.norm1 = _norm(in_ch, groups, fp32)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch, groups, fp32)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut_on_branch = shortcut_on_branch
        if in_ch != out_ch:
            self.nin_shortcut = conv(out_ch if shortcut_on_branch else in_ch, out_ch, 1, bias=False)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        return _recomputed_if(ckpt, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is None:
            return x + h
        return h + self.nin_shortcut(h if self.shortcut_on_branch else x)


class _AvgPool2x2(torch.autograd.Function):
    """`F.avg_pool2d(x, 2)` that keeps nothing for the backward: each input pixel's gradient is its
    output pixel's times 1/4 (exact, as aten's x / 4), so only the shape is needed. aten's
    avg_pool2d saves its full-size input: one more full-resolution map per encoder stage, with or
    without activation checkpointing (32 MiB per ResTok-L image at 256 px)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.size = x.shape[-2:]
        ctx.memory_format = (
            torch.channels_last
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        return F.avg_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, w = ctx.size
        g = F.interpolate(grad, size=(2 * grad.shape[-2], 2 * grad.shape[-1]), mode="nearest") * 0.25
        if (h, w) != g.shape[-2:]:  # odd sizes: the last row/column was not pooled
            g = F.pad(g, (0, w - g.shape[-1], 0, h - g.shape[-2]))
        return g.contiguous(memory_format=ctx.memory_format)


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    return _AvgPool2x2.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.avg_pool2d(x, 2)


def _up2_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 4 taps along kernel axis `dim` (size 3 -> 4) that nearest x2 upsampling followed by a
    3x3 conv (padding 1) applies to the low-resolution map: output row 2i uses x[i-1] with w[0]
    and x[i] with w[1]+w[2]; row 2i+1 uses x[i] with w[0]+w[1] and x[i+1] with w[2]. As a
    stride-2 transposed conv (padding 1) they are [w2, w1+w2, w0+w1, w0]. (Stack and add, not
    einsum: the compiled backward of einsum's reshapes failed on oneDNN's weight-gradient strides.)"""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class NearestUp2Conv3x3(Fp32Conv2d):
    """`conv3x3(nearest_upsample_x2(x))` computed on the low-resolution map as one stride-2
    transposed conv with 4x4 taps: the same function (the release's upsample + conv, NOTES #4),
    16 instead of 36 multiply-adds per input pixel and channel pair, in the forward and the
    backward, and no upsampled copy. Parameters and state dict are the 3x3 conv's."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        w = _up2_taps(_up2_taps(self.weight.to(dt), 2), 3).transpose(0, 1)  # (in, out, 4, 4)
        return F.conv_transpose2d(x.to(dt), w, _cast(self.bias, dt), stride=2, padding=1)


class _Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], upsample_ch: int | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        # Decoder stages end with nearest x2 + 3x3 conv (NOTES #4); encoder stages have no params.
        self.upsample_conv = NearestUp2Conv3x3(upsample_ch) if upsample_ch is not None else None


class PixelEncoder(nn.Module):
    """conv_in -> stages (res blocks, 2x2 avg pool between) -> 2 mid blocks -> GN/SiLU -> 1x1."""

    def __init__(
        self,
        base: int,
        channel_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int,
        shortcut_on_branch: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(3, base, 3, padding=1, bias=False)
        stages, in_ch = [], base
        for mult in channel_mult:
            out_ch = base * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, groups, shortcut_on_branch))
                in_ch = out_ch
            stages.append(_Stage(blocks))
        self.down = nn.ModuleList(stages)
        self.mid = nn.ModuleList([ResBlock(in_ch, in_ch, groups, shortcut_on_branch) for _ in range(2)])
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 1)

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            # Inference on CPU: oneDNN's full-resolution 3x3 convs run faster on channels-last
            # maps (the tiny tokenizer's encode 1.24x). Not in training: CPU GroupNorm's
            # channels-last backward is slower (the tiny training step 0.96x with it).
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        for i, stage in enumerate(self.down):
            for blk in stage.block:
                h = blk(h, ckpt)
            if i < len(self.down) - 1:
                h = avg_pool2x2(h)
        for blk in self.mid:
            h = blk(h, ckpt)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


class PixelDecoder(nn.Module):
    """Mirror of the encoder; `up.<i>` is resolution level i and runs i = n-1 .. 0 (NOTES #4).
    Every layer is an Fp32* layer: the decoder computes in fp32 even with bf16 weights (SPEC)."""

    def __init__(
        self,
        base: int,
        channel_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int,
        shortcut_on_branch: bool,
    ):
        super().__init__()
        ch = base * channel_mult[-1]
        self.conv_in = Fp32Conv2d(z_channels, ch, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(ch, ch, groups, shortcut_on_branch, fp32=True) for _ in range(2)])
        stages: list[nn.Module] = [None] * len(channel_mult)  # type: ignore[list-item]
        for i in reversed(range(len(channel_mult))):
            out_ch = base * channel_mult[i]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, groups, shortcut_on_branch, fp32=True))
                ch = out_ch
            stages[i] = _Stage(blocks, upsample_ch=ch if i > 0 else None)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(ch, groups, fp32=True)
        self.conv_out = Fp32Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        # SPEC: the CNN decoder runs in fp32 (NOTES #11: it casts its input to float32); autocast
        # off, and every layer casts its own weights (Fp32Conv2d / Fp32GroupNorm).
        with fp32_region(z.device):
            h = self.conv_in(z.to(torch.promote_types(z.dtype, torch.float32)))
            for blk in self.mid:
                h = blk(h, ckpt)
            for stage in reversed(self.up):
                for blk in stage.block:
                    h = blk(h, ckpt)
                if stage.upsample_conv is not None:
                    h = stage.upsample_conv(h)  # nearest x2 then 3x3 conv, fused
            # GroupNorm, SiLU and conv_out keep three full-resolution maps (96 MiB per ResTok-L
            # image); recomputed, only their input is kept.
            return _recomputed_if(ckpt, self._out, h)

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))
