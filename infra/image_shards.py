"""Class-balanced sampling for generation metrics (SPEC "gFID": 50k samples, 50 per class, uint8).

The release's protocol (see "sampling" below): labels interleaved over all classes, a seed per batch
of sample indices (the set does not depend on the number of actors), uint8 by truncation. Each Ray
actor holds the generator (GPT) and the tokenizer, samples codes (models.generator.sample, the
configured CFG schedule), decodes them and writes PNG WebDataset shards (`<index>.png`,
`<index>.cls`) with a receipt naming the request's fingerprint; the driver then streams every
sample, in index order, into an ADM-style `samples.npz` (`arr_0` NHWC uint8, `arr_1` labels), which
the ADM / GigaTok evaluators read directly, and writes the sample set's manifest last.

Also here: reading image shards back (prep's `<split>-NNNNNN.tar` or these), used by evaluation.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline import storage

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SAMPLES_NPZ = "samples.npz"


# ---- image shards: read ----------------------------------------------------------------------------
def read_shard(url: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image, class) per sample of one WebDataset tar, in shard order. The key is
    the member path up to the first dot of its basename (WebDataset's rule); class -1 if absent."""
    fs, path = storage.filesystem(url)
    key, image, label = None, None, -1
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            stem, _, ext = base.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None and image is not None:
                    yield key, image, label
                key, image, label = member_key, None, -1
            data = tar.extractfile(member).read()
            if ext.lower() in IMAGE_EXTS:
                image = data
            elif ext in ("cls", "label"):
                label = int(data.decode().strip())
        if key is not None and image is not None:
            yield key, image, label


def decode_image(data: bytes, size: int | None) -> np.ndarray:
    """Encoded image -> uint8 HWC RGB at size x size: shorter side bicubic to `size`, centre crop
    (SPEC "rFID": the val protocol). Images already of that size, or size None, are left untouched."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if size is not None and (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def image_batches(shard_urls: list[str], size: int, batch_size: int
                  ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, uint8 images [B, 3, size, size], labels [B]) over the shards in order; every sample
    once. Corrupt images are skipped and counted by the caller through the key list."""
    keys, images, labels = [], [], []
    for url in shard_urls:
        for key, data, label in read_shard(url):
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


def split_shards(shards_url: str, split: str) -> list[str]:
    """Prep's shards of `split`, in order: from its manifest (`splits.<split>.shards`), else the
    `<split>-NNNNNN.tar` files (data_prep.shard_writer naming) under `shards_url`."""
    manifest = storage.read_json(storage.join(shards_url, "manifest.json")) or {}
    entries = manifest.get("splits", {}).get(split, {}).get("shards")
    if entries:
        return [storage.join(manifest.get("shards_url") or shards_url, e["shard"]) for e in entries]
    fs, path = storage.filesystem(shards_url)
    found = sorted(p for p in fs.glob(f"{path.rstrip('/')}/{split}-*.tar") if not storage.is_temporary(p))
    protocol = shards_url.split("://", 1)[0] + "://" if "://" in shards_url else ""
    if not found:
        raise FileNotFoundError(f"no '{split}' shards ({split}-*.tar) under {shards_url}; run `restok prep` first")
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]


def resolve_shards(spec: str) -> list[str]:
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
        out += [protocol + m if protocol and not m.startswith(protocol) else m
                for m in sorted(matches) if not storage.is_temporary(m)]
    return out


