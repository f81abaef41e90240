"""The one place a restok process starts or joins Ray (`cluster.address`), for every stage and command.

"local" starts a single-node Ray in this process (the CPU default and the tests); "auto" joins the
cluster this process runs on (a Ray Job's driver); "ray://host:10001" goes through Ray Client. A
cluster keeps its own settings; a local instance is started lean (no dashboard, no preemption watcher).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Where Ray's state API clients (ray.util.state) look first (ray.dashboard.utils).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


# glibc's defaults unmap every large freed block, so a CPU worker faults its activations in again
# on every step (ClusterConfig.cpu_worker_malloc_keep, README "Speed"). Both are needed: the mmap
# threshold alone still trims the heap's top, the trim threshold alone pins the mmap threshold at
# 128 KiB (~7x more faults here).
CPU_WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def worker_malloc_env(cfg: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """glibc malloc settings for Ray workers that compute (Train workers, extraction and evaluation
    actors): the driver's own MALLOC_* if any, else ours for CPU workers, else none."""
    own = {k: v for k, v in environ.items() if k.startswith("MALLOC_")}
    if own or cfg.cluster.use_gpu or not cfg.cluster.cpu_worker_malloc_keep:
        return own
    return dict(CPU_WORKER_MALLOC_ENV)


def worker_runtime_env(cfg: Any, env_vars: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The runtime_env of Ray workers that compute: `env_vars` plus `worker_malloc_env`; None if empty."""
    env = {**(env_vars or {}), **worker_malloc_env(cfg, os.environ)}
    return {"env_vars": env} if env else None


def starts_local_ray(cfg: Any) -> bool:
    """Whether this process runs its own single-node Ray (cluster.address "local")."""
    return str(cfg.cluster.address) == "local"


def connect_ray(cfg: Any) -> bool:
    """Start or join Ray per cfg.cluster.address; True when this call did (False: already up)."""
    import ray

    if ray.is_initialized():
        return False
    if not starts_local_ray(cfg):
        ray.init(address=str(cfg.cluster.address), log_to_driver=True, logging_level="WARNING")
        return True
    # Ray Train's PreemptionWatcher (one actor per training stage) polls Ray Core for nodes being
    # drained (autoscaler, spot); a single local node is never drained, so it is not started (the
    # driver's setting reaches the Train controller: ray.train.v2 ENV_VARS_TO_PROPAGATE).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The Train controller notices a finished worker group at its next poll (every 2 s by default):
    # 0.5 s ends every local training stage ~2 s sooner. A poll the busy worker answers late is kept
    # and awaited, not counted as a failure (that takes 10 min: ray.train.v2 worker_group).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The raylet prestarts num_cpus idle Python workers for the first driver; the actors of a
    # training stage (their runtime env differs) and most stages' tasks never use them: in the test
    # suite 34 of them never ran anything (~1 CPU-s each). Workers start when work asks for them.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Logical CPUs: enough for the training workers plus their controller even on 2 cores.
    needed = int(cfg.cluster.num_workers) * int(cfg.cluster.cpus_per_worker) + 1
    # No dashboard: ~1-3 s and three processes less per start on 2 cores. Ray finds "the" state
    # API through the newest Ray instance on the host and its advertised dashboard address
    # (127.0.0.1:8265 by default, even with no dashboard), so another instance's dashboard, e.g. a
    # `ray start` cluster's, would answer for this one: its "no such actor" once made Ray Train's
    # PlacementGroupCleaner remove a live run's placement group (ray.train.v2
    # placement_group_cleaner; a local instance's trainer now starts no cleaner at all,
    # jobs.training.ray_training). So this instance advertises a port of its own with nothing
    # behind it, and its processes (the raylet's children inherit the driver's environment at
    # start) ask only there.
    api = OwnStateApi()
    with api.advertised():
        ray.init(
            # "local" starts a new instance: address=None would join a `ray start` cluster on the host.
            address="local",
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=False,
            dashboard_port=api.port,
            log_to_driver=True,
            logging_level="WARNING",
        )
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class OwnStateApi:
    """A loopback state-API address of one Ray instance's own, with nothing behind it (why: connect_ray);
    the simulated cluster of the fault tests starts its nodes the same way."""

    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def advertised(self):
        """Ray's processes started inside this block ask only this address."""
        return environ_set(API_SERVER_ENV, self.url)


@contextmanager
def environ_set(key: str, value: str) -> Iterator[None]:
    """`key=value` in this process only while Ray starts (a later `restok submit` from the same
    process must not be redirected: Ray's job client prefers this variable to its address)."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


__all__ = ["API_SERVER_ENV", "OwnStateApi", "connect_ray", "environ_set", "free_port"]
