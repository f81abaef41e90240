"""The one place a restok process starts or joins Ray (`cluster.address`), for every stage and command.

"local" starts a single-node Ray in this process (the CPU default and the tests); "auto" joins the
cluster this process runs on (a Ray Job's driver); "ray://host:10001" goes through Ray Client. A
cluster keeps its own settings; a local instance is started lean (no dashboard, no preemption watcher).
"""

from __future__ import annotations

import os
from typing import Any


def connect_ray(cfg: Any) -> bool:
    """Start or join Ray per cfg.cluster.address; True when this call did (False: already up)."""
    import ray

    if ray.is_initialized():
        return False
    address = str(cfg.cluster.address)
    if address != "local":
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
        return True
    # Ray Train's PreemptionWatcher (one actor per training stage) polls Ray Core for nodes being
    # drained (autoscaler, spot); a single local node is never drained, so it is not started (the
    # driver's setting reaches the Train controller: ray.train.v2 ENV_VARS_TO_PROPAGATE).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Logical CPUs: enough for the training workers plus their controller even on 2 cores.
    needed = int(cfg.cluster.num_workers) * int(cfg.cluster.cpus_per_worker) + 1
    ray.init(
        # "local" must start a new instance: address=None would join any `ray start` cluster on the host.
        address="local",
        num_cpus=max(os.cpu_count() or 1, needed),
        # No dashboard: ~1-3 s and three processes less per start on 2 cores (its module subprocess,
        # head and agent). Without it Ray Train's PlacementGroupCleaner cannot query the state API
        # and just keeps monitoring (ray.train.v2 placement_group_cleaner: RayStateApiException).
        include_dashboard=False,
        log_to_driver=True,
        logging_level="WARNING",
    )
    return True


__all__ = ["connect_ray"]
