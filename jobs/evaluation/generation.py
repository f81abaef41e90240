"""A class-balanced sample set of a trained generator, drawn on the evaluation actor pool
(jobs.evaluation.sampling has the protocol), with its manifest written last."""

from __future__ import annotations

import time
from typing import Any

from configs.loading import from_yaml_text, sampler_kwargs
from configs.schema import RestokConfig
from infra import paths, storage
from infra.manifest import fingerprint
from infra.stages import stage_fingerprint
from jobs.evaluation.pool import get_pool
from jobs.evaluation.sampling import (
    SAMPLES_NPZ,
    SAMPLING_PROTOCOL,
    interleaved_labels,
    shard_plan,
    write_npz,
)
from jobs.training.checkpoints import weights_name


def generate_samples(
    cfg: RestokConfig,
    out_url: str,
    tokenizer_url: str,
    generator_url: str,
    sampling: Any | None = None,
    pool: Any | None = None,
) -> dict:
    """Sample the class-interleaved set into `out_url` on a Ray actor pool; returns its manifest.
    Skips when `out_url` already holds a complete manifest for the same request; resumes from the
    shards whose receipts match it otherwise."""

    sampling = sampling if sampling is not None else cfg.sampling
    sampler = sampler_kwargs(sampling)
    # Codes decode with the tokenizer weights they were extracted with (extract.use_ema).
    decoder_weights = weights_name("tokenizer", bool(cfg.extract.use_ema))

    fs, cpath = storage.filesystem(storage.join(generator_url, "config.yaml"))
    with fs.open(cpath, "r") as fh:
        num_classes = int(from_yaml_text(fh.read()).generator.num_classes)
    per_class = int(cfg.eval.num_samples_per_class)
    labels = interleaved_labels(num_classes, per_class)
    per_shard = int(cfg.eval.samples_per_shard)
    request = {
        "sampler": sampler,
        "seed": int(sampling.seed),
        "per_class": per_class,
        "num_classes": num_classes,
        "batch_size": int(sampling.batch_size),
        "samples_per_shard": per_shard,
        "protocol": SAMPLING_PROTOCOL,
        "tokenizer": tokenizer_url,
        "generator": generator_url,
        "tokenizer_sha": _export_sha(tokenizer_url, decoder_weights),
        "generator_sha": _export_sha(generator_url, "generator_ema.safetensors"),
    }
    fp = fingerprint(request)
    manifest = storage.read_json(storage.join(out_url, "manifest.json"))
    if manifest and manifest.get("complete") and manifest.get("fingerprint") == fp:
        return manifest
    storage.makedirs(out_url)
    storage.remove_stale_temporaries(out_url)

    pool = pool or get_pool(cfg)
    plan = [(j, s, e) for j, (s, e) in enumerate(shard_plan(len(labels), per_shard))]
    t0 = time.time()
    results = pool.call(
        "sample",
        [(plan[a :: pool.size],) for a in range(pool.size)],
        labels,
        storage.join(tokenizer_url, decoder_weights),
        generator_url,
        int(sampling.seed),
        sampler,
        int(sampling.batch_size),
        out_url,
        fp,
    )
    world = pool.size
    seconds = time.time() - t0
    receipts = sorted((r for res in results for r in res["shards"]), key=lambda r: r["index"])
    shard_names = [r["name"] for r in receipts]
    npz_url, npz_shape = write_npz(
        out_url, [storage.join(out_url, n) for n in shard_names], sum(r["count"] for r in receipts)
    )
    sampled = sum(r["sampled"] for r in results)
    manifest = {
        "complete": True,
        "fingerprint": fp,
        "request": request,
        "num_samples": len(labels),
        "num_actors": world,
        "shards": shard_names,
        "shard_sha256": {r["name"]: r["sha256"] for r in receipts},
        "label_order": "interleaved",
        "sampled_now": sampled,
        "npz": SAMPLES_NPZ,
        "npz_shape": npz_shape,
        "npz_sha256": storage.sha256_url(npz_url),
        "seconds": round(seconds, 2),
        "images_per_second": sampled / max(seconds, 1e-9),
        "forward_passes_per_batch": max(r["forward_passes_per_batch"] for r in results),
    }
    storage.write_json_atomic(storage.join(out_url, "manifest.json"), manifest)
    print(
        f"[sample] {len(labels)} samples ({per_class}/class x {num_classes}, interleaved; "
        f"{sampled} drawn now) "
        f"on {world} actors in {seconds:.1f}s ({manifest['images_per_second']:.1f} img/s) -> {out_url}",
        flush=True,
    )
    return manifest


def _export_sha(url: str, name: str) -> str:
    path = storage.join(url, name)
    return storage.sha256_url(path) if storage.exists(path) else ""


def samples_url(cfg: RestokConfig, sampling: Any | None = None) -> str:
    """<evaluate dir>/samples/<hash of the sampling settings and count>."""
    from omegaconf import OmegaConf

    sampling = sampling if sampling is not None else cfg.sampling
    settings = OmegaConf.to_container(sampling) if OmegaConf.is_config(sampling) else dict(vars(sampling))
    key = fingerprint(
        {
            "sampling": settings,
            "per_class": int(cfg.eval.num_samples_per_class),
            "samples_per_shard": int(cfg.eval.samples_per_shard),
            "protocol": SAMPLING_PROTOCOL,
        },
        {
            "train_generator": stage_fingerprint(cfg, "train_generator"),
            "train_tokenizer": stage_fingerprint(cfg, "train_tokenizer"),
        },
    )
    return storage.join(paths.stage_dir(cfg, "evaluate"), "samples", key)
