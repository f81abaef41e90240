"""Image decoding and the training / evaluation transforms (PIL in, uint8 CHW tensors out).

Training (paper App. A.2; SPEC "recipe"): "images are first randomly resized with a factor
between [0.8, 1.0], and then cropped to 256x256 at a random position", then a horizontal flip.
No aspect-ratio jitter is described, so the crop is square: side = f * shorter side with
f ~ U(crop_scale_min, 1), at a uniform random position, resized (bicubic) to S. This equals
resizing the image by S / (f * shorter side) and cropping S x S at a random position.

Evaluation (SPEC "rFID"): shorter side bicubic to S, centre crop; the arithmetic follows
torchvision's Resize(S) + CenterCrop(S) exactly, so results match that reference pipeline.

Decoding: JPEG draft mode (DCT-domain downscaling by 1/2, 1/4, 1/8) is used for training only,
and only down to a size where the smallest crop still has at least S pixels, so the final
bicubic step never upsamples what draft removed. Evaluation decodes at full resolution.
Images stay uint8 until the batch is on the consumer side ([0, 1] float there).
"""
from __future__ import annotations

import io
import math
import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC


def decode(data: bytes, min_shorter_side: Optional[int] = None) -> Image.Image:
    """RGB PIL image; with `min_shorter_side`, JPEGs decode reduced but not below that side."""
    image = Image.open(io.BytesIO(data))
    if min_shorter_side and image.format == "JPEG":
        w, h = image.size
        factor = min_shorter_side / min(w, h)
        if factor <= 0.5:  # draft only ever reduces by powers of two
            image.draft("RGB", (math.ceil(w * factor), math.ceil(h * factor)))
    return image if image.mode == "RGB" else image.convert("RGB")


def to_chw_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 in [0, 1] (SPEC "recipe": images in [0,1])."""
    return images.float().div_(255.0)


class TrainTransform:
    """Random square crop of f * shorter side, f ~ U(scale_min, 1), bicubic to S, flip p=0.5."""

    def __init__(self, size: int, scale_min: float = 0.8, hflip: bool = True, draft: bool = True):
        if not 0 < scale_min <= 1:
            raise ValueError(f"crop_scale_min={scale_min}: must be in (0, 1]")
        self.size, self.scale_min, self.hflip, self.draft = size, scale_min, hflip, draft

    def decode(self, data: bytes) -> Image.Image:
        return decode(data, math.ceil(self.size / self.scale_min) if self.draft else None)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        w, h = image.size
        side = max(1, round(rng.uniform(self.scale_min, 1.0) * min(w, h)))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        out = image.resize((self.size, self.size), BICUBIC, box=(x, y, x + side, y + side))
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


class EvalTransform:
    """Shorter side bicubic to S, centre crop S (torchvision Resize(S) + CenterCrop(S) arithmetic)."""

    def __init__(self, size: int, draft: bool = False):
        self.size, self.draft = size, draft

    def decode(self, data: bytes) -> Image.Image:
        return decode(data, self.size if self.draft else None)

    def __call__(self, image: Image.Image, rng: Optional[random.Random] = None) -> Image.Image:
        s = self.size
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), BICUBIC)
        left = int(round((new_w - s) / 2.0))
        top = int(round((new_h - s) / 2.0))
        return image.crop((left, top, left + s, top + s))
