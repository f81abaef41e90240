"""One driver per stage: a lock file per stage under `<work_dir>/locks/` (issue 17, Deliver 5).

A driver holds a stage's lock while it runs (or clears) that stage; a second driver of the same
work dir stops with one line naming the holder (host, pid, since). The holder refreshes a
heartbeat in the file; a lock is stale, and taken over, when its driver is dead on this host
(pid gone or reused: `tracking.driver_alive`) or, for a driver on another host, when the heartbeat
is older than STALE_AFTER_S. A killed driver therefore never blocks the rerun that continues it.

Creation is exclusive on a local or shared POSIX file system (O_EXCL) and on S3 (a conditional
write, If-None-Match); on other object stores the file is written and read back (last writer wins,
the loser stops; two creators racing within one round trip could both win there).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from infra import paths, storage, tracking

LOCKS_DIR = "locks"
HEARTBEAT_S = 15.0
# A lock whose heartbeat is older than this is stale when its driver's liveness cannot be checked
# (another host): several missed beats, not one slow write.
STALE_AFTER_S = 120.0


class LockHeld(RuntimeError):
    """Another live driver runs this stage; the message is one line naming it."""

    one_line_message = True


def lock_url(cfg: Any, stage: str) -> str:
    return storage.join(paths.work_url(cfg), LOCKS_DIR, f"{stage}.lock")


def _record(stage: str, token: str, since: float) -> dict:
    return {
        "stage": stage,
        "driver": tracking.driver_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": since,
        "heartbeat": time.time(),
        "token": token,
    }


def _read(url: str) -> dict | None:
    try:
        record = storage.read_json(url)
    except (OSError, ValueError):  # half-written by a writer killed mid-way: nobody's
        return {}
    if record is None:  # no file, or a file holding JSON null
        return {} if storage.exists(url) else None
    return record if isinstance(record, dict) else {}  # valid JSON but no lock record: nobody's


def stale(record: dict, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> str:
    """Why `record`'s holder no longer holds it ('' when it still does)."""
    if not record.get("driver"):
        return "unreadable lock"
    alive = tracking.driver_alive(str(record["driver"]))
    if alive is False:
        return f"driver {record['driver']} is dead"
    age = (now or time.time()) - float(record.get("heartbeat", 0))
    if alive is None and age > stale_after_s:
        return f"heartbeat of {record['driver']} is {age:.0f}s old"
    return ""


def describe(record: dict, url: str) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("since", 0))))
    return (
        f"stage '{record.get('stage')}' is being run by another driver: host {record.get('host')} "
        f"pid {record.get('pid')} since {since} (lock {url}); wait for it or stop it"
    )


def holder(cfg: Any, stage: str) -> dict | None:
    """The live holder's record of `stage`'s lock, or None when it is free or stale."""
    record = _read(lock_url(cfg, stage))
    if record is None or stale(record):
        return None
    return record


def check_free(cfg: Any, stages: list[str]) -> None:
    """Stop before anything starts when another live driver holds a lock of these stages."""
    me = tracking.driver_id()
    for stage in stages:
        record = holder(cfg, stage)
        if record is not None and record.get("driver") != me:
            raise LockHeld(describe(record, lock_url(cfg, stage)))


def _create_exclusive(url: str, record: dict) -> bool:
    fs, path = storage.filesystem(url)
    data = json.dumps(record).encode()
    if "file" in fs.protocol or "local" in fs.protocol:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if {"s3", "s3a"} & set(protocols):
        # S3 conditional write (If-None-Match: *): exactly one of two racing creators succeeds.
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    if fs.exists(path):
        return False
    storage.write_bytes_atomic(url, data)
    return (_read(url) or {}).get("token") == record["token"]


class StageLock:
    def __init__(self, cfg: Any, stage: str, heartbeat_s: float = HEARTBEAT_S):
        self.url = lock_url(cfg, stage)
        self.stage = stage
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str:
        """Take the lock (taking over a stale one); returns '' or why a stale one was taken over."""
        taken_over = ""
        for _ in range(3):
            if _create_exclusive(self.url, _record(self.stage, self.token, self.since)):
                self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-{self.stage}")
                self._thread.start()
                return taken_over
            record = _read(self.url)
            if record == {}:  # being written by its creator this very moment, or left half-written
                time.sleep(0.5)
                record = _read(self.url)
            if record is None:  # released in between
                continue
            why = stale(record)
            if not why:
                raise LockHeld(describe(record, self.url))
            # Remove only the stale record we judged (another taker may have replaced it since).
            if (_read(self.url) or {}).get("token") == record.get("token"):
                storage.remove(self.url)
            taken_over = why
        raise LockHeld(describe(_read(self.url) or {"stage": self.stage}, self.url))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = _read(self.url) or {}
            if record.get("token") != self.token:
                print(f"[restok] lock {self.url} is no longer ours (now {record.get('driver')})", flush=True)
                return
            record["heartbeat"] = time.time()
            storage.write_json_atomic(self.url, record)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (_read(self.url) or {}).get("token") == self.token:
            storage.remove(self.url)


@contextmanager
def stage_lock(cfg: Any, stage: str) -> Iterator[StageLock]:
    lock = StageLock(cfg, stage)
    why = lock.acquire()
    if why:
        print(f"[restok] {stage}: took over a stale lock ({why})", flush=True)
    try:
        yield lock
    finally:
        lock.release()
