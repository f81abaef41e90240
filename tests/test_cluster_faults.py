"""Faults of a real cluster on a simulated multi-node Ray cluster (issue 17): a lost driver and the
per-stage lock, a preemption notice (SIGTERM) to a Train worker, the loss of a node holding a
Train worker. Each test drives `restok run ... cluster.address=<the cluster>` as a user would and
measures what the README's reliability table reports: steps recomputed (trained again after the
fault), samples duplicated (every step logged once, so 0), time to recover.

One cluster for the module (head without CPUs + two 1-CPU nodes), one prep shared by copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import time

import pytest
from cluster_harness import (
    SimCluster,
    finish,
    full_log_text,
    killed_on_exit,
    markers,
    one_finished_stage_run,
    restok,
    resumed_at,
    wait_for,
)

from configs.loading import load_config
from infra import paths, tracking
from jobs.extract_codes import TEST_SHARD_SLEEP_ENV
from jobs.training.ray_training import TEST_STEP_SLEEP_ENV
from pipeline import locks

STEPS, EVERY = 12, 4
# 8 images a shard: 10 train shards + 2 val, so extraction and evaluation have work on each actor.
DATA = [
    "data.synthetic.train_per_class=8",
    "data.synthetic.val_per_class=1",
    "data.loader_workers=0",
    "data.prep_tasks=2",
    "data.samples_per_shard=8",
]
TRAIN = [
    f"tokenizer_train.steps={STEPS}",
    f"tokenizer_train.checkpoint_every={EVERY}",
    "tokenizer_train.keep_checkpoints=2",
    "tokenizer_train.log_every=1",
    "tokenizer_train.image_log_every=0",
    "tokenizer_train.global_batch_size=8",
    "tokenizer_train.micro_batch_size=4",
    # The recipe's stage (imagenet256-restok-l), so a resized world is tested on a ZeRO-2
    # checkpoint here; ZeRO-1's and ZeRO-3's resizes are tests/test_train_tokenizer.py's.
    "tokenizer_train.zero_stage=2",
]


class _Results(dict):
    """fault -> measured figures; each printed as measured (`-s` shows them) and at the end."""

    def __setitem__(self, fault, figures):
        print(f"\n[reliability] {fault}: {json.dumps(figures)}", flush=True)
        super().__setitem__(fault, figures)


RESULTS: dict[str, dict] = _Results()
TRAINED: dict[str, object] = {}  # a work dir whose train_tokenizer completed (set by a training test)
PREEMPTED: dict[str, object] = {}  # a copy of a run stopped by a preemption notice (2 workers)


@pytest.fixture(scope="module")
def sim():
    cluster = SimCluster(workers=2)
    yield cluster
    cluster.shutdown()
    for fault, figures in RESULTS.items():
        print(f"[reliability] {fault}: {json.dumps(figures)}")


@pytest.fixture(scope="module")
def prepped(sim, tmp_path_factory):
    """A prep stage written once on the cluster (its shards are read by every test's copy)."""
    base = tmp_path_factory.mktemp("prep")
    work, log = base / "work", base / "prep.log"
    proc = restok(["run", *_overrides(sim, work, base / "shared-ray", "prep")], base, log)
    assert finish(proc, 300) == 0, log.read_text()[-4000:]
    return work / "prep"


def _overrides(sim, work, storage_path, stages="prep,train_tokenizer"):
    return [
        f"work_dir={work}",
        f"cluster.address={sim.address}",
        f"cluster.storage_path={storage_path}",
        f"stages=[{stages}]",
        *DATA,
        *TRAIN,
    ]


class Run:
    """One work dir + storage path and the `restok run` command over it."""

    def __init__(self, sim, prepped, base, copy_of=None):
        self.base, self.work, self.storage = base, base / "work", base / "shared" / "ray"
        self.args = ["run", *_overrides(sim, self.work, self.storage)]
        self.cfg = load_config(None, self.args[1:])
        if copy_of is not None:  # another run's work dir and storage, as they were, moved here
            shutil.copytree(copy_of / "work", self.work, ignore=shutil.ignore_patterns("logs"))
            (old,) = (copy_of / "shared" / "ray").iterdir()  # that work dir's checkpoint folder
            shutil.copytree(old, paths.ray_storage_path(self.cfg))  # named after this work dir
        else:
            self.work.mkdir(parents=True)
            shutil.copytree(prepped, self.work / "prep")
        self.client = tracking.client_for(paths.tracking_uri(self.cfg))

    def start(self, log_name, pace_s):
        log = self.base / log_name
        return restok(self.args, self.base, log, env={TEST_STEP_SLEEP_ENV: str(pace_s)}), log

    def run_id(self):
        record = self.work / "train_tokenizer" / "mlflow_run.json"
        return json.loads(record.read_text())["run_id"] if record.exists() else None

    def logged(self, run_id=None):
        """{step: timestamp s} of the `loss` metric of the stage's run."""
        run_id = run_id or self.run_id()
        if run_id is None:
            return {}
        return {m.step: m.timestamp / 1000 for m in self.client.get_metric_history(run_id, "loss")}

    def mid_interval(self):
        """A complete checkpoint and at least one step logged after it (a fault now loses work)."""
        done = markers(self.storage)
        logged = self.logged()
        return bool(done and logged and max(logged) >= max(done) + 1 and max(done) < STEPS - EVERY)

    def full_log(self, log):
        return full_log_text(log.read_text())

    def check_one_run_each_step_once(self, run_id):
        run = one_finished_stage_run(self.client, self.cfg.tracking.experiment, STEPS)
        assert run.info.run_id == run_id
        manifest = json.loads((self.work / "train_tokenizer" / "manifest.json").read_text())
        assert manifest["complete"] and manifest["steps_done"] == STEPS


def _text(path):
    with open(path) as fh:
        return fh.read()


def _json(path):
    return json.loads(_text(path))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lost_driver_rerun_continues_and_lock_keeps_one_driver_per_stage(sim, prepped, tmp_path):
    """Deliver 5: a second driver of the running stage stops with one line naming the holder; the
    driver killed (SIGKILL, the process alone: its Ray job dies with it); the same command again
    takes over the dead driver's lock and continues the stage's checkpoints and MLflow run."""
    run = Run(sim, prepped, tmp_path)
    # Paced so that the second driver's start and stop fit well inside the first one's training.
    first, first_log = run.start("first.log", pace_s=5.0)
    with killed_on_exit(first):
        wait_for(run.mid_interval, 400, "a checkpoint and a step after it", first, first_log)
        second, second_log = run.start("second.log", pace_s=0)
        assert finish(second, 120) == 2, second_log.read_text()[-3000:]
        lines = second_log.read_text().strip().splitlines()
        assert len(lines) == 1, lines
        assert re.fullmatch(
            rf"restok run: stage 'train_tokenizer' is being run by another driver: host "
            rf"{re.escape(socket.gethostname())} pid {first.pid} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
            rf"\(lock \S+train_tokenizer\.lock\); wait for it or stop it( \(full log: \S+\))?",
            lines[0],
        ), lines[0]
        assert first.poll() is None  # the refused driver did not disturb the running one
        assert sim.train_workers()
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.time()
        first.wait()
        # Ray ends a dead driver's job: its Train workers go with it (no orphan keeps training).
        wait_for(lambda: not sim.train_workers(), 120, "the killed driver's Train workers to end")
        workers_gone_s = time.time() - killed_at
    run_id = run.run_id()
    before = run.logged(run_id)
    # The killed driver's lock is left behind, naming a dead pid.
    lock = json.loads((run.work / "locks" / "train_tokenizer.lock").read_text())
    assert lock["pid"] == first.pid

    rerun, rerun_log = run.start("rerun.log", pace_s=0)
    assert finish(rerun, 600) == 0, rerun_log.read_text()[-4000:]
    text = run.full_log(rerun_log)
    assert f"took over a stale lock (driver {lock['driver']} is dead)" in text
    resumed = resumed_at(text)
    assert len(resumed) == 1, text[-4000:]
    resume_step = resumed.pop()
    recomputed = max(before) + 1 - resume_step
    assert 0 <= recomputed <= EVERY
    after = run.logged(run_id)
    run.check_one_run_each_step_once(run_id)
    assert not (run.work / "locks" / "train_tokenizer.lock").exists()  # released at the end
    RESULTS["lost driver"] = {
        "steps_recomputed": recomputed,
        "duplicated": 0,
        "interval": EVERY,
        "workers_gone_s": round(workers_gone_s, 1),
        "recover_s": round(min(t for s, t in after.items() if s > max(before)) - killed_at, 1),
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_a_train_worker_checkpoints_now_and_rerun_recomputes_nothing(sim, prepped, tmp_path):
    """Deliver 3: SIGTERM to one Train worker (a spot node's notice) makes every rank write a
    checkpoint at the current step and stop; the stage ends incomplete, the driver cleanly (0);
    the rerun resumes at that very step: 0 steps recomputed."""
    run = Run(sim, prepped, tmp_path)
    proc, log = run.start("first.log", pace_s=1.0)
    with killed_on_exit(proc):
        wait_for(run.mid_interval, 400, "a checkpoint and a step after it", proc, log)
        workers = sim.train_workers()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)
        noticed_at = time.time()
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert "train_tokenizer: stopped before completion" in log.read_text()
    done = markers(run.storage)
    step = max(done)
    marker = _json(os.path.join(done[step], "COMPLETE.json"))
    assert marker["preempted"] == f"SIGTERM at step {step}" and step % EVERY != 0
    run_id = run.run_id()
    before = run.logged(run_id)
    assert max(before) == step - 1  # the step the notice arrived in was finished and saved
    PREEMPTED.update(base=tmp_path / "preempted", step=step)
    shutil.copytree(run.base, PREEMPTED["base"], ignore=shutil.ignore_patterns("preempted"))

    rerun, rerun_log = run.start("rerun.log", pace_s=0)
    assert finish(rerun, 600) == 0, rerun_log.read_text()[-4000:]
    assert resumed_at(run.full_log(rerun_log)) == {step}
    run.check_one_run_each_step_once(run_id)
    RESULTS["preemption notice (SIGTERM)"] = {
        "steps_recomputed": max(before) + 1 - step,
        "duplicated": 0,
        "checkpoint_after_notice_s": round(marker["written_at"] - noticed_at, 1),
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_loss_restarts_the_worker_group_from_the_newest_checkpoint(sim, prepped, tmp_path):
    """Deliver 2 (training): the node holding a Train worker is removed and a replacement added;
    the stage's retry restarts the worker group from the newest complete checkpoint: at most one
    checkpoint interval recomputed, one MLflow run with each step once."""
    run = Run(sim, prepped, tmp_path)
    proc, log = run.start("run.log", pace_s=1.0)
    with killed_on_exit(proc):
        wait_for(run.mid_interval, 400, "a checkpoint and a step after it", proc, log)
        workers = sim.train_workers()
        node = sim.node_of_pid(workers[-1])
        assert node is not None, workers
        newest = max(markers(run.storage))
        sim.remove(node)
        lost_at = time.time()
        before = run.logged()
        sim.add()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    text = run.full_log(log)
    assert re.search(r"\[train_tokenizer\] worker lost \(.*\); retry 1 from the latest checkpoint", text), (
        text[-4000:]
    )
    resumed = resumed_at(text)
    assert len(resumed) == 1
    resume_step = resumed.pop()
    assert resume_step >= newest
    recomputed = max(before) + 1 - resume_step
    assert 0 <= recomputed <= EVERY
    run_id = run.run_id()
    after = run.logged(run_id)
    run.check_one_run_each_step_once(run_id)
    TRAINED["work"] = run.work
    RESULTS["node loss (training)"] = {
        "steps_recomputed": recomputed,
        "duplicated": 0,
        "interval": EVERY,
        "recover_s": round(min(t for s, t in after.items() if s > max(before)) - lost_at, 1),
    }


def test_stage_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    """The lock alone (no Ray): a live driver's lock stops a second one in one line; a dead pid on
    this host, or another host's lock with an expired heartbeat, is taken over."""
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}"])
    url = locks.lock_url(cfg, "train_tokenizer")
    with locks.stage_lock(cfg, "train_tokenizer"):
        record = _json(url)
        assert record["pid"] == os.getpid()
        # Held by a live driver (this process, as seen by another StageLock): refused, one line.
        with pytest.raises(
            locks.LockHeld, match=rf"host {re.escape(socket.gethostname())} pid {os.getpid()} since"
        ):
            locks.StageLock(cfg, "train_tokenizer").acquire()
    assert not os.path.exists(url)

    def plant(**fields):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        with open(url, "w") as fh:
            json.dump(
                {
                    "stage": "train_tokenizer",
                    "since": time.time(),
                    "heartbeat": time.time(),
                    "token": "x",
                    **fields,
                },
                fh,
            )

    plant(driver=f"{socket.gethostname()}:999999999:1", host=socket.gethostname(), pid=999999999)
    lock = locks.StageLock(cfg, "train_tokenizer")
    assert lock.acquire() == f"driver {socket.gethostname()}:999999999:1 is dead"
    lock.release()
    plant(driver="elsewhere:12:34", host="elsewhere", pid=12)  # another host, fresh heartbeat
    with pytest.raises(locks.LockHeld, match="host elsewhere pid 12"):
        locks.check_free(cfg, ["prep", "train_tokenizer"])
    plant(driver="elsewhere:12:34", host="elsewhere", pid=12, heartbeat=time.time() - locks.STALE_AFTER_S - 1)
    locks.check_free(cfg, ["train_tokenizer"])
    lock = locks.StageLock(cfg, "train_tokenizer", heartbeat_s=0.05)
    assert "heartbeat of elsewhere:12:34" in lock.acquire()
    first = _json(url)["heartbeat"]
    time.sleep(0.3)
    assert _json(url)["heartbeat"] > first  # the holder's heartbeat moves
    lock.release()
    assert not os.path.exists(url)
    # Valid JSON that is no lock record (null, a list) is nobody's: taken over, no traceback.
    for text in ("null", "[]"):
        with open(url, "w") as fh:
            fh.write(text)
        lock = locks.StageLock(cfg, "train_tokenizer")
        assert lock.acquire() == "unreadable lock"
        lock.release()


@pytest.fixture
def trained(sim, prepped, tmp_path):
    """A copy of a work dir with prep and train_tokenizer complete (the training test's, else one
    trained here), for the stages after them."""
    if "work" not in TRAINED:
        run = Run(sim, prepped, tmp_path / "train")
        proc, log = run.start("train.log", pace_s=0)
        assert finish(proc, 600) == 0, log.read_text()[-4000:]
        TRAINED["work"] = run.work
    work = tmp_path / "work"
    shutil.copytree(TRAINED["work"], work, ignore=shutil.ignore_patterns("logs", "locks"))
    return work


def _remove_node_running(sim, title, proc, log, timeout=300):
    """Remove the node of the first process whose title has `title` (an actor's or task's call in
    flight), add a replacement; returns the time of the loss."""
    pids = wait_for(lambda: sim.processes(title), timeout, f"a process titled {title}", proc, log, every=0.05)
    node = sim.node_of_pid(pids[0])
    assert node is not None, pids
    sim.remove(node)
    lost_at = time.time()
    sim.add()
    return lost_at


def _tar_keys(url):
    import tarfile

    with tarfile.open(url) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_loss_during_prep_writes_each_shard_once_elsewhere(sim, tmp_path):
    """Deliver 2 (prep): a node running a shard-writing task is removed; Ray runs the task again
    elsewhere: every planned shard once, complete, no temporaries, every sample in one shard."""
    work = tmp_path / "work"
    log = tmp_path / "prep.log"
    proc = restok(
        ["run", *_overrides(sim, work, tmp_path / "ray", "prep"), "data.samples_per_shard=4"], tmp_path, log
    )
    with killed_on_exit(proc):
        lost_at = _remove_node_running(sim, "ray::write_shard", proc, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    manifest = _json(work / "prep" / "manifest.json")
    keys, shards = [], 0
    for split, expected in (("train", 80), ("val", 10)):
        entries = manifest["splits"][split]["shards"]
        names = [e["shard"] for e in entries]
        assert len(names) == len(set(names)) and manifest["splits"][split]["total"] == expected
        for name in names:
            keys += sorted(_tar_keys(work / "prep" / name))
        shards += len(names)
    assert len(keys) == len(set(keys)) == 90  # every sample in exactly one shard: none twice
    assert not [p for p in os.listdir(work / "prep") if ".tmp-" in p]  # none partial
    RESULTS["node loss (prep tasks)"] = {
        "shards": shards,
        "duplicated": 0,
        "recover_s": round(os.path.getmtime(work / "prep" / "manifest.json") - lost_at, 1),
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_loss_during_extraction_redoes_its_shards_once(sim, trained, tmp_path):
    """Deliver 2 (extraction): an actor's node is removed while it extracts; a replacement redoes
    its shard: each code shard once, the counts equal prep's, nothing partial left."""
    log = tmp_path / "extract.log"
    args = [
        "run",
        *_overrides(sim, trained, tmp_path / "ray", "prep,train_tokenizer,extract_codes"),
        "extract.num_actors=2",
    ]
    # 1 s per shard: the node goes while its actor is in a call (else it may finish first).
    proc = restok(args, tmp_path, log, env={TEST_SHARD_SLEEP_ENV: "1.0"})
    with killed_on_exit(proc):
        lost_at = _remove_node_running(sim, "ray::CodeExtractor.extract", proc, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    text = full_log_text(log.read_text())
    assert "[restok] extract_codes: an actor was lost with node" in text, text[-3000:]
    out = trained / "extract_codes"
    manifest = _json(out / "manifest.json")
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) == len(set(names)) == 10 and manifest["counts"] == {"train": 80}
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    RESULTS["node loss (extraction actor)"] = {
        "shards": len(names),
        "duplicated": 0,
        "recover_s": round(os.path.getmtime(out / "manifest.json") - lost_at, 1),
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_loss_during_evaluation_replaces_the_actor_and_counts_each_image_once(sim, trained, tmp_path):
    """Deliver 2 (evaluation): an eval actor's node is removed during reconstruction evaluation;
    the pool replaces the actor, which redoes its share: every val image counted once."""
    log = tmp_path / "eval.log"
    args = [
        "eval",
        "recon",
        *_overrides(sim, trained, tmp_path / "ray"),
        "eval.num_actors=2",
        "eval.batch_size=4",
        "eval.probe_steps=10",
    ]
    proc = restok(args, tmp_path, log)
    with killed_on_exit(proc):
        lost_at = _remove_node_running(sim, "ray::EvalWorker.recon", proc, log)
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    text = "".join(_text(p) for p in sorted((trained / "logs").glob("eval-*.log")))
    assert re.search(r"\[evaluate\] actor \d lost with node \w+; its share is redone", text), text[-3000:]
    assert "could be read (damaged shards)" not in text  # every val image prep wrote was read
    assert "[evaluate] recon: 10 images on 2 actors" in text
    RESULTS["node loss (evaluation actor)"] = {"duplicated": 0, "recover_s": round(time.time() - lost_at, 1)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resized_world_resumes_through_the_universal_checkpoint(sim, prepped, tmp_path):
    """Deliver 4: a ZeRO-2 checkpoint of 2 workers resumes on 1 (only cluster.num_workers changes)
    through DeepSpeed's universal checkpoint; every step logged once, and the loss goes on from
    where it was (a fresh model's loss is far above it). The 2-worker run is the preempted one of
    the SIGTERM test when it ran (a spot node gone: go on with fewer), else one stopped here."""
    if "base" in PREEMPTED:
        run, stopped = Run(sim, prepped, tmp_path, copy_of=PREEMPTED["base"]), PREEMPTED["step"]
    else:
        run, stopped = Run(sim, prepped, tmp_path), 7
        proc = restok(run.args + [f"tokenizer_train.stop_after={stopped}"], run.base, run.base / "first.log")
        assert finish(proc, 600) == 0, (run.base / "first.log").read_text()[-4000:]
    assert max(markers(run.storage)) == stopped
    run_id = run.run_id()
    before = {m.step: m.value for m in run.client.get_metric_history(run_id, "loss")}
    proc = restok(run.args + ["cluster.num_workers=1"], run.base, run.base / "resized.log")
    assert finish(proc, 600) == 0, (run.base / "resized.log").read_text()[-4000:]
    text = run.full_log(run.base / "resized.log")
    assert "resuming a 2-worker checkpoint on 1 workers through DeepSpeed's universal checkpoint" in text
    assert resumed_at(text) == {stopped}
    run.check_one_run_each_step_once(run_id)
    loss = {m.step: m.value for m in run.client.get_metric_history(run_id, "loss")}
    assert loss.items() >= before.items()
    tail_before = sum(loss[s] for s in range(stopped - 3, stopped)) / 3
    head_after = sum(loss[s] for s in range(stopped, stopped + 3)) / 3
    # Same curve within noise (it keeps falling): a restart from scratch would be back near step 0's.
    assert head_after < tail_before + 0.25 * (loss[0] - tail_before), loss
    RESULTS["resized world (2 -> 1 workers)"] = {
        "steps_recomputed": 0,
        "duplicated": 0,
        "resumed_at": stopped,
        "loss_3_before": round(tail_before, 4),
        "loss_3_after": round(head_after, 4),
        "loss_step0": round(loss[0], 4),
    }