# ---- image shards: write ---------------------------------------------------------------------------
def png_bytes(image_hwc: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return buf.getvalue()


def write_png_shard(url: str, samples: list[tuple[str, np.ndarray, int]]) -> str:
    """Atomically write (key, uint8 HWC, class) samples as `<key>.png` + `<key>.cls`; returns sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in samples:
            for ext, data in (("png", png_bytes(image)), ("cls", str(int(label)).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    storage.write_bytes_atomic(url, buf.getvalue())
    return storage.sha256_bytes(buf.getvalue())


# ---- sampling ---------------------------------------------------------------------------------------
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
    return (int(seed) * 1_000_003 + int(first_index)) % (2 ** 63)


def to_uint8_release(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] decoder output -> uint8 the release's way: scale by 255, clamp, truncate."""
    return (images.detach().float() * 255).clamp(0, 255).to(torch.uint8)


def sampler_kwargs(sampling: Any) -> dict:
    """configs.schema.SamplingConfig -> models.generator.sample keyword arguments."""
    return {"cfg_scale": float(sampling.cfg_scale), "cfg_schedule": str(sampling.cfg_schedule),
            "start_ratio": float(sampling.cfg_start_ratio), "temperature": float(sampling.temperature),
            "top_k": int(sampling.top_k), "top_p": float(sampling.top_p),
            "min_cfg_scale": float(sampling.min_cfg_scale), "release_cfg_floor": bool(sampling.release_cfg_floor)}


def pick_device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def receipt_url(out_url: str, index: int) -> str:
    return storage.join(out_url, shard_name(index).replace(".tar", ".json"))


def finished_shard(out_url: str, index: int, fp: str) -> dict | None:
    """The shard's receipt when the shard exists and was written for request fingerprint `fp`."""
    receipt = storage.read_json(receipt_url(out_url, index))
    if receipt and receipt.get("fingerprint") == fp and storage.exists(storage.join(out_url, receipt["name"])):
        return receipt
    return None


@torch.inference_mode()
def sample_shards(tokenizer: Any, generator: Any, device: str, shards: list[tuple[int, int, int]],
                  labels: np.ndarray, seed: int, sampler: dict, batch_size: int, out_url: str, fp: str) -> dict:
    """Sample the shards (index, start, end) given to one actor into `samples-<index>.tar` PNG shards
    (keys = global sample index) with a receipt each (`samples-<index>.json`: the request
    fingerprint, count, sha256), written after the shard; shards with a matching receipt are kept."""
    from models.generator import sample

    done, t0, passes, batches, drawn = [], time.time(), 0, 0, 0
    for index, start, end in shards:
        receipt = finished_shard(out_url, index, fp)
        if receipt is None:
            part = []
            for b in range(start, end, batch_size):
                y = torch.as_tensor(labels[b:min(b + batch_size, end)], device=device)
                gen = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
                result = sample(generator, y, generator=gen, **sampler)
                passes, batches, drawn = passes + result.num_forward_passes, batches + 1, drawn + len(y)
                images = to_uint8_release(tokenizer.decode_codes(result.codes)).permute(0, 2, 3, 1).cpu().numpy()
                part += [(f"{b + i:07d}", images[i], int(y[i])) for i in range(len(y))]
            name = shard_name(index)
            receipt = {"name": name, "index": index, "start": start, "count": len(part), "fingerprint": fp,
                       "sha256": write_png_shard(storage.join(out_url, name), part)}
            storage.write_json_atomic(receipt_url(out_url, index), receipt)
        done.append(receipt)
    return {"shards": done, "seconds": time.time() - t0, "sampled": drawn,
            "forward_passes_per_batch": passes / batches if batches else 0.0}


def write_npz(out_url: str, shard_urls: list[str], count: int | None = None) -> tuple[str, list[int]]:
    """ADM-style samples.npz: arr_0 [N, H, W, 3] uint8, arr_1 [N] labels, in shard order, written
    one image at a time into the (uncompressed, zip64) archive: no full stack in memory. `count`
    (known from the shard receipts) saves a counting pass over the shards."""
    import zipfile

    if count is None:
        count = sum(1 for url in shard_urls for _ in read_shard(url))
    first = next((item for url in shard_urls for item in read_shard(url)), None)
    shape = decode_image(first[1], None).shape if first is not None else (0, 0, 3)
    labels, written = [], 0
    url = storage.join(out_url, SAMPLES_NPZ)
    with storage.atomic_open(url, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False,
                                                       "shape": (count, *shape)})
            for shard in shard_urls:
                for _, data, label in read_shard(shard):
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


