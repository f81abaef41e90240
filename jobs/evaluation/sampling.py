"""Class-balanced sampling for generation metrics (SPEC "gFID": 50k samples, 50 per class, uint8).

The release's protocol (see "sampling" below): labels interleaved over all classes, a seed per batch
of sample indices (the set does not depend on the number of actors), uint8 by truncation. Each Ray
actor holds the generator (GPT) and the tokenizer, samples codes (models.generator.sample, the
configured CFG schedule), decodes them and writes PNG WebDataset shards (`<index>.png`,
`<index>.cls`) with a receipt naming the request's fingerprint; the driver then streams every
sample, in index order, into an ADM-style `samples.npz` (`arr_0` NHWC uint8, `arr_1` labels), which
the ADM / GigaTok evaluators read directly (jobs.evaluation.generation writes the set's manifest).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from infra import storage
from infra.image_shards import decode_image, read_image_shard, write_png_shard
from models.generator import sample

SAMPLES_NPZ = "samples.npz"


# The release's protocol (issue 12): sample i asks for class i % num_classes, so every run of
# num_classes consecutive samples holds each class once and any split of the set (ADM's IS splits of
# 5,000, a partial set) sees all classes equally. The set is cut into shards of `samples_per_shard`
# consecutive indices, sampled in batches of `batch_size` from the shard's first index; each batch's
# generator is seeded by (seed, index of its first sample), so the set does not depend on how many
# actors drew it (shard j -> actor j % n). Images: clamp(255 x, 0, 255) truncated to uint8, the
# release's rounding (NOTES.md quirk 1: the sampler clamps 255·x).
SAMPLING_PROTOCOL = 2  # bump when labels, seeding or rounding change (invalidates sample sets)


def interleaved_labels(num_classes: int, per_class: int) -> np.ndarray:
    """[num_classes * per_class] labels 0, 1, ..., C-1, 0, 1, ...: every class `per_class` times."""
    return np.arange(num_classes * per_class, dtype=np.int64) % num_classes


def shard_plan(total: int, samples_per_shard: int) -> list[tuple[int, int]]:
    """[start, end) of each shard of consecutive sample indices."""
    return [(s, min(s + samples_per_shard, total)) for s in range(0, total, samples_per_shard)]


def shard_name(index: int) -> str:
    return f"samples-{index:06d}.tar"


def batch_seed(seed: int, first_index: int) -> int:
    """The seed of the batch starting at sample `first_index` (independent of actors)."""
    return (int(seed) * 1_000_003 + int(first_index)) % (2**63)


def to_uint8_release(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] decoder output -> uint8 the release's way: scale by 255, clamp, truncate."""
    return (images.detach().float() * 255).clamp(0, 255).to(torch.uint8)


def pick_device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def receipt_url(out_url: str, index: int) -> str:
    return storage.join(out_url, shard_name(index).replace(".tar", ".json"))


def finished_shard(out_url: str, index: int, fp: str) -> dict | None:
    """The shard's receipt when the shard exists and was written for request fingerprint `fp`."""
    receipt = storage.read_json(receipt_url(out_url, index))
    if (
        receipt
        and receipt.get("fingerprint") == fp
        and storage.exists(storage.join(out_url, receipt["name"]))
    ):
        return receipt
    return None


@torch.inference_mode()
def sample_shards(
    tokenizer: Any,
    generator: Any,
    device: str,
    shards: list[tuple[int, int, int]],
    labels: np.ndarray,
    seed: int,
    sampler: dict,
    batch_size: int,
    out_url: str,
    fp: str,
) -> dict:
    """Sample the shards (index, start, end) given to one actor into `samples-<index>.tar` PNG shards
    (keys = global sample index) with a receipt each (`samples-<index>.json`: the request
    fingerprint, count, sha256), written after the shard; shards with a matching receipt are kept."""

    done, t0, passes, batches, drawn = [], time.time(), 0, 0, 0
    for index, start, end in shards:
        receipt = finished_shard(out_url, index, fp)
        if receipt is None:
            part = []
            for b in range(start, end, batch_size):
                # a copy: Ray hands `labels` over read-only, which torch.as_tensor warns about
                y = torch.tensor(labels[b : min(b + batch_size, end)], device=device)
                gen = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
                result = sample(generator, y, generator=gen, **sampler)
                passes, batches, drawn = passes + result.num_forward_passes, batches + 1, drawn + len(y)
                images = (
                    to_uint8_release(tokenizer.decode_codes(result.codes)).permute(0, 2, 3, 1).cpu().numpy()
                )
                part += [(f"{b + i:07d}", images[i], int(y[i])) for i in range(len(y))]
            name = shard_name(index)
            receipt = {
                "name": name,
                "index": index,
                "start": start,
                "count": len(part),
                "fingerprint": fp,
                "sha256": write_png_shard(storage.join(out_url, name), part),
            }
            storage.write_json_atomic(receipt_url(out_url, index), receipt)
        done.append(receipt)
    return {
        "shards": done,
        "seconds": time.time() - t0,
        "sampled": drawn,
        "forward_passes_per_batch": passes / batches if batches else 0.0,
    }


def write_npz(out_url: str, shard_urls: list[str], count: int | None = None) -> tuple[str, list[int]]:
    """ADM-style samples.npz: arr_0 [N, H, W, 3] uint8, arr_1 [N] labels, in shard order, written
    one image at a time into the (uncompressed, zip64) archive: no full stack in memory. `count`
    (known from the shard receipts) saves a counting pass over the shards."""
    import zipfile

    if count is None:
        count = sum(1 for url in shard_urls for _ in read_image_shard(url))
    first = next((item for url in shard_urls for item in read_image_shard(url)), None)
    shape = decode_image(first[1], None).shape if first is not None else (0, 0, 3)
    labels, written = [], 0
    url = storage.join(out_url, SAMPLES_NPZ)
    with (
        storage.atomic_open(url, "wb") as fh,
        zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        with zf.open("arr_0.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": "|u1", "fortran_order": False, "shape": (count, *shape)}
            )
            for shard in shard_urls:
                for _, data, label in read_image_shard(shard):
                    image = decode_image(data, None)
                    if image.shape != shape:
                        raise ValueError(f"{shard}: sample of shape {image.shape}, expected {shape}")
                    out.write(np.ascontiguousarray(image).tobytes())
                    labels.append(label)
                    written += 1
            if written != count:
                raise ValueError(f"{out_url}: the shards hold {written} samples, their receipts {count}")
        with zf.open("arr_1.npy", "w") as out:
            np.lib.format.write_array(out, np.asarray(labels, np.int64))
    return url, [count, *shape]
