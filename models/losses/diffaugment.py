"""Differentiable augmentation (Zhao et al. 2020, "DiffAugment") for the discriminator inputs.

SPEC "discriminator": DiffAugment color/translation/cutout on real and fake images alike. Every op is
differentiable w.r.t. the image, so the generator gets gradients through it. Each sample draws its own
parameters. Release (diff_aug.py, policy 'color,translation,cutout_0.2', prob 0.5): each policy group
is applied with probability `prob` (one scalar draw per group, for the whole batch), cutout erases
0.2 of the side, and the ops run on [0, 1] images (brightness +-0.5 of the full range, black fill).
With `generator=None` the draws come from the global torch RNG in the release's order, so a seeded
run reproduces its augmentation exactly (tests/fixtures/official, losses_tiny).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

RELEASE_POLICY = "color,translation,cutout_0.2"
DEFAULT_POLICY = RELEASE_POLICY
TRANSLATION_RATIO = 0.125  # shift up to 1/8 of the side, as DiffAugment's default
CUTOUT_RATIO = 0.5  # plain `cutout`: erase a square of half the side (DiffAugment's default)
ValueRange = Literal[
    "unit", "signed"
]  # ops applied to [0, 1] images (release) | to [-1, 1] (DiffAugment paper)
RANGES = get_args(ValueRange)


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
    """Shift each image by an integer offset t in [-ratio*side, ratio*side] (output[i] = input[i + t],
    the release's direction), filling with zeros."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device, generator=generator)
    tx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + ty  # source row of each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) + tx
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


def _ops(name: str):
    """`color`, `translation`, `cutout` or `cutout_<ratio>` (e.g. the release's `cutout_0.2`)."""
    if name in AUGMENTS:
        return AUGMENTS[name]
    base, _, ratio = name.partition("_")
    if base == "cutout" and ratio:
        try:
            value = float(ratio)
        except ValueError:
            value = -1.0
        if 0.0 < value <= 1.0:
            return (lambda x, generator=None: rand_cutout(x, generator, value),)
    raise ValueError(
        f"unknown DiffAugment op {name!r}; valid: {sorted(AUGMENTS)} or cutout_<ratio> with ratio in (0, 1]"
    )


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    for name in names:
        _ops(name)
    return names


def diff_augment(
    x: torch.Tensor, policy: str = DEFAULT_POLICY, prob: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the op groups of `policy` in order to x [B, C, H, W]; each group runs with probability
    `prob` (one uniform draw per group, skipped when > prob, as the release; prob 1 = always, no draw)."""
    for name in parse_policy(policy):
        if prob < 1.0 and float(torch.rand(1, generator=generator)) > prob:
            continue
        for op in _ops(name):
            x = op(x, generator)
    return x.contiguous()


def augment_images(
    images: torch.Tensor,
    policy: str,
    prob: float,
    value_range: str = "unit",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiffAugment for images in [0, 1], applied in [0, 1] ("unit", release) or after mapping to
    [-1, 1] ("signed": half the brightness strength, grey fill)."""
    if value_range == "unit":
        return diff_augment(images, policy, prob, generator)
    if value_range == "signed":
        return (diff_augment(images * 2 - 1, policy, prob, generator) + 1) / 2
    raise ValueError(f"DiffAugment range {value_range!r} is not one of {list(RANGES)}")
