"""MLflow tracking: one run per stage, nested under a pipeline run when there is one.

Workers never start or end runs: they log with `MlflowClient` against the explicit run id the
driver hands them (DEVELOPERS.md "Known traps"). Only the driver ends runs.
"""
from __future__ import annotations

import io
import os
import subprocess
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from configs.loading import to_flat_dict, to_yaml
from pipeline.paths import tracking_uri

MLFLOW_PARAM_MAX = 6000  # MLflow 3 param value limit; longer values are truncated


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):  # the store's folder is made when a store is first used
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        return ""


def artifact_root(cfg: Any) -> str:
    """Artifacts beside the store under the work dir (MLflow would otherwise use ./mlruns of
    whatever directory the command runs in)."""
    from pipeline.paths import work_url
    from pipeline.storage import join

    root = join(work_url(cfg), "mlartifacts")
    return root if "://" in root else f"file://{root}"


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def start_run(cfg: Any, stage: str, parent_run_id: str | None = None, extra_tags: Mapping[str, str] | None = None) -> str:
    """Create a FINISHED-able run for `stage`, tagged with the preset; returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = client_for(tracking_uri(cfg))
    tags = {
        "restok.preset": str(cfg.preset),
        "restok.stage": stage,
        "restok.git_commit": _git_commit(),
        MLFLOW_RUN_NAME: f"{cfg.tracking.run_name or cfg.preset}/{stage}",
        **(extra_tags or {}),
    }
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id(client, cfg.tracking.experiment, artifact_root(cfg)), tags=tags)
    run_id = run.info.run_id
    log_config(cfg, run_id)
    return run_id


def log_config(cfg: Any, run_id: str) -> None:
    """Resolved config as params (flattened) and as a YAML artifact."""
    from mlflow.entities import Param

    client = client_for(tracking_uri(cfg))
    params = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in sorted(to_flat_dict(cfg).items())]
    for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")


def end_run(cfg: Any, run_id: str, status: str = "FINISHED") -> None:
    client_for(tracking_uri(cfg)).set_terminated(run_id, status=status)


@contextmanager
def stage_run(cfg: Any, stage: str, run_id: str | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """Yield a run id for `stage`; a run created here is ended here (FAILED on error)."""
    if run_id:
        yield run_id
        return
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


def png_bytes(image: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def follow_run(uri: str, run_id: str, total_steps: int, desc: str, every_s: float = 2.0) -> Iterator[None]:
    """A terminal progress bar for a training stage, fed by the metrics its rank-0 worker logs to
    MLflow (`step`, `loss`, images/s or tokens/s): the driver cannot see the workers' own bars."""
    import threading

    from pipeline.console import progress

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
                shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "images_per_s", "tokens_per_s") if k in metrics}
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
