"""Stage "prep": a data source -> WebDataset shards `{split}-%06d.tar` + a manifest.

The shard plan is fixed before anything is written: shard i of a split holds samples
[i*n, (i+1)*n) of the source's deterministic sample list (n = data.samples_per_shard). Each shard
is one Ray task (at most data.prep_tasks in flight); a shard whose done record names the current
stage fingerprint and plan is skipped, so a rerun after a kill writes only what is missing, and
shards of another config are deleted and redone, never reused (issue 19). Stale temporaries of killed
writers and shards outside the plan (left by another config) are removed first, so the output
ends as exactly the planned shard set.

memory:// lives inside one process, so for memory:// URLs the shard writers run as threads of
the driver instead of Ray tasks (tests); every other URL (local, file://, s3://, gs://) uses Ray.
Train samples are shuffled once (fixed seed) before sharding; val keeps the source order.
"""
from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Optional

from omegaconf import OmegaConf

from configs.schema import RestokConfig
from data_prep.shard_writer import (
    DONE_DIR,
    ShardJob,
    existing_record,
    stale_reason,
    write_shard,
)
from data_prep.sources import make_source
from infra import manifest as manifest_lib
from infra import paths, storage
from infra.console import progress
from infra.stages import stage_fingerprint
from infra.tracking import log_metrics

STAGE = "prep"
# Train samples are shuffled once, with this fixed seed, before sharding: ImageNet listings are
# sorted by class, and class-sorted shards would make every shuffle buffer nearly one class.
# Fixed (not a config value) so the plan, and the prep fingerprint, do not depend on it.
TRAIN_ORDER_SEED = 0
STALE_REASONS = {"fingerprint": "made under another config", "plan": "made from another sample list",
                 "shard": "shard missing or truncated"}


def evenly_spaced(refs: list, cap: Optional[int]) -> list:
    """`cap` samples spread over the whole list (every class of a class-sorted list appears)."""
    if cap is None or cap >= len(refs):
        return refs
    return [refs[(i * len(refs)) // cap] for i in range(cap)]


def plan_jobs(source: Any, cfg: Any, shards_url: str, fingerprint: str) -> list[ShardJob]:
    data = cfg.data
    n = int(data.samples_per_shard)
    if n <= 0:
        raise ValueError(f"data.samples_per_shard={n}: must be positive")
    names = [c["wnid"] for c in source.classes()]
    jobs = []
    for split in data.splits:
        refs = evenly_spaced(source.sample_refs(split), data.max_images_per_split)
        if split == "train":
            refs = list(refs)
            random.Random(TRAIN_ORDER_SEED).shuffle(refs)
        for i in range(0, len(refs), n):
            jobs.append(ShardJob(split, i // n, refs[i : i + n], shards_url, fingerprint, names,
                                 data.resize, int(data.jpeg_quality)))
    return jobs


def remove_outside_plan(shards_url: str, splits: Iterable[str], planned: set[str]) -> list[str]:
    """Delete `{split}-NNNNNN.tar` (and done records) of our splits that the plan does not name."""
    fs, root = storage.filesystem(shards_url)
    pattern = re.compile(rf"^({'|'.join(map(re.escape, splits))})-\d{{6}}\.tar$")
    removed = []
    for directory, suffix in ((root, ""), (f"{root}/{DONE_DIR}", ".json")):
        if not fs.exists(directory):
            continue
        for path in fs.ls(directory, detail=False):
            name = os.path.basename(path)
            shard = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
            if pattern.match(shard) and shard not in planned:
                fs.rm(path)
                removed.append(name)
    return removed


def _ray_executor(cfg: Any) -> Callable:
    import ray

    if not ray.is_initialized():
        address = str(cfg.cluster.address)
        # A fresh local instance needs no dashboard; a cluster keeps its own settings.
        extra = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, ignore_reinit_error=True, **extra)
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)

    def execute(source: Any, jobs: list[ShardJob], limit: int, on_done: Callable[[dict], None]) -> None:
        source_ref = ray.put(source)
        queue, running = list(jobs), {}
        while queue or running:
            while queue and len(running) < limit:
                job = queue.pop(0)
                running[task.remote(source_ref, job)] = job
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                on_done(ray.get(ready[0]))
            except Exception as exc:
                if running:  # let shards already in flight finish and record themselves
                    ray.wait(list(running), num_returns=len(running))
                raise RuntimeError(f"prep: shard {job.url} failed: {exc}") from exc

    return execute


