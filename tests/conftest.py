import os

import pytest

# Two cores shared by every process a test starts (DEVELOPERS.md "Known traps").
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (and the evaluation actor pool it starts, closed after)."""
    import ray

    from jobs.evaluation.pool import close_pool

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    close_pool()
    ray.shutdown()
