import os

import pytest

# Two cores shared by every process a test starts (DEVELOPERS.md "Known traps").
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Tests that start a Ray instance (slow-marked ones, and those using a local-Ray fixture) run one at
# a time in one xdist process: two Ray instances on one host confuse Ray's address auto-detection
# (Ray Train's placement-group cleaner queries "the latest cluster", which may be the other one).
RAY_FIXTURES = {"ray_local", "local_ray"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") or RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (and the evaluation actor pool it starts, closed after)."""
    import ray

    from jobs.evaluate import close_pool

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    close_pool()
    ray.shutdown()