def _thread_executor(source: Any, jobs: list[ShardJob], limit: int, on_done: Callable[[dict], None]) -> None:
    with ThreadPoolExecutor(max_workers=limit) as pool:
        futures = {pool.submit(write_shard, source, job): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"prep: shard {futures[fut].url} failed: {fut.exception()}") from fut.exception()
                on_done(fut.result())


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def summarise(cfg: Any, source: Any, shards_url: str, records: list[dict]) -> dict[str, Any]:
    empty = lambda: {"shards": [], "total": 0, "planned": 0, "skipped": {}, "converted": {}}  # noqa: E731
    splits: dict[str, Any] = {split: empty() for split in cfg.data.splits}  # an empty split is listed too
    skipped_keys: dict[str, dict[str, list[str]]] = {}
    converted_keys: dict[str, dict[str, list[str]]] = {}
    for rec in sorted(records, key=lambda r: (r["split"], r["index"])):
        s = splits.setdefault(rec["split"], empty())
        s["shards"].append({k: rec[k] for k in ("shard", "count", "sha256", "bytes")})
        s["total"] += rec["count"]
        s["planned"] += rec["planned"]
        for field, keys_out in (("skipped", skipped_keys), ("converted", converted_keys)):
            for reason, keys in rec[field].items():
                s[field][reason] = s[field].get(reason, 0) + len(keys)
                keys_out.setdefault(rec["split"], {}).setdefault(reason, []).extend(keys)
    return {
        "source": source.name,
        "source_root": str(cfg.data.root),
        "shards_url": shards_url,
        "samples_per_shard": int(cfg.data.samples_per_shard),
        "image_ext": source.native_ext,
        "classes": source.classes(),
        "num_classes": len(source.classes()),
        "splits": splits,
        "skipped_keys": skipped_keys,
        "converted_keys": converted_keys,
        "config": OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg,
    }


def run(cfg: RestokConfig, run_id: Optional[str] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """Write the shards of every split in data.splits; returns the prep manifest (infra.stages.StageRun:
    prep logs its counts to `run_id` when given and opens no run of its own)."""
    stage_dir = paths.stage_dir(cfg, STAGE)
    fingerprint = stage_fingerprint(cfg, STAGE)
    if manifest_lib.is_complete(stage_dir, fingerprint):
        return manifest_lib.read_manifest(stage_dir)

    shards_url = _absolute(paths.shards_url(cfg))
    storage.makedirs(shards_url)
    # An old manifest must not outlive the shards it lists while they are redone.
    manifest_lib.remove_manifest(stage_dir)
    stale = storage.remove_stale_temporaries(shards_url) + storage.remove_stale_temporaries(storage.join(shards_url, DONE_DIR))
    source = make_source(cfg.data)
    jobs = plan_jobs(source, cfg, shards_url, fingerprint)
    outside = remove_outside_plan(shards_url, cfg.data.splits, {j.name for j in jobs})

    records, todo, discarded = [], [], Counter()
    for job in jobs:
        record = existing_record(job)
        if record:
            records.append(record)
            continue
        todo.append(job)
        reason = stale_reason(job)
        if reason:  # another producer's shard: delete record then shard, so neither is mistaken
            discarded[reason] += 1
            storage.remove(job.done_url)
            storage.remove(job.url)
    if discarded:
        print(f"prep: discarded {sum(discarded.values())} of {len(jobs)} shards: "
              + ", ".join(f"{n} {STALE_REASONS[r]}" for r, n in discarded.items())
              + f" (now fingerprint {fingerprint})", flush=True)
    print(f"prep: {source.name} -> {shards_url}: {len(jobs)} shards planned, {len(records)} already complete, "
          f"{len(todo)} to write; removed {stale} temporaries and {len(outside)} files outside the plan", flush=True)

    limit = max(1, int(cfg.data.prep_tasks))
    executor = None
    if todo:  # start Ray before the clock, so images/s measures writing
        executor = _thread_executor if shards_url.startswith("memory://") else _ray_executor(cfg)
    start = time.perf_counter()
    with progress(total=sum(len(j.refs) for j in todo), unit="img", desc="prep", smoothing=0.1) as bar:
        def on_done(record: dict) -> None:
            records.append(record)
            bar.update(record["planned"])

        if executor is not None:
            executor(source, todo, limit, on_done)
    elapsed = time.perf_counter() - start
    # Temporaries of task attempts that Ray retried after a worker died mid-write.
    storage.remove_stale_temporaries(shards_url)
    written = sum(r["planned"] for r in records[len(jobs) - len(todo):]) if todo else 0

    fields = summarise(cfg, source, shards_url, records)
    fields["written_this_run"] = {"shards": len(todo), "images": written, "seconds": round(elapsed, 3),
                                  "images_per_s": round(written / elapsed, 1) if elapsed > 0 and written else 0.0}
    if run_id:

        metrics = {f"prep/{split}_images": s["total"] for split, s in fields["splits"].items()}
        metrics.update({f"prep/{split}_skipped": sum(s["skipped"].values()) for split, s in fields["splits"].items()})
        metrics.update({f"prep/{split}_converted": sum(s["converted"].values()) for split, s in fields["splits"].items()})
        metrics["prep/images_per_s"] = fields["written_this_run"]["images_per_s"]
        log_metrics(paths.tracking_uri(cfg), run_id, metrics)
    return manifest_lib.write_manifest(stage_dir, STAGE, fingerprint, complete=True, **fields)
