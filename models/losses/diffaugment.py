"""Differentiable augmentation (Zhao et al. 2020, "DiffAugment") for the discriminator inputs.

SPEC "discriminator": DiffAugment color/translation/cutout on real and fake images alike. Every op is
differentiable w.r.t. the image, so the generator gets gradients through it. Each sample draws its own
parameters. Images are expected in [-1, 1] (the range the DiffAugment colour ops were designed for:
brightness shifts by U(-0.5, 0.5) and padding/cutout fill with 0, i.e. mid-grey).
"""
from __future__ import annotations

import torch

DEFAULT_POLICY = "color,translation,cutout"
TRANSLATION_RATIO = 0.125  # shift up to 1/8 of the side, as DiffAugment's default
CUTOUT_RATIO = 0.5  # erase a square of half the side


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype, generator=generator)


def rand_brightness(x, generator=None):
    return x + (_rand(x, generator) - 0.5)


def rand_saturation(x, generator=None):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, generator) * 2) + mean


def rand_contrast(x, generator=None):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5) + mean


def rand_translation(x, generator=None, ratio: float = TRANSLATION_RATIO):
    """Shift each image by an integer offset in [-ratio*side, ratio*side], filling with zeros."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device, generator=generator)
    tx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - ty  # source row of each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - tx
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # [B, H, W]
    flat_index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w)
    shifted = x.reshape(b, x.size(1), h * w).gather(2, flat_index.expand(-1, x.size(1), -1))
    return shifted.view_as(x) * inside.unsqueeze(1).to(x.dtype)


def rand_cutout(x, generator=None, ratio: float = CUTOUT_RATIO):
    """Zero a (ratio*H) x (ratio*W) square at a random centre (it may be clipped by the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - ch // 2, cx - cw // 2
    erased = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~erased).unsqueeze(1).to(x.dtype)


AUGMENTS = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "translation": (rand_translation,),
    "cutout": (rand_cutout,),
}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; valid: {sorted(AUGMENTS)}")
    return names


def diff_augment(x: torch.Tensor, policy: str = DEFAULT_POLICY,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the ops of `policy` (comma-separated names from AUGMENTS) in order to x [B, C, H, W]."""
    for name in parse_policy(policy):
        for op in AUGMENTS[name]:
            x = op(x, generator)
    return x.contiguous()
