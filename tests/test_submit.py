"""`restok submit | status | logs | stop` against a real Ray head started on loopback.

The head runs as `ray start --head --block` in its own process group and is stopped by signalling
that group in a finally: `ray stop` would also stop every other Ray instance of this user on the
machine (other test sessions), so the test never calls it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cluster_harness import full_log_text, markers, one_finished_stage_run, resumed_at, wait_for
from conftest import run_restok

from configs.loading import load_config
from infra import paths, tracking
from infra.manifest import read_manifest
from infra.ray_connect import free_port
from jobs.training.ray_training import TEST_STEP_SLEEP_ENV
from pipeline import submit

ROOT = Path(__file__).resolve().parents[1]
PACE_S = 1.0
SMALL_DATA = ["data.synthetic.train_per_class=4", "data.synthetic.val_per_class=2", "data.prep_tasks=1"]


def test_submission_id_is_deterministic_and_names_the_preset():
    a = submit.submission_id("imagenet256-restok-l", ["seed=1"], "", "abc")
    assert a == submit.submission_id("imagenet256-restok-l", ["seed=1"], "", "abc")
    assert a.startswith("restok-imagenet256-restok-l-") and len(a.rsplit("-", 1)[1]) == 12
    others = {
        submit.submission_id("imagenet256-restok-l", ["seed=2"], "", "abc"),
        submit.submission_id("imagenet256-restok-l", ["seed=1"], "prep", "abc"),
        submit.submission_id("imagenet256-restok-l", ["seed=1"], "", "abd"),
    }
    assert a not in others and len(others) == 3
    assert submit.submission_id("/tmp/My Preset.yaml", [], "", "").startswith("restok-my-preset-")
    # the resolved config is part of it: a site variable read through ${oc.env:...} or an edited
    # preset file makes a new job
    assert submit.submission_id("p", [], "", "abc", "work_dir: /mnt/a\n") != submit.submission_id(
        "p", [], "", "abc", "work_dir: /mnt/b\n"
    )


def test_a_preset_file_is_named_inside_the_project_or_refused(tmp_path):
    """The job runs in an unpacked copy of the project: a preset file elsewhere would be missing."""
    inside = ROOT / "configs" / "presets" / "default.yaml"
    assert submit.job_preset(str(inside)) == "configs/presets/default.yaml"
    assert submit.job_preset("imagenet256-restok-l") == "imagenet256-restok-l"
    outside = tmp_path / "my.yaml"
    outside.write_text("base: default\n")
    with pytest.raises(submit.SubmitError, match="outside .* is not in the job's working_dir"):
        submit.job_preset(str(outside))
    assert "AWS_ENDPOINT_URL" in submit.FORWARDED_ENV and "AWS_SECRET_ACCESS_KEY" not in submit.FORWARDED_ENV


def test_entrypoint_runtime_env_and_addresses():
    ep = submit.entrypoint("python", "default", ["work_dir=/x y"], "train_tokenizer")
    assert ep == (
        "python -m pipeline.cli run default 'work_dir=/x y' cluster.address=auto 'stages=[train_tokenizer]'"
    )
    env = submit.runtime_env(use_pip=True)
    assert env["working_dir"] == str(ROOT) and ".git" in env["excludes"] and "restok_work" in env["excludes"]
    assert "torch==2.14.1" in env["pip"] and "ray[default,train]==2.60.0" in env["pip"]
    assert "s3fs==2026.9.0" in env["pip"]  # the cloud extra: s3:// work dirs, shards, checkpoints
    assert "pip" not in submit.runtime_env(use_pip=False)
    assert submit.is_loopback("http://127.0.0.1:8265") and submit.is_loopback("localhost:8265")
    assert not submit.is_loopback("http://10.0.0.5:8265")
    assert submit.normalise_stage("train-tokenizer") == "train_tokenizer"
    with pytest.raises(submit.SubmitError, match="valid: prep"):
        submit.normalise_stage("sample")


def expected_job_id(items, stage=""):
    """The id `restok submit PRESET overrides [--stage]` gives under the pinned code version."""
    cfg = load_config(items[0], items[1:], resolve_relative_paths=False)
    return submit.submission_id(items[0], items[1:], stage, "test-submit", submit.config_text(cfg))


def _restok(*args, timeout=600):
    # A pinned code version keeps the submission id stable while the tree is being edited.
    return run_restok(*args, cwd=ROOT, env={"RESTOK_CODE_VERSION": "test-submit"}, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with the Jobs dashboard, shared by the module's tests; yields its
    http address. Its processes (so every job's Train workers) sleep PACE_S per training step, so a
    test can act between two checkpoints however fast the machine is."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    dashboard = free_port()
    temp_dir = f"/tmp/rtest{os.getpid()}_{dashboard}"  # short: unix socket paths are limited
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--include-dashboard=true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        TEST_STEP_SLEEP_ENV: str(PACE_S),
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    head = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 240
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                submit.job_client(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            # `ray start --block` takes ~30 s to stop gracefully; the group is killed after 5.
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_a_stage_to_a_local_head_then_status_logs_resubmit_stop(ray_head, tmp_path):
    work = tmp_path / "work"
    items = ["default", f"work_dir={work}", *SMALL_DATA]
    done = _restok("submit", *items, "--stage", "prep", "--address", ray_head)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job_id = expected_job_id(items, "prep")
    assert f"submitted {job_id} " in done.stdout
    assert f"job {job_id}: SUCCEEDED" in done.stdout
    assert read_manifest(str(work / "prep"))["complete"] is True
    # Same preset, overrides and code: reported, not run twice (the id hashes the code too).
    again = _restok("submit", *items, "--stage", "prep", "--address", ray_head)
    assert again.returncode == 0 and f"job {job_id} already SUCCEEDED" in again.stdout

    status = _restok("status", job_id, "--address", ray_head)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = _restok("logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "restok run: default" in logs.stdout and "mlflow ui" in logs.stdout

    # A job that is stopped before it finishes; its resubmission would get a -r2 id.
    other = _restok("submit", *items, "seed=5", "--no-wait", "--address", ray_head)
    assert other.returncode == 0, other.stderr
    other_id = expected_job_id([*items, "seed=5"])
    assert f"submitted {other_id} " in other.stdout
    stop = _restok("stop", other_id, "--address", ray_head)
    assert stop.returncode == 0 and other_id in stop.stdout
    client = submit.job_client(ray_head)
    deadline = time.time() + 120
    while str(client.get_job_status(other_id).value) not in submit.TERMINAL and time.time() < deadline:
        time.sleep(1)
    assert str(client.get_job_status(other_id).value) == "STOPPED"
    assert submit.free_job_id(client, other_id) == (f"{other_id}-r2", None)

    missing = _restok("status", "restok-no-such-job", "--address", ray_head)
    assert missing.returncode == 2 and "restok status:" in missing.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_job_driver_is_resubmitted_and_the_stage_continues(ray_head, tmp_path):
    """Issue 17, Deliver 5 through Ray Jobs: the job's driver SIGKILLed between two tokenizer
    checkpoints (its Ray job ends with it: FAILED); the same `restok submit` again gets the next
    id, takes over the dead driver's stage lock and resumes from the newest complete checkpoint,
    with one MLflow run holding each step once."""
    work = tmp_path / "work"
    items = ["default", f"work_dir={work}", *SMALL_DATA]
    assert _restok("submit", *items, "--stage", "prep", "--address", ray_head).returncode == 0
    steps, every = 12, 4
    train = [
        *items,
        f"tokenizer_train.steps={steps}",
        f"tokenizer_train.checkpoint_every={every}",
        "tokenizer_train.log_every=1",
        "tokenizer_train.image_log_every=0",
        "cluster.num_workers=1",  # the job's driver is what is killed; one Train worker is enough
    ]
    first = _restok("submit", *train, "--stage", "train_tokenizer", "--no-wait", "--address", ray_head)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id = expected_job_id(train, "train_tokenizer")
    client = submit.job_client(ray_head)
    wait_for(lambda: every in markers(work / "ray"), 400, f"the checkpoint at step {every}")

    def job_driver():
        """The Python driver itself (Ray Jobs starts it through a shell, whose one argument
        contains the whole command: killing that shell would leave the driver running)."""
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"] or []
            if "pipeline.cli" in argv and f"work_dir={work}" in argv:
                return proc
        return None

    driver = wait_for(job_driver, 30, "the job's driver process")
    driver.kill()  # SIGKILL: no handler runs, the lock and the MLflow run are left as they were
    wait_for(lambda: str(client.get_job_status(job_id).value) == "FAILED", 120, "the job to fail")

    again = _restok("submit", *train, "--stage", "train_tokenizer", "--address", ray_head)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"submitted {job_id}-r2 " in again.stdout and f"job {job_id}-r2: SUCCEEDED" in again.stdout
    text = full_log_text(again.stdout)
    assert "took over a stale lock" in text, text[-3000:]
    resumed = resumed_at(text)
    assert len(resumed) == 1 and min(resumed) >= every and min(resumed) % every == 0, text[-3000:]

    cfg = load_config("default", train[1:])
    one_finished_stage_run(tracking.client_for(paths.tracking_uri(cfg)), cfg.tracking.experiment, steps)
    assert read_manifest(str(work / "train_tokenizer"))["steps_done"] == steps
