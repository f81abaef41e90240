"""Image decoding and the training / evaluation transforms (PIL in, uint8 CHW tensors out).

Training (paper App. A.2; SPEC "recipe"): "images are first randomly resized with a factor
between [0.8, 1.0], and then cropped to 256x256 at a random position", then a horizontal flip.
No aspect-ratio jitter is described, so the crop is square: side = f * shorter side with
f ~ U(crop_scale_min, 1), at a uniform random position, resized (bicubic) to S. This equals
resizing the image by S / (f * shorter side) and cropping S x S at a random position.

Evaluation (SPEC "rFID"): shorter side bicubic to S, centre crop; the arithmetic follows
torchvision's Resize(S) + CenterCrop(S) exactly, so results match that reference pipeline.

Decoding for training: torchvision.io.decode_image (libjpeg-turbo / libpng) and the crop +
resize + flip as uint8 tensor ops (antialiased bicubic, torch's fast uint8 kernel): the same
crop parameters as the PIL path, about 1.7x cheaper per image than PIL decode + resize on CPU.
TrainTransform also accepts PIL images (same parameters, PIL bicubic), which the benchmark's
ImageFolder baseline uses. Evaluation stays on PIL at full resolution (bicubic as in the
reference rFID pipelines). `decode(..., min_shorter_side)` offers PIL JPEG draft mode (DCT
scaling by 1/2..1/8, never below the given side) for callers that want it.
Images stay uint8 until the batch is on the consumer side ([0, 1] float there).
"""

from __future__ import annotations

import functools
import io
import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from infra.image_shards import resize_center_crop

BICUBIC = Image.Resampling.BICUBIC


@functools.cache
def torchvision_decoder():
    """torchvision.io's decode_image as decode(bytes tensor) -> uint8 RGB CHW, or None without it.
    Imported on the first training decode: importing torchvision imports torch._dynamo (~1.4 CPU-s),
    which the driver, prep tasks and extraction / evaluation actors (all PIL) never need."""
    try:  # pinned torchvision 0.29 has it (deprecated in favour of torchcodec); PIL if a later one drops it
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # pragma: no cover
        return None
    return functools.partial(decode_image, mode=ImageReadMode.RGB)


def decode(data: bytes, min_shorter_side: int | None = None) -> Image.Image:
    """RGB PIL image; with `min_shorter_side`, JPEGs decode reduced but not below that side."""
    image = Image.open(io.BytesIO(data))
    if min_shorter_side and image.format == "JPEG":
        w, h = image.size
        factor = min_shorter_side / min(w, h)
        if factor <= 0.5:  # draft only ever reduces by powers of two
            image.draft("RGB", (math.ceil(w * factor), math.ceil(h * factor)))
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_tensor(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] (RGB) from JPEG or PNG bytes."""
    decoder = torchvision_decoder()
    if decoder is None:
        return to_chw_uint8(decode(data))
    with warnings.catch_warnings():  # 0.29 warns on every call; the pin keeps the API available
        warnings.simplefilter("ignore", DeprecationWarning)
        return decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def resized_crop_uint8(image: torch.Tensor, top: int, left: int, side: int, size: int) -> torch.Tensor:
    """The square crop [top:top+side, left:left+side] of uint8 CHW, antialiased bicubic to size x size:
    torch's native uint8 kernel, as torchvision.transforms.v2.functional.resized_crop runs it on CPU
    (same values, tests/test_data.py), without importing torchvision."""
    crop = image[..., top : top + side, left : left + side]
    if side == size:
        return crop
    out = F.interpolate(crop[None], size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    return out[0]


def to_chw_uint8(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 in [0, 1] (SPEC "recipe": images in [0,1])."""
    return images.float().div_(255.0)


class TrainTransform:
    """Random square crop of f * shorter side, f ~ U(scale_min, 1), bicubic to S, flip p=0.5.

    Works on uint8 CHW tensors (the loader's path) and on PIL images (same parameters)."""

    def __init__(self, size: int, scale_min: float = 0.8, hflip: bool = True):
        if not 0 < scale_min <= 1:
            raise ValueError(f"crop_scale_min={scale_min}: must be in (0, 1]")
        self.size, self.scale_min, self.hflip = size, scale_min, hflip

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_tensor(data)

    def params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, bool]:
        """(left, top, side, flip) of one draw."""
        side = max(1, round(rng.uniform(self.scale_min, 1.0) * min(width, height)))
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        return x, y, side, self.hflip and rng.random() < 0.5

    def __call__(self, image: Image.Image | torch.Tensor, rng: random.Random) -> Image.Image | torch.Tensor:
        s = self.size
        if isinstance(image, torch.Tensor):
            x, y, side, flip = self.params(image.shape[-1], image.shape[-2], rng)
            out = resized_crop_uint8(image, y, x, side, s)
            return out.flip(-1) if flip else out
        x, y, side, flip = self.params(*image.size, rng)
        out = image.resize((s, s), BICUBIC, box=(x, y, x + side, y + side))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion `center_crop_arr`, which the release's code extraction
    uses): halve with a box filter while the shorter side is at least 2 x size, bicubic to a
    shorter side of `size` (both sides rounded), crop at the floored centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class EvalTransform:
    """Shorter side bicubic to S, centre crop S (torchvision Resize(S) + CenterCrop(S) arithmetic)."""

    def __init__(self, size: int, draft: bool = False):
        self.size, self.draft = size, draft

    def decode(self, data: bytes) -> Image.Image:
        return decode(data, self.size if self.draft else None)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        return resize_center_crop(image, self.size)
