"""`restok submit | status | logs | stop` against a real Ray head started on loopback.

The head runs as `ray start --head --block` in its own process group and is stopped by signalling
that group in a finally: `ray stop` would also stop every other Ray instance of this user on the
machine (other test sessions), so the test never calls it.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_restok

from infra.manifest import read_manifest
from pipeline import submit

ROOT = Path(__file__).resolve().parents[1]


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


def test_entrypoint_runtime_env_and_addresses():
    ep = submit.entrypoint("python", "default", ["work_dir=/x y"], "train_tokenizer")
    assert ep == (
        "python -m pipeline.cli run default 'work_dir=/x y' cluster.address=auto 'stages=[train_tokenizer]'"
    )
    env = submit.runtime_env(use_pip=True)
    assert env["working_dir"] == str(ROOT) and ".git" in env["excludes"] and "restok_work" in env["excludes"]
    assert "torch==2.14.1" in env["pip"] and "ray[default,train]==2.60.0" in env["pip"]
    assert "pip" not in submit.runtime_env(use_pip=False)
    assert submit.is_loopback("http://127.0.0.1:8265") and submit.is_loopback("localhost:8265")
    assert not submit.is_loopback("http://10.0.0.5:8265")
    assert submit.normalise_stage("train-tokenizer") == "train_tokenizer"
    with pytest.raises(submit.SubmitError, match="valid: prep"):
        submit.normalise_stage("sample")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restok(*args, timeout=600):
    # A pinned code version keeps the submission id stable while the tree is being edited.
    return run_restok(*args, cwd=ROOT, env={"RESTOK_CODE_VERSION": "test-submit"}, timeout=timeout)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with the Jobs dashboard; yields its http address."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    dashboard = _free_port()
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
        str(_free_port()),
        "--include-dashboard=true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(_free_port()),
        "--ray-client-server-port",
        str(_free_port()),
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
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
                submit._client(address).list_jobs()
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
    items = [
        "default",
        f"work_dir={work}",
        "data.synthetic.train_per_class=4",
        "data.synthetic.val_per_class=2",
        "data.prep_tasks=1",
    ]
    done = _restok("submit", *items, "--stage", "prep", "--address", ray_head)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job_id = submit.submission_id("default", items[1:], "prep", "test-submit")
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
    other_id = submit.submission_id("default", items[1:] + ["seed=5"], "", "test-submit")
    assert f"submitted {other_id} " in other.stdout
    stop = _restok("stop", other_id, "--address", ray_head)
    assert stop.returncode == 0 and other_id in stop.stdout
    client = submit._client(ray_head)
    deadline = time.time() + 120
    while str(client.get_job_status(other_id).value) not in submit.TERMINAL and time.time() < deadline:
        time.sleep(1)
    assert str(client.get_job_status(other_id).value) == "STOPPED"
    assert submit._free_id(client, other_id) == (f"{other_id}-r2", None)

    missing = _restok("status", "restok-no-such-job", "--address", ray_head)
    assert missing.returncode == 2 and "restok status:" in missing.stderr
