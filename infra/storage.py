"""fsspec storage helpers: every stage output goes through these, so local paths, file://,
memory:// (tests) and s3:// / gs:// (clusters) behave the same.

Atomicity: a file is written under a temporary name in the same directory and renamed into
place, so a half-written shard, checkpoint or manifest is never visible under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

TMP_MARKER = ".tmp-"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for any fsspec URL or local path.

    Object-store filesystems cache directory listings per process, but other processes (Ray
    tasks, Train workers) write the same prefixes: the listing cache of `path` and its parents is
    dropped, so what a caller lists or checks next is what storage holds now."""
    fs, path = url_to_fs(url)
    if getattr(fs, "dircache", None):
        fs.invalidate_cache(path)
    return fs, path


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def remove(url: str) -> None:
    """Delete one file if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def remove_tree(url: str) -> None:
    """Delete a directory and everything under it, if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def is_temporary(name: str) -> bool:
    return TMP_MARKER in os.path.basename(name)


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to `<dir>/.tmp-<uuid>-<name>` then rename to `url` on success; removed on error."""
    fs, path = filesystem(url)
    parent, name = os.path.split(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{TMP_MARKER}{uuid.uuid4().hex[:8]}-{name}" if parent else f"{TMP_MARKER}{name}"
    try:
        with fs.open(tmp, mode) as fh:
            yield fh
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as fh:
        fh.write(data)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(url: str) -> Any | None:
    """The JSON at `url`, or None when it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        data = fh.read()
    try:
        return json.loads(data)
    except ValueError as exc:  # a truncated or foreign file: say which
        raise ValueError(f"{url}: not valid JSON ({exc})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_url(url: str, chunk: int = 1 << 20) -> str:
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _modified_s(info: dict[str, Any]) -> float | None:
    """Last-modified time (epoch seconds) from an fsspec listing entry, None when it has none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return None


def remove_stale_temporaries(url: str, min_age_s: float = 0.0) -> int:
    """Delete leftovers of killed writers in directory `url`; returns how many were removed.

    `min_age_s` > 0 spares temporaries modified more recently (or of unknown age): in a directory
    that writers of other runs share, those may be live writes."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return 0
    now = time.time()
    stale = []
    for info in fs.ls(path, detail=True):
        if not is_temporary(info["name"]):
            continue
        modified = _modified_s(info)
        if min_age_s <= 0 or (modified is not None and now - modified >= min_age_s):
            stale.append(info["name"])
    for p in stale:
        fs.rm(p, recursive=True)
    return len(stale)
