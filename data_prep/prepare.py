"""Stage "prep": a data source -> WebDataset shards `{split}-%06d.tar` + a manifest.

The shard plan is fixed before anything is written: shard i of a split holds samples
[i*n, (i+1)*n) of the source's deterministic sample list (n = data.samples_per_shard). Each shard
is one Ray task (at most data.prep_tasks in flight); a shard whose done record names the current
stage fingerprint and plan is skipped, so a rerun after a kill writes only what is missing, and
shards of another config are deleted and redone, never reused (issue 19). Stale temporaries of killed
writers and shards outside the plan (left by another config) are removed first, so the output
ends as exactly the planned shard set. A shared `data.shards_url` holds one directory per
prep fingerprint and sample list (`prep-<fingerprint>-<plan_id>`, infra.paths.shards_url), so
two data configs, or one config over a data.root whose contents changed, writing to one URL never
delete or overwrite each other's shards (issue 15).

memory:// lives inside one process, so for memory:// URLs the shard writers run as threads of
the driver instead of Ray tasks (tests); every other URL (local, file://, s3://, gs://) uses Ray.
Read plan (issue 15): no shuffle before sharding. A file-backed source's train list (sorted by
class) is cut into groups of CLASSES_PER_GROUP classes, interleaved by position within each class,
then cut into shards: a shard holds a contiguous run of each of <= CLASSES_PER_GROUP class tars
(a few sequential ranged reads per shard) and about that many classes. Randomness is the
trainer's: resampled shards plus a sample shuffle buffer of `data.shuffle_buffer`
(data_prep.loaders). Val keeps the source order. The tar source's listing is built by Ray tasks
and kept beside the manifest (data_prep.sources); the manifest reports GETs per image and MB/s.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

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
from infra.ray_connect import connect_ray
from infra.stages import discarded_line, stage_fingerprint
from infra.tracking import log_metrics

STAGE = "prep"
# Classes interleaved into each train shard of a file-backed source: class-sorted shards would
# make every shuffle buffer nearly one class, a shuffled plan makes every shard read ~600 class
# tars at random. 16 classes per shard: ~16 contiguous runs (GETs) per 1,000-image shard, and a
# training batch of 256 still draws from ~188 classes with the default shuffle buffer (~221 with
# 5000; iid draws 226: README "Data at cluster scale", bench/prep_bench.py --shuffle-quality).
# Fixed (not a config value) so the plan, and the prep fingerprint, do not depend on it.
CLASSES_PER_GROUP = 16
# A temporary in a shared shards URL untouched this long is a dead writer's: local writes touch it
# continuously, and object stores show it only once uploaded, just before its rename.
SHARED_TMP_IDLE_S = 900.0
STALE_REASONS = {
    "fingerprint": "made under another config",
    "plan": "made from another sample list",
    "shard": "shard missing or truncated",
}


def evenly_spaced(refs: list, cap: int | None) -> list:
    """`cap` samples spread over the whole list (every class of a class-sorted list appears)."""
    if cap is None or cap >= len(refs):
        return refs
    return [refs[(i * len(refs)) // cap] for i in range(cap)]


def interleave_classes(refs: list, group: int = CLASSES_PER_GROUP) -> list:
    """Class-sorted refs -> groups of `group` classes, each ordered by position within its class
    (i / class size, then class): any contiguous cut holds a contiguous run of each class."""
    by_class: dict[int, list] = {}
    for ref in refs:
        by_class.setdefault(ref[1], []).append(ref)
    runs = list(by_class.values())
    out: list = []
    for g in range(0, len(runs), group):
        members = runs[g : g + group]
        order = sorted((i / len(run), j, i) for j, run in enumerate(members) for i in range(len(run)))
        out += [members[j][i] for _, j, i in order]
    return out


def plan_jobs(source: Any, cfg: Any, shards_url: str, fingerprint: str) -> list[ShardJob]:
    data = cfg.data
    n = int(data.samples_per_shard)
    if n <= 0:
        raise ValueError(f"data.samples_per_shard={n}: must be positive")
    names = [c["wnid"] for c in source.classes()]
    jobs = []
    for split in data.splits:
        refs = evenly_spaced(source.sample_refs(split), data.max_images_per_split)
        if split == "train" and hasattr(source, "locality_key"):
            refs = interleave_classes(refs)
        for i in range(0, len(refs), n):
            jobs.append(
                ShardJob(
                    split,
                    i // n,
                    refs[i : i + n],
                    shards_url,
                    fingerprint,
                    names,
                    data.resize,
                    int(data.jpeg_quality),
                )
            )
    return jobs


def plan_id(jobs: list[ShardJob]) -> str:
    """8 hex digits naming the whole sample list (every shard's name and plan hash)."""
    text = "\n".join(f"{job.name} {job.plan}" for job in jobs)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


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

    connect_ray(cfg)
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


def _ray_map(cfg: Any) -> Callable:
    """mapper(fn, calls) -> results in order, one Ray task per call (the tar listing)."""

    def mapper(fn: Callable, calls: list[tuple]) -> list:
        import ray

        _ray_executor(cfg)  # starts Ray as the shard writers do
        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        return ray.get([task.remote(*args) for args in calls])

    return mapper


def _thread_map(fn: Callable, calls: list[tuple]) -> list:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: fn(*args), calls))


