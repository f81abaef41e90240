"""MLflow tracking: one run per stage, nested under a pipeline run when there is one.

Workers never start or end runs: they log with `MlflowClient` against the explicit run id the
driver hands them (DEVELOPERS.md "Known traps"). Only the driver ends runs.

A killed driver cannot end its runs: every run is tagged with its driver (host:pid:start time), and
a later driver on the same host marks RUNNING runs of dead drivers KILLED (`reap_dead_runs`). A
training stage keeps one run per fingerprint across restarts: its id is recorded in the stage dir
(`mlflow_run.json`), and the rerun that resumes the checkpoints continues that run
(`continue_or_start_run`); the workers skip steps the run already has.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from configs.loading import to_flat_dict, to_yaml
from configs.schema import RestokConfig
from infra import storage
from infra.console import progress
from infra.paths import stage_dir, tracking_uri, work_url
from infra.stages import CONFIG_KEYS, stage_fingerprint
from infra.storage import join

MLFLOW_PARAM_MAX = 6000  # MLflow 3 param value limit; longer values are truncated
DRIVER_TAG = "restok.driver"
FINGERPRINT_TAG = "restok.fingerprint"
# Stages whose run continues across restarts (per-step curves); the record lives in the stage dir.
CONTINUED_STAGES = ("train_tokenizer", "train_generator")
RUN_RECORD = "mlflow_run.json"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):  # the store's folder is made when a store is first used
        path = uri[len("sqlite:///") :]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if not os.path.exists(path):
            seed_sqlite_store(path)
    return MlflowClient(tracking_uri=uri)


def seed_sqlite_store(path: str) -> bool:
    """Start a new sqlite store as a copy of an empty one this MLflow version already migrated
    (cached under ~/.cache/restok): MLflow otherwise runs its schema migrations on every new
    store, ~1.2 s of every first command in a new work dir (and of every test). MLflow opens the
    copy as its own (tables present, schema at head) and adds its Default experiment as usual.
    False, and MLflow creates the store itself, if the cache cannot be written."""
    import mlflow
    from mlflow.store.db import utils as db_utils

    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "restok")
    template = os.path.join(cache, f"mlflow-{mlflow.__version__}-empty.db")
    made, tmp = f"{template}.{os.getpid()}.tmp", f"{path}.{os.getpid()}.tmp"
    try:
        if not os.path.exists(template):
            os.makedirs(cache, exist_ok=True)
            engine = db_utils.create_sqlalchemy_engine_with_retry(f"sqlite:///{made}")
            db_utils._initialize_tables(engine)  # what MLflow runs on a new store, without a Default row
            engine.dispose()
            os.replace(made, template)  # atomic: a concurrent first use sees no half-made template
        shutil.copyfile(template, tmp)
        try:
            os.link(tmp, path)  # never over a store another process created meanwhile
        except FileExistsError:
            pass
        return True
    except Exception:  # a read-only home, a full disk, no hard links: MLflow makes the store itself
        return False
    finally:
        for leftover in (made, tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        return ""


def artifact_root(cfg: RestokConfig) -> str:
    """Artifacts beside the store under the work dir (MLflow would otherwise use ./mlruns of
    whatever directory the command runs in)."""

    root = join(work_url(cfg), "mlartifacts")
    return root if "://" in root else f"file://{root}"


def uses_tracking_server(uri: str) -> bool:
    """An MLflow tracking server (http(s)://, databricks): it owns the artifact store."""
    return uri.startswith(("http://", "https://", "databricks"))


def experiment_artifact_location(cfg: Any) -> str | None:
    """Where a new experiment keeps artifacts: the tracking server's default when a server is used
    (`mlflow server --artifacts-destination ...`, or its proxied default), else beside the store
    under the work dir. An experiment that exists keeps the location it was created with."""
    return None if uses_tracking_server(tracking_uri(cfg)) else artifact_root(cfg)


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] == "Z" else fields[19]  # a zombie is dead too


