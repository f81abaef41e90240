"""A `restok run` killed with SIGKILL (its whole process group) right after a training checkpoint,
then rerun: it resumes from the newest checkpoint complete on storage (our COMPLETE.json marker,
whether or not Ray's snapshot registered it), removes orphaned (incomplete) checkpoint directories,
keeps `keep_checkpoints` over everything on storage, and continues the stage's MLflow run, which
ends FINISHED with every step logged once (issue 19, Deliver 3)."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from cluster_harness import full_log_text, markers, one_finished_stage_run, resumed_at

from configs.loading import load_config
from infra import paths, tracking
from jobs.training.ray_training import TEST_STEP_SLEEP_ENV

STEPS, EVERY, KEEP = 24, 8, 2
# The default preset with a tiny data set and schedule (issue 19: "a tiny default-like config").
OVERRIDES = [
    "stages=[prep,train_tokenizer]",
    "data.synthetic.train_per_class=8",
    "data.synthetic.val_per_class=1",
    "data.loader_workers=0",
    "data.prep_tasks=1",
    f"tokenizer_train.steps={STEPS}",
    f"tokenizer_train.checkpoint_every={EVERY}",
    f"tokenizer_train.keep_checkpoints={KEEP}",
    "tokenizer_train.log_every=1",
    "tokenizer_train.image_log_every=0",
    "tokenizer_train.global_batch_size=8",
    "tokenizer_train.micro_batch_size=4",
]


def _session_pids(sid):
    """Processes of session `sid` (everything the killed `restok run` started, Ray's included)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


def _restok(work, log, **popen):
    """`restok run` (the console script next to this interpreter), output to the file `log`."""
    restok = shutil.which("restok", path=os.path.dirname(sys.executable)) or "restok"
    # Paced (test-only env) so the kill lands between two checkpoints on a fast machine too.
    return subprocess.Popen(
        [restok, "run", f"work_dir={work}", *OVERRIDES],
        cwd=work.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", TEST_STEP_SLEEP_ENV: "0.5"},
        stdout=log,
        stderr=subprocess.STDOUT,
        **popen,
    )


def _kill_after_a_checkpoint(work, client):
    """Start `restok run` in its own session; SIGKILL its process group once a checkpoint is
    complete and the run has logged a step after it (so the rerun repeats logged steps)."""
    log = work.parent / "killed.log"
    with open(log, "w") as fh:
        proc = _restok(work, fh, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = markers(work / "ray")
            record = work / "train_tokenizer" / "mlflow_run.json"
            if done and record.exists():
                run_id = json.loads(record.read_text())["run_id"]
                logged = [m.step for m in client.get_metric_history(run_id, "loss")]
                # Step index s is logged once s + 1 steps are done: s >= checkpoint step is after it.
                if logged and max(logged) >= max(done) + 1 and max(done) < STEPS:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"no checkpoint to kill after:\n{log.read_text()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's processes of the killed driver (some in their own process group, same session)
        # die with it; wait for them, and kill by pid whatever outlives a grace period.
        end = time.monotonic() + 30
        while _session_pids(proc.pid) and time.monotonic() < end:
            time.sleep(0.5)
        leftovers = _session_pids(proc.pid)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes outlived the killed driver: {leftovers}"
    return proc.pid, run_id


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_training_resumes_from_newest_complete_checkpoint(tmp_path):
    work = tmp_path / "work"
    cfg = load_config(None, [f"work_dir={work}", *OVERRIDES])
    client = tracking.client_for(paths.tracking_uri(cfg))

    _, run_id = _kill_after_a_checkpoint(work, client)
    complete = markers(work / "ray")
    resume_step = max(complete)
    logged_before = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert max(logged_before) >= resume_step  # the rerun repeats steps that MLflow already has
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it
    # The case, made certain: Ray's snapshot has not registered that checkpoint (Ray
    # alone would restart from an older one, here from scratch).
    snapshot = os.path.join(os.path.dirname(complete[resume_step]), "checkpoint_manager_snapshot.json")
    if os.path.exists(snapshot):
        os.remove(snapshot)
    # An upload cut short by a kill: a newer checkpoint directory without the marker.
    orphan = re.sub(r"checkpoint_\d+$", f"checkpoint_{resume_step + EVERY:08d}", complete[resume_step])
    os.makedirs(orphan)
    shutil.copy(os.path.join(complete[resume_step], "meta.json"), orphan)

    log = tmp_path / "rerun.log"
    with open(log, "w") as fh:
        proc = _restok(work, fh, start_new_session=True)
    try:
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    # Worker lines are in the run's full log (the terminal gets one line per stage).
    assert resumed_at(full_log_text(out)) == {resume_step}, out[-6000:]

    # Storage: no orphan; exactly the KEEP newest complete checkpoints.
    experiment = os.path.dirname(complete[resume_step])
    kept = sorted(
        os.path.basename(d) for d in glob.glob(os.path.join(experiment, "checkpoint_*")) if os.path.isdir(d)
    )
    assert kept == [f"checkpoint_{s:08d}" for s in range(STEPS - EVERY * (KEEP - 1), STEPS + 1, EVERY)]
    assert all(os.path.exists(os.path.join(experiment, k, "COMPLETE.json")) for k in kept)
    manifest = json.loads((work / "train_tokenizer" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["steps_done"] == STEPS and manifest["mlflow_run_id"] == run_id

    # MLflow: one FINISHED run for the stage, each step logged once; the dead parent KILLED.
    stage_run = one_finished_stage_run(client, cfg.tracking.experiment, STEPS)
    assert stage_run.info.run_id == run_id
    assert stage_run.data.tags["restok.resumed_at_steps"] == str(resume_step)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = sorted(
        (r for r in runs if r.data.tags["restok.stage"] == "pipeline"), key=lambda r: r.info.start_time
    )
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert parents[0].data.tags["restok.continued_in"] == parents[1].info.run_id
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _checkpoint(root, step, marker=True):
    d = root / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, "world": 2}))
    if marker:
        (d / "COMPLETE.json").write_text(json.dumps({"step": step, "world": 2}))
    return d


def test_prepare_resume_adopts_registered_drops_orphans_and_keeps_the_newest(tmp_path):
    """Storage decides, not Ray's snapshot: a checkpoint the snapshot registered but that lacks our
    marker (killed in between) is adopted; unregistered unmarked directories are orphans."""
    from jobs.training import ray_training

    root = tmp_path / "train_tokenizer-fp"
    for step in (10, 20):
        _checkpoint(root, step)
    _checkpoint(root, 30, marker=False)  # registered by Ray, marker not yet written
    _checkpoint(root, 40, marker=False)  # half uploaded: no marker, not registered
    (root / "checkpoint_00000050").mkdir()  # upload cut before meta.json
    (root / ray_training.RAY_SNAPSHOT_NAME).write_text(
        json.dumps(
            {
                "checkpoint_results": [
                    {"checkpoint_dir_name": f"checkpoint_{s:08d}", "metrics": {}} for s in (10, 20, 30)
                ]
            }
        )
    )

    url, marker = ray_training.prepare_resume(str(root), keep=2)
    assert (url, marker["step"]) == (str(root / "checkpoint_00000030"), 30)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000020", "checkpoint_00000030"]
    assert ray_training.prepare_resume(str(root), keep=0)[1]["step"] == 30  # idempotent, keeps all


def test_driver_alive_tells_dead_and_reused_pids_apart():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = tracking.driver_id()
    host, pid, start = me.split(":")
    assert tracking.driver_alive(me) is True
    assert tracking.driver_alive(f"{host}:{child.pid}:123") is False
    assert tracking.driver_alive(f"{host}:{pid}:{int(start) + 1}") is False  # pid reused by another
    assert tracking.driver_alive(f"elsewhere-{host}:{pid}:{start}") is None  # unknown on another host


def test_a_resized_world_gives_every_rank_random_streams_of_its_own():
    """On a grown world old rank r's saved streams would reach ranks r, r + old, ... (the same
    nested-dropout lengths and crops); the resized resume gives each rank fresh ones from (seed,
    rank, step), reproducibly, and leaves the process's current streams alone."""
    import torch

    from jobs.training.deepspeed_runtime import fresh_rng_state, set_rng_state

    before = torch.get_rng_state()
    states = [fresh_rng_state(7, rank, 120) for rank in range(4)]
    assert torch.equal(torch.get_rng_state(), before)
    draws = []
    for state in states:
        set_rng_state(state)
        draws.append(torch.rand(4).tolist())
    assert len({tuple(d) for d in draws}) == 4  # every rank its own stream
    set_rng_state(fresh_rng_state(7, 2, 120))
    assert torch.rand(4).tolist() == draws[2]  # the same (seed, rank, step): the same stream
    set_rng_state(fresh_rng_state(7, 2, 121))
    assert torch.rand(4).tolist() != draws[2]


def test_ema_parts_read_back_in_every_layout_including_checkpoints_from_before_them(tmp_path):
    """ZeRO 1-2 checkpoints keep each rank's ranges of the flattened weights (start in the file's
    metadata); checkpoints written before that (`ema_sharded: false`) hold it whole on rank 0."""
    import torch
    from safetensors.torch import save_file

    from jobs.training.ray_training import ema_layout, read_ema_parts

    whole = torch.arange(6.0).reshape(2, 3)
    save_file({"w": whole}, str(tmp_path / "ema_rank0.safetensors"))
    old = {"world": 2, "ema_sharded": False, "ema_shapes": {"w": [2, 3]}}
    assert ema_layout(old) == "whole" and torch.equal(read_ema_parts(str(tmp_path), old)["w"], whole)
    for rank, (start, stop) in enumerate([(0, 4), (4, 6)]):
        save_file(
            {"w": whole.reshape(-1)[start:stop].clone()},
            str(tmp_path / f"ema_rank{rank}.safetensors"),
            metadata={"ema_fragments": json.dumps({"w": start})},
        )
    new = {"world": 2, "ema_layout": "fragments", "ema_shapes": {"w": [2, 3]}}
    assert torch.equal(read_ema_parts(str(tmp_path), new)["w"], whole)
    os.remove(tmp_path / "ema_rank1.safetensors")
    with pytest.raises(FileNotFoundError, match="EMA parts missing"):
        read_ema_parts(str(tmp_path), new)