def read_stats(records: list[dict], seconds: float) -> dict[str, Any]:
    """Source reads of the shards written this run: GETs (ranged or whole-object reads) per image
    and MB/s of source bytes over the writing wall time."""
    requests = sum(int(r.get("source_requests", 0)) for r in records)
    nbytes = sum(int(r.get("source_bytes", 0)) for r in records)
    images = sum(int(r["planned"]) for r in records)
    return {
        "requests": requests,
        "bytes": nbytes,
        "gets_per_image": round(requests / images, 4) if images else 0.0,
        "mb_per_s": round(nbytes / 1e6 / seconds, 2) if seconds > 0 and nbytes else 0.0,
    }


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
                    raise RuntimeError(
                        f"prep: shard {futures[fut].url} failed: {fut.exception()}"
                    ) from fut.exception()
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


def run(cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Write the shards of every split in data.splits; returns the prep manifest (infra.stages.StageRun:
    prep logs its counts to `run_id` when given and opens no run of its own)."""
    stage_dir = paths.stage_dir(cfg, STAGE)
    fingerprint = stage_fingerprint(cfg, STAGE)
    if manifest_lib.is_complete(stage_dir, fingerprint):
        return manifest_lib.read_manifest(stage_dir)

    shards_url = _absolute(paths.shards_url(cfg))
    shared = bool(str(cfg.data.shards_url))
    # An old manifest must not outlive the shards it lists while they are redone.
    manifest_lib.remove_manifest(stage_dir)
    source = make_source(cfg.data)
    listing = {}
    if hasattr(source, "attach_listing"):  # listed once by Ray tasks, kept beside the manifest
        mapper = _thread_map if shards_url.startswith("memory://") else _ray_map(cfg)
        for split in cfg.data.splits:
            listing[split] = source.attach_listing(
                split, storage.join(stage_dir, f"listing-{split}.json.gz"), mapper
            )
            print(
                f"prep: {split} listing {'reused' if listing[split]['reused'] else 'built'}: "
                f"{listing[split]['images']} images, {listing[split]['requests']} reads",
                flush=True,
            )
    jobs = plan_jobs(source, cfg, shards_url, fingerprint)
    if shared:
        # The config does not fix the sample list (data.root's contents may change): in a shared
        # URL each list gets its own directory, so no prep rewrites shards that another work
        # dir's complete manifest lists.
        shards_url = f"{shards_url}-{plan_id(jobs)}"
        jobs = plan_jobs(source, cfg, shards_url, fingerprint)
    storage.makedirs(shards_url)
    # A shared data.shards_url is not covered by this work dir's stage lock: another run's prep of
    # the same data may be writing into this directory now, so only temporaries idle for
    # SHARED_TMP_IDLE_S are a dead writer's.
    idle_s = SHARED_TMP_IDLE_S if shared else 0.0
    stale = storage.remove_stale_temporaries(shards_url, idle_s) + storage.remove_stale_temporaries(
        storage.join(shards_url, DONE_DIR), idle_s
    )
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
        line = discarded_line("prep", discarded, len(jobs), "shards", STALE_REASONS)
        print(f"{line} (now fingerprint {fingerprint})", flush=True)
    print(
        f"prep: {source.name} -> {shards_url}: {len(jobs)} shards planned, {len(records)} already complete, "
        f"{len(todo)} to write; removed {stale} temporaries and {len(outside)} files outside the plan",
        flush=True,
    )

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
    storage.remove_stale_temporaries(shards_url, idle_s)
    new_records = records[len(jobs) - len(todo) :] if todo else []
    written = sum(r["planned"] for r in new_records)

    fields = summarise(cfg, source, shards_url, records)
    rate = round(written / elapsed, 1) if elapsed > 0 and written else 0.0
    fields["written_this_run"] = {
        "shards": len(todo),
        "images": written,
        "seconds": round(elapsed, 3),
        "images_per_s": rate,
        "source_reads": read_stats(new_records, elapsed),
    }
    fields["listing"] = listing
    if run_id:
        metrics = {f"prep/{split}_images": s["total"] for split, s in fields["splits"].items()}
        metrics.update(
            {f"prep/{split}_skipped": sum(s["skipped"].values()) for split, s in fields["splits"].items()}
        )
        metrics.update(
            {f"prep/{split}_converted": sum(s["converted"].values()) for split, s in fields["splits"].items()}
        )
        metrics["prep/images_per_s"] = fields["written_this_run"]["images_per_s"]
        metrics["prep/gets_per_image"] = fields["written_this_run"]["source_reads"]["gets_per_image"]
        metrics["prep/source_mb_per_s"] = fields["written_this_run"]["source_reads"]["mb_per_s"]
        log_metrics(paths.tracking_uri(cfg), run_id, metrics)
    return manifest_lib.write_manifest(stage_dir, STAGE, fingerprint, complete=True, **fields)
