"""A simulated multi-node Ray cluster for the fault tests (issue 17, Deliver 1).

`ray.cluster_utils.Cluster` runs several raylets on this machine, each a node with its own
resources and object store; `remove_node` kills one (every process on it), `add_node` brings a
replacement. The pipeline is driven through `restok run ... cluster.address=<GCS address>`, the
same code path as a real cluster's driver (no special case in the product code). The work dir and
`cluster.storage_path` are local directories, which every simulated node shares.

Sizes: 2 cores shared with other jobs, so a head without CPUs (drivers' controllers only) and two
1-CPU workers, 80 MiB object stores, the nano model and a few paced steps.

Below the cluster, what every test that drives a `restok` process reads back (here and in
test_killed_resume, test_submit, test_cli_paths_and_errors): its full log, our checkpoint markers,
the steps it resumed at, its one MLflow stage run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.ray_connect import OwnStateApi

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
HEAD_ARGS = {"num_cpus": 0, "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False}


class SimCluster:
    """Head (0 CPUs) + `workers` nodes of 1 CPU each, on loopback."""

    def __init__(self, workers: int = 2):
        from ray.cluster_utils import Cluster

        # The raylets inherit this: Ray's memory monitor would kill our workers when other jobs on
        # this shared machine fill its memory (the faults under test are ours to inject).
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        # As infra.ray_connect does for a local instance: no dashboard, so its processes (the raylets'
        # children) ask a state-API address of their own (nothing there), never another Ray
        # instance's on this host.
        self.api = OwnStateApi()
        with self.api.advertised():
            self.cluster = Cluster(
                initialize_head=True, head_node_args={**HEAD_ARGS, "dashboard_port": self.api.port}
            )
            self.nodes = [self.cluster.add_node(**NODE_ARGS) for _ in range(workers)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_of_pid(self, pid: int):
        """The simulated node whose raylet is an ancestor of process `pid` (its worker)."""
        raylets = {n.all_processes["raylet"][0].process.pid: n for n in self.nodes}
        while pid > 1:
            if pid in raylets:
                return raylets[pid]
            pid = _ppid(pid)
        return None

    def processes(self, title: str) -> list[int]:
        """Pids titled `title` on this cluster's worker nodes (other Ray instances on the machine
        have processes of the same titles)."""
        return [pid for pid in processes(title) if self.node_of_pid(pid) is not None]

    def train_workers(self) -> list[int]:
        return self.processes("ray::RayTrainWorker")

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def add(self):
        with self.api.advertised():
            node = self.cluster.add_node(**NODE_ARGS)
        self.nodes.append(node)
        return node

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes(title: str) -> list[int]:
    """Pids whose command line (Ray sets it to `ray::<Actor>.<method>`) contains `title`."""
    me = os.getpid()
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d.rsplit("/", 1)[1])
        if pid != me and title in _cmdline(pid):
            out.append(pid)
    return sorted(out)


def restok(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`restok ARGS` (the console script next to this interpreter) in its own session, output to
    `log`."""
    exe = shutil.which("restok", path=os.path.dirname(sys.executable)) or "restok"
    with open(log, "a") as fh:
        return subprocess.Popen(
            [exe, *args],
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            start_new_session=True,
        )


@contextmanager
def killed_on_exit(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`proc`'s process group is SIGKILLed if it still runs when the block exits (a failed
    assertion or a timeout leaves no driver behind)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(proc: subprocess.Popen, timeout: float) -> int:
    with killed_on_exit(proc):
        return proc.wait(timeout=timeout)


def full_log_text(output: str) -> str:
    """The text of the full log a restok command named on its terminal (`full log: PATH`), or ""."""
    match = re.search(r"full log: (\S+)", output)
    if match is None:
        return ""
    with open(match.group(1).rstrip(")")) as fh:
        return fh.read()


def markers(root: Path) -> dict[int, str]:
    """{step: checkpoint dir} of the checkpoints with our completeness marker under `root`."""
    out = {}
    # <work_dir>/ray/<stage>-<fp>/..., or <cluster.storage_path>/<work dir folder>/<stage>-<fp>/...
    found = glob.glob(str(root / "train_tokenizer-*" / "checkpoint_*" / "COMPLETE.json"))
    found += glob.glob(str(root / "*" / "train_tokenizer-*" / "checkpoint_*" / "COMPLETE.json"))
    for marker in found:
        with open(marker) as fh:
            out[json.load(fh)["step"]] = os.path.dirname(marker)
    return out


def one_finished_stage_run(client, experiment: str, steps: int, stage: str = "train_tokenizer"):
    """The one MLflow run of `stage` in `experiment`: FINISHED, with its loss logged at each step
    0..steps-1 exactly once (a resumed stage continues its run and duplicates nothing)."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    stage_runs = [r for r in runs if r.data.tags.get("restok.stage") == stage]
    assert len(stage_runs) == 1, [r.info.run_id for r in stage_runs]
    assert stage_runs[0].info.status == "FINISHED"
    history = client.get_metric_history(stage_runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(steps))  # each step once: 0 duplicated
    return stage_runs[0]


def resumed_at(text: str) -> set[int]:
    """Steps train_tokenizer resumed at, from a run's full log (a worker's line may appear twice
    there: its own output and Ray's copy)."""
    return {int(s) for s in re.findall(r"\[train_tokenizer\] resumed from \S+ at step (\d+)", text)}


def wait_for(
    predicate,
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    every: float = 0.2,
):
    """Poll `predicate` until it returns something truthy; fail with the log's tail otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(every)
    tail = log.read_text()[-5000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}:\n{tail}")
