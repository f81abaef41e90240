"""Write one WebDataset shard from a run of sample refs, atomically, with a done record.

Members per sample: `<key>.jpg` or `<key>.png` (image bytes), `<key>.cls` (class index, ASCII),
`<key>.json` (class index, wnid, name, original width/height, conversion if any), written by
infra.shards (webdataset's TarWriter; fixed mtime/owner, so the same inputs give the same bytes and
the same sha256 on a rerun).

The shard is written under a temporary name and renamed (infra.storage.atomic_open); only
then is `_done/<shard>.json` written (count, sha256, skipped and converted keys, the plan's
hash and the stage fingerprint). A shard counts as complete only with a matching done record,
so a run killed anywhere leaves either a complete shard or one that the rerun rewrites.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from data_prep.image_bytes import SkipImage, check_image
from infra import storage
from infra.shards import write_samples

DONE_DIR = "_done"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def done_record_url(shards_url: str, name: str) -> str:
    return storage.join(shards_url, DONE_DIR, f"{name}.json")


def plan_sha256(refs: list) -> str:
    """Hash of the shard's planned (key, class) list: a changed listing invalidates the shard."""
    return hashlib.sha256("\n".join(f"{r[0]}\t{r[1]}" for r in refs).encode()).hexdigest()


@dataclass
class ShardJob:
    split: str
    index: int
    refs: list  # SampleRef tuples, in shard order
    shards_url: str
    fingerprint: str
    class_names: list[str]  # index -> wnid (or synthetic name)
    resize: int | None = None
    jpeg_quality: int = 95
    plan: str = field(default="")

    def __post_init__(self) -> None:
        self.plan = self.plan or plan_sha256(self.refs)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def url(self) -> str:
        return storage.join(self.shards_url, self.name)

    @property
    def done_url(self) -> str:
        return done_record_url(self.shards_url, self.name)


class _HashingWriter(io.RawIOBase):
    def __init__(self, fh: Any):
        self.fh, self.sha, self.nbytes = fh, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.nbytes += len(data)
        self.fh.write(data)
        return len(data)


def _read_in_plan_order(source: Any, refs: list, stats: dict) -> Any:
    """(ref, bytes) in plan order; file-backed sources are read in storage order first.

    Train plans interleave classes (prepare.interleave_classes), so plan order alternates between
    class tars; reading in locality order keeps every tar read forward-only. Holds one shard's
    bytes. Sources that count their reads add {"requests", "bytes"} to `stats`."""
    read = (lambda rs: source.read(rs, stats)) if getattr(source, "counts_reads", False) else source.read
    locality = getattr(source, "locality_key", None)
    if locality is None:
        yield from read(refs)
        return
    order = sorted(range(len(refs)), key=lambda i: locality(refs[i]))
    data = [b""] * len(refs)
    for i, (_, blob) in zip(order, read([refs[i] for i in order]), strict=False):
        data[i] = blob
    yield from zip(refs, data, strict=False)


def _check(job: ShardJob) -> tuple[dict[str, Any] | None, str | None]:
    """(done record, None) when the shard is complete for this plan and fingerprint, else (None,
    why not: missing | fingerprint | plan | shard)."""
    record = storage.read_json(job.done_url)
    if not record:
        return None, "missing"
    if record.get("fingerprint") != job.fingerprint:
        return None, "fingerprint"
    if record.get("plan_sha256") != job.plan:
        return None, "plan"
    fs, path = storage.filesystem(job.url)
    if not fs.exists(path) or fs.size(path) != record.get("bytes"):
        return None, "shard"
    return record, None


def existing_record(job: ShardJob) -> dict[str, Any] | None:
    """The done record when the shard is complete for this plan and fingerprint, else None."""
    return _check(job)[0]


def stale_reason(job: ShardJob) -> str | None:
    """Why a done record on storage is not reused (fingerprint | plan | shard); None when there
    is none or it is current."""
    reason = _check(job)[1]
    return None if reason == "missing" else reason


def write_shard(source: Any, job: ShardJob) -> dict[str, Any]:
    """Read, check and write the job's samples; returns (and stores) the shard's done record."""
    skipped: dict[str, list[str]] = {}
    converted: dict[str, list[str]] = {}
    stats: dict = {}

    def samples():
        for (key, cls, _), data in _read_in_plan_order(source, job.refs, stats):
            try:
                image = check_image(data, source.native_ext, job.resize, job.jpeg_quality)
            except SkipImage as skip:
                skipped.setdefault(skip.reason, []).append(key)
                continue
            if image.converted:
                converted.setdefault(image.converted, []).append(key)
            meta = {
                "key": key,
                "cls": int(cls),
                "wnid": job.class_names[cls],
                "width": image.original_size[0],
                "height": image.original_size[1],
                "converted": image.converted,
            }
            yield {
                "__key__": key,
                image.ext: image.data,
                "cls": str(int(cls)).encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }

    with storage.atomic_open(job.url, "wb") as fh:
        writer = _HashingWriter(fh)
        count = write_samples(writer, samples())
    record = {
        "shard": job.name,
        "split": job.split,
        "index": job.index,
        "count": count,
        "planned": len(job.refs),
        "sha256": writer.sha.hexdigest(),
        "bytes": writer.nbytes,
        "plan_sha256": job.plan,
        "fingerprint": job.fingerprint,
        "skipped": skipped,
        "converted": converted,
        # Reads of the source for this shard (GETs on an object store), for the prep summary.
        "source_requests": stats.get("requests", 0),
        "source_bytes": stats.get("bytes", 0),
    }
    storage.write_json_atomic(job.done_url, record)
    return record