def generate_samples(cfg: Any, out_url: str, tokenizer_url: str, generator_url: str,
                     sampling: Any | None = None, pool: Any | None = None) -> dict:
    """Sample the class-interleaved set into `out_url` on a Ray actor pool; returns its manifest.
    Skips when `out_url` already holds a complete manifest for the same request; resumes from the
    shards whose receipts match it otherwise."""
    from pipeline.manifest import fingerprint

    sampling = sampling if sampling is not None else cfg.sampling
    sampler = sampler_kwargs(sampling)
    from configs.loading import (
        from_yaml_text,  # the generator's own config: its classes
    )

    fs, cpath = storage.filesystem(storage.join(generator_url, "config.yaml"))
    with fs.open(cpath, "r") as fh:
        num_classes = int(from_yaml_text(fh.read()).generator.num_classes)
    per_class = int(cfg.eval.num_samples_per_class)
    labels = interleaved_labels(num_classes, per_class)
    per_shard = int(cfg.eval.samples_per_shard)
    request = {"sampler": sampler, "seed": int(sampling.seed), "per_class": per_class,
               "num_classes": num_classes, "batch_size": int(sampling.batch_size), "samples_per_shard": per_shard,
               "protocol": SAMPLING_PROTOCOL, "tokenizer": tokenizer_url, "generator": generator_url,
               "tokenizer_sha": _export_sha(tokenizer_url, "tokenizer_ema.safetensors"),
               "generator_sha": _export_sha(generator_url, "generator_ema.safetensors")}
    fp = fingerprint(request)
    manifest = storage.read_json(storage.join(out_url, "manifest.json"))
    if manifest and manifest.get("complete") and manifest.get("fingerprint") == fp:
        return manifest
    storage.makedirs(out_url)
    storage.remove_stale_temporaries(out_url)
    from jobs.evaluate import get_pool

    pool = pool or get_pool(cfg)
    plan = [(j, s, e) for j, (s, e) in enumerate(shard_plan(len(labels), per_shard))]
    t0 = time.time()
    results = pool.call("sample", [(plan[a::pool.size],) for a in range(pool.size)], labels, tokenizer_url,
                        generator_url, int(sampling.seed), sampler, int(sampling.batch_size), out_url, fp)
    world = pool.size
    seconds = time.time() - t0
    receipts = sorted((r for res in results for r in res["shards"]), key=lambda r: r["index"])
    shard_names = [r["name"] for r in receipts]
    npz_url, npz_shape = write_npz(out_url, [storage.join(out_url, n) for n in shard_names],
                                   sum(r["count"] for r in receipts))
    sampled = sum(r["sampled"] for r in results)
    manifest = {"complete": True, "fingerprint": fp, "request": request, "num_samples": len(labels),
                "num_actors": world, "shards": shard_names, "shard_sha256": {r["name"]: r["sha256"] for r in receipts},
                "label_order": "interleaved", "sampled_now": sampled,
                "npz": SAMPLES_NPZ, "npz_shape": npz_shape, "npz_sha256": storage.sha256_url(npz_url),
                "seconds": round(seconds, 2), "images_per_second": sampled / max(seconds, 1e-9),
                "forward_passes_per_batch": max(r["forward_passes_per_batch"] for r in results)}
    storage.write_json_atomic(storage.join(out_url, "manifest.json"), manifest)
    print(f"[sample] {len(labels)} samples ({per_class}/class x {num_classes}, interleaved; {sampled} drawn now) "
          f"on {world} actors in {seconds:.1f}s ({manifest['images_per_second']:.1f} img/s) -> {out_url}", flush=True)
    return manifest


def _export_sha(url: str, name: str) -> str:
    path = storage.join(url, name)
    return storage.sha256_url(path) if storage.exists(path) else ""


def samples_url(cfg: Any, sampling: Any | None = None) -> str:
    """<evaluate dir>/samples/<hash of the sampling settings and count>."""
    from omegaconf import OmegaConf

    from pipeline import paths
    from pipeline.manifest import fingerprint
    from pipeline.stages import stage_fingerprint

    sampling = sampling if sampling is not None else cfg.sampling
    settings = OmegaConf.to_container(sampling) if OmegaConf.is_config(sampling) else dict(vars(sampling))
    key = fingerprint({"sampling": settings, "per_class": int(cfg.eval.num_samples_per_class),
                       "samples_per_shard": int(cfg.eval.samples_per_shard), "protocol": SAMPLING_PROTOCOL},
                      {"train_generator": stage_fingerprint(cfg, "train_generator"),
                       "train_tokenizer": stage_fingerprint(cfg, "train_tokenizer")})
    return storage.join(paths.stage_dir(cfg, "evaluate"), "samples", key)


def run(cfg: Any, run_id: str | None = None) -> dict:
    """`restok sample`: the class-balanced sample set of the trained generator (no metrics)."""
    from jobs.evaluate import close_pool
    from pipeline import paths, tracking
    from pipeline.manifest import require_complete

    require_complete(paths.stage_dir(cfg, "train_tokenizer"), "train_tokenizer")
    require_complete(paths.stage_dir(cfg, "train_generator"), "train_generator")
    with tracking.stage_run(cfg, "sample", run_id) as rid:
        try:
            manifest = generate_samples(cfg, samples_url(cfg), paths.stage_dir(cfg, "train_tokenizer"),
                                        paths.stage_dir(cfg, "train_generator"))
        finally:
            close_pool()
        tracking.log_metrics(paths.tracking_uri(cfg), rid, {"sample_images_per_second": manifest["images_per_second"]})
    return manifest
