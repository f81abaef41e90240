"""Image shards (WebDataset tars of `<key>.<image ext>` + `<key>.cls`): read them back in order
(prep's `<split>-NNNNNN.tar`, sample sets), decode with the one evaluation transform (shorter side
bicubic to S, centre crop: SPEC "rFID"), and write PNG shards atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from infra import storage
from infra.shards import read_samples, tar_bytes

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def read_image_shard(url: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image, class) per sample of one WebDataset tar, in shard order (infra.shards
    key rules); class -1 if absent; samples without an image are passed over."""
    for sample in read_samples(url):
        image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        if image is None:
            continue
        label = sample.get("cls", sample.get("label"))
        yield sample["__key__"], image, int(label.decode().strip()) if label is not None else -1


def decode_image(data: bytes, size: int | None) -> np.ndarray:
    """Encoded image -> uint8 HWC RGB at size x size (resize_center_crop; SPEC "rFID": the val
    protocol). Images already of that size, or size None, are left untouched."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None:
        img = resize_center_crop(img, size)
    return np.asarray(img, dtype=np.uint8)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side bicubic to `size`, centre crop `size` x `size`: torchvision's Resize(S) +
    CenterCrop(S) arithmetic (SPEC "rFID"). The one evaluation transform (data_prep.transforms
    .EvalTransform applies it too); an image already of that size is returned as it is."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def image_batches(
    shard_urls: list[str], size: int, batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, uint8 images [B, 3, size, size], labels [B]) over the shards in order; every sample
    once. Corrupt images are skipped and counted by the caller through the key list."""
    keys, images, labels = [], [], []
    for url in shard_urls:
        for key, data, label in read_image_shard(url):
            try:
                images.append(decode_image(data, size))
            except Exception:  # corrupt image: skipped (DEVELOPERS.md "Bad input")
                continue
            keys.append(f"{os.path.basename(url)}/{key}")
            labels.append(label)
            if len(keys) == batch_size:
                yield keys, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)
                keys, images, labels = [], [], []
    if keys:
        yield keys, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)


def glob_shards(spec: str) -> list[str]:
    """Shard list from a directory (all *.tar), a glob, or a comma-separated list of tar URLs."""
    out: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        fs, path = storage.filesystem(part)
        protocol = part.split("://", 1)[0] + "://" if "://" in part else ""
        if any(c in path for c in "*?["):
            matches = fs.glob(path)
        elif fs.isdir(path):
            matches = fs.glob(f"{path.rstrip('/')}/*.tar")
        else:
            matches = [path] if fs.exists(path) else []
        if not matches:
            raise FileNotFoundError(f"no image shards at {part}")
        out += [
            protocol + m if protocol and not m.startswith(protocol) else m
            for m in sorted(matches)
            if not storage.is_temporary(m)
        ]
    return out


def png_bytes(image_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return buf.getvalue()


def write_png_shard(url: str, samples: list[tuple[str, np.ndarray, int]]) -> str:
    """Atomically write (key, uint8 HWC, class) samples as `<key>.png` + `<key>.cls`; returns sha256."""
    data = tar_bytes(
        {"__key__": key, "png": png_bytes(image), "cls": str(int(label)).encode()}
        for key, image, label in samples
    )
    storage.write_bytes_atomic(url, data)
    return storage.sha256_bytes(data)
