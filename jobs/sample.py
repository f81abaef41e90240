"""Class-balanced sampling for generation metrics (SPEC "gFID": 50k samples, 50 per class, uint8).

Labels are class-major (N of class 0, N of class 1, ...) and cut into contiguous rank slices;
rank r samples its slice with a torch.Generator seeded (seed, r), so a run is reproducible for a
fixed number of actors. Each Ray actor holds the generator (GPT) and the tokenizer, samples codes
(models.generator.sample, the configured CFG schedule), decodes them, clamps and rounds to uint8,
and writes PNG WebDataset shards (`<key>.png`, `<key>.cls`); the driver then packs every sample
into an ADM-style `samples.npz` (`arr_0` NHWC uint8, `arr_1` labels), which the ADM / GigaTok
evaluators read directly, and writes the sample set's manifest last.

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
def class_balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def rank_slices(total: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per rank, sizes differing by at most one."""
    bounds = np.linspace(0, total, world + 1).round().astype(int)
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(world)]


def rank_seed(seed: int, rank: int) -> int:
    return int(seed) * 1_000_003 + int(rank)


def sampler_kwargs(sampling: Any) -> dict:
    """configs.schema.SamplingConfig -> models.generator.sample keyword arguments."""
    return {"cfg_scale": float(sampling.cfg_scale), "cfg_schedule": str(sampling.cfg_schedule),
            "start_ratio": float(sampling.cfg_start_ratio), "temperature": float(sampling.temperature),
            "top_k": int(sampling.top_k), "top_p": float(sampling.top_p),
            "min_cfg_scale": float(sampling.min_cfg_scale), "release_cfg_floor": bool(sampling.release_cfg_floor)}


def pick_device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


@torch.inference_mode()
def sample_slice(tokenizer: Any, generator: Any, device: str, rank: int, start: int, labels: np.ndarray, seed: int,
                 sampler: dict, batch_size: int, out_url: str, samples_per_shard: int) -> dict:
    """Sample one rank's slice of labels into `samples-r<rank>-<n>.tar` PNG shards (global keys)."""
    from jobs.metrics.image_quality import to_uint8
    from models.generator import sample

    gen = torch.Generator(device=device).manual_seed(rank_seed(seed, rank))
    pending, shards, t0, passes = [], [], time.time(), 0
    for b in range(0, len(labels), batch_size):
        y = torch.as_tensor(labels[b:b + batch_size], device=device)
        result = sample(generator, y, generator=gen, **sampler)
        passes += result.num_forward_passes
        images = to_uint8(tokenizer.decode_codes(result.codes)).permute(0, 2, 3, 1).cpu().numpy()
        pending += [(f"{start + b + i:07d}", images[i], int(y[i])) for i in range(len(y))]
        while len(pending) >= samples_per_shard or (pending and b + batch_size >= len(labels)):
            part, pending = pending[:samples_per_shard], pending[samples_per_shard:]
            name = f"samples-r{rank:03d}-{len(shards):05d}.tar"
            shards.append({"name": name, "count": len(part),
                           "sha256": write_png_shard(storage.join(out_url, name), part)})
    num_batches = max(1, -(-len(labels) // batch_size))
    return {"rank": rank, "count": len(labels), "shards": shards, "seconds": time.time() - t0,
            "forward_passes_per_batch": passes / num_batches}


def write_npz(out_url: str, shard_urls: list[str]) -> tuple[str, list[int]]:
    """ADM-style samples.npz: arr_0 [N, H, W, 3] uint8 (sample order, as generated), arr_1 [N] labels."""
    images, labels = [], []
    for url in shard_urls:
        for _, data, label in read_shard(url):
            images.append(decode_image(data, None))
            labels.append(label)
    arr = np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    url = storage.join(out_url, SAMPLES_NPZ)
    with storage.atomic_open(url, "wb") as fh:
        np.savez(fh, arr_0=arr, arr_1=np.asarray(labels, np.int64))
    return url, list(arr.shape)


def generate_samples(cfg: Any, out_url: str, tokenizer_url: str, generator_url: str,
                     sampling: Any | None = None, pool: Any | None = None) -> dict:
    """Sample the class-balanced set into `out_url` on a Ray actor pool; returns its manifest.
    Skips when `out_url` already holds a complete manifest for the same request."""
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
    labels = class_balanced_labels(num_classes, per_class)
    request = {"sampler": sampler, "seed": int(sampling.seed), "per_class": per_class,
               "num_classes": num_classes, "batch_size": int(sampling.batch_size),
               "tokenizer": tokenizer_url, "generator": generator_url,
               "generator_sha": storage.sha256_url(storage.join(generator_url, "generator_ema.safetensors"))
               if storage.exists(storage.join(generator_url, "generator_ema.safetensors")) else ""}
    fp = fingerprint(request)
    manifest = storage.read_json(storage.join(out_url, "manifest.json"))
    if manifest and manifest.get("complete") and manifest.get("fingerprint") == fp:
        return manifest
    storage.makedirs(out_url)
    storage.remove_stale_temporaries(out_url)
    from jobs.evaluate import get_pool

    pool = pool or get_pool(cfg)
    slices = rank_slices(len(labels), pool.size)
    t0 = time.time()
    results = pool.call("sample", [(r, s, labels[s:e]) for r, (s, e) in enumerate(slices)], tokenizer_url,
                        generator_url, int(sampling.seed), sampler, int(sampling.batch_size), out_url,
                        int(cfg.eval.samples_per_shard))
    world = pool.size
    seconds = time.time() - t0
    shard_names = [s["name"] for r in sorted(results, key=lambda r: r["rank"]) for s in r["shards"]]
    npz_url, npz_shape = write_npz(out_url, [storage.join(out_url, n) for n in shard_names])
    manifest = {"complete": True, "fingerprint": fp, "request": request, "num_samples": len(labels),
                "num_actors": world, "shards": shard_names,
                "shard_sha256": {s["name"]: s["sha256"] for r in results for s in r["shards"]},
                "npz": SAMPLES_NPZ, "npz_shape": npz_shape, "npz_sha256": storage.sha256_url(npz_url),
                "seconds": round(seconds, 2), "images_per_second": len(labels) / max(seconds, 1e-9),
                "forward_passes_per_batch": results[0]["forward_passes_per_batch"]}
    storage.write_json_atomic(storage.join(out_url, "manifest.json"), manifest)
    print(f"[sample] {len(labels)} samples ({per_class}/class x {num_classes}) on {world} actors in "
          f"{seconds:.1f}s ({manifest['images_per_second']:.1f} img/s) -> {out_url}", flush=True)
    return manifest


def samples_url(cfg: Any, sampling: Any | None = None) -> str:
    """<evaluate dir>/samples/<hash of the sampling settings and count>."""
    from omegaconf import OmegaConf

    from pipeline import paths
    from pipeline.manifest import fingerprint
    from pipeline.stages import stage_fingerprint

    sampling = sampling if sampling is not None else cfg.sampling
    settings = OmegaConf.to_container(sampling) if OmegaConf.is_config(sampling) else dict(vars(sampling))
    key = fingerprint({"sampling": settings, "per_class": int(cfg.eval.num_samples_per_class)},
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