def driver_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def driver_alive(tag: str) -> bool | None:
    """Whether the driver named by a DRIVER_TAG value still runs; None when it ran on another host."""
    host, _, rest = tag.partition(":")
    pid, _, start = rest.partition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    if os.path.exists("/proc/self/stat"):
        now = _process_start(int(pid))
        return bool(now) and (not start or now == start)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def start_run(
    cfg: RestokConfig,
    stage: str,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    fingerprint: str | None = None,
) -> str:
    """Create a FINISHED-able run for `stage`, tagged with the preset; returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = client_for(tracking_uri(cfg))
    tags = {
        "restok.preset": str(cfg.preset),
        "restok.stage": stage,
        "restok.git_commit": _git_commit(),
        DRIVER_TAG: driver_id(),
        MLFLOW_RUN_NAME: f"{cfg.tracking.run_name or cfg.preset}/{stage}",
        **({FINGERPRINT_TAG: fingerprint} if fingerprint else {}),
        **(extra_tags or {}),
    }
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(
        experiment_id(client, cfg.tracking.experiment, experiment_artifact_location(cfg)), tags=tags
    )
    run_id = run.info.run_id
    log_config(cfg, run_id)
    return run_id


def log_config(cfg: RestokConfig, run_id: str) -> None:
    """Resolved config as params (flattened) and as a YAML artifact."""
    from mlflow.entities import Param

    client = client_for(tracking_uri(cfg))
    params = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in sorted(to_flat_dict(cfg).items())]
    for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")


def end_run(cfg: RestokConfig, run_id: str, status: str = "FINISHED") -> None:
    client_for(tracking_uri(cfg)).set_terminated(run_id, status=status)


def reap_dead_runs(cfg: RestokConfig) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose driver (on this host) is gone; returns
    their ids. Runs of drivers on other hosts are left alone (their liveness is unknown here)."""
    client = client_for(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    reaped = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        driver = run.data.tags.get(DRIVER_TAG, "")
        if driver and driver_alive(driver) is False:
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "restok.end_reason", f"driver {driver} died")
            print(
                f"[restok] MLflow run {run.info.run_id} ({run.data.tags.get('restok.stage', '?')}) "
                f"of dead driver {driver}: marked KILLED",
                flush=True,
            )
            reaped.append(run.info.run_id)
    return reaped


def _record_url(cfg: RestokConfig, stage: str) -> str:

    return join(stage_dir(cfg, stage), RUN_RECORD)


def continue_or_start_run(
    cfg: RestokConfig, stage: str, fingerprint: str, parent_run_id: str | None = None
) -> tuple[str, bool]:
    """(run id, continued): for a training stage, the run recorded in its stage dir for the same
    fingerprint (set RUNNING again, moved under `parent_run_id`), unless its driver still runs;
    otherwise a new run (recorded for training stages)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = client_for(tracking_uri(cfg))
    record = storage.read_json(_record_url(cfg, stage)) if stage in CONTINUED_STAGES else None
    if record and record.get("fingerprint") == fingerprint:
        try:
            run = client.get_run(record["run_id"])
        except MlflowException:
            run = None
        if (
            run is not None
            and run.info.lifecycle_stage == "active"
            and not (run.info.status == "RUNNING" and driver_alive(run.data.tags.get(DRIVER_TAG, "")))
        ):
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, DRIVER_TAG, driver_id())
            old_parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
            if parent_run_id and old_parent != parent_run_id:
                client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)
                before = run.data.tags.get("restok.previous_parent_runs", "")
                client.set_tag(
                    run_id, "restok.previous_parent_runs", ",".join(filter(None, [before, old_parent]))
                )
            return run_id, True
    run_id = start_run(cfg, stage, parent_run_id, fingerprint=fingerprint)
    if stage in CONTINUED_STAGES:
        storage.write_json_atomic(_record_url(cfg, stage), {"run_id": run_id, "fingerprint": fingerprint})
    return run_id, False


@contextmanager
def stage_run(
    cfg: RestokConfig, stage: str, run_id: str | None = None, parent_run_id: str | None = None
) -> Iterator[str]:
    """Yield a run id for `stage`; a run created (or continued) here is ended here (FAILED on error)."""
    if run_id:
        yield run_id
        return
    reap_dead_runs(cfg)
    if stage in CONFIG_KEYS:  # a graph stage (not e.g. `sample` or `sweep`)
        run_id, _ = continue_or_start_run(cfg, stage, stage_fingerprint(cfg, stage), parent_run_id)
    else:
        run_id = start_run(cfg, stage, parent_run_id)
    try:
        yield run_id
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id, "FINISHED")


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
    client = client_for(uri)
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def log_image(uri: str, run_id: str, image: Any, artifact_file: str) -> None:
    """Log a uint8 HxWx3 numpy array (or PIL image) as a PNG artifact."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    client_for(uri).log_image(run_id, image, artifact_file)


def log_dict(uri: str, run_id: str, obj: Any, artifact_file: str) -> None:
    client_for(uri).log_dict(run_id, obj, artifact_file)


def log_figure(uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    client_for(uri).log_figure(run_id, figure, artifact_file)


@contextmanager
def follow_run(uri: str, run_id: str, total_steps: int, desc: str, every_s: float = 2.0) -> Iterator[None]:
    """A terminal progress bar for a training stage, fed by the metrics its rank-0 worker logs to
    MLflow (`step`, `loss`, images/s or tokens/s): the driver cannot see the workers' own bars."""
    import threading

    stop = threading.Event()
    bar = progress(total=total_steps, desc=desc, unit="step")

    def poll() -> None:
        client = client_for(uri)
        while not stop.wait(every_s):
            try:
                metrics = client.get_run(run_id).data.metrics
            except Exception:  # a busy sqlite store: try again at the next tick
                continue
            step = int(metrics.get("step", 0))
            if step > bar.n:
                shown = {
                    k: f"{metrics[k]:.4g}" for k in ("loss", "images_per_s", "tokens_per_s") if k in metrics
                }
                bar.set_postfix(shown, refresh=False)
                bar.update(step - bar.n)

    thread = threading.Thread(target=poll, name=f"follow-{desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        bar.close()
