"""`restok run`: the stage graph prep -> train_tokenizer -> extract_codes -> train_generator -> evaluate.

One MLflow parent run per invocation and one child run per stage that runs (its id is handed to the
stage's `run(cfg, run_id=...)`). A stage is skipped when its manifest is complete for the same
fingerprint (infra.stages) and no input of it was rebuilt after it; otherwise it runs and
resumes its own unfinished work. Ray starts (or is connected to) only when a stage has to run,
so a fully finished pipeline re-checks in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from configs.loading import to_yaml
from data_prep.sources import check_source
from infra import console, paths, storage, tracking
from infra import manifest as manifests
from infra.console import say
from infra.ray_connect import connect_ray
from infra.stages import STAGE_ORDER, UPSTREAM, StageRun, stage_fingerprint
from jobs.training import ray_training
from pipeline import locks

StageFn = StageRun

# Stage name -> the module whose `run` is the stage (infra.stages.StageRun). Imported when the
# stage runs, so that `restok status` and the pre-flight checks do not load the training stack;
# tests/test_layering.py reads these names as imports of this module.
STAGE_MODULES = {
    "prep": "data_prep.prepare",
    "train_tokenizer": "jobs.train_tokenizer",
    "extract_codes": "jobs.extract_codes",
    "train_generator": "jobs.train_generator",
    "evaluate": "jobs.evaluate",
}

# Manifest fields that are bookkeeping, not results (left out of the summary's metrics column).
_BOOKKEEPING = {"version", "stage", "fingerprint", "complete", "written_at", "step", "lr"}
_SUMMARY_METRICS = 5
# Shown first in the summary when a manifest has them (the protocol's headline numbers).
_HEADLINE = (
    "rfid",
    "gfid",
    "fd_probe_recon",
    "fd_probe_gen",
    "probe_class_consistency",
    "probe_recon_class_consistency",
    "inception_score",
    "psnr",
    "loss",
    "mse",
    "codebook_usage",
    "train_images",
    "val_images",
    "train_count",
    "num_images",
    "num_codes",
)


@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped | incomplete | failed | not run
    wall_s: float = 0.0
    run_id: str = ""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


class PipelineError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------- helpers


def selected_stages(cfg: Any) -> list[str]:
    """cfg.stages in graph order (the loader already rejected unknown names)."""
    wanted = set(cfg.stages)
    return [s for s in STAGE_ORDER if s in wanted]


def load_stage(stage: str) -> StageFn:
    return importlib.import_module(STAGE_MODULES[stage]).run


def key_metrics(manifest: Mapping[str, Any] | None) -> dict[str, float]:
    """A manifest's results: its `metrics` and `final_metrics` dicts, then numeric top-level fields."""
    if not manifest:
        return {}
    out: dict[str, float] = {}
    sources = [manifest.get(k) for k in ("metrics", "final_metrics")]
    sources.append({k: v for k, v in manifest.items() if k not in _BOOKKEEPING})
    # Per-split sizes: prep's splits.<split>.total, extract_codes' counts.<split>.
    splits = manifest.get("splits")
    if isinstance(splits, Mapping):
        sources.insert(
            0, {f"{k}_images": v.get("total") for k, v in splits.items() if isinstance(v, Mapping)}
        )
    counts = manifest.get("counts")
    if isinstance(counts, Mapping):
        sources.insert(0, {f"{k}_count": v for k, v in counts.items()})
    for source in sources:
        if isinstance(source, Mapping):
            for k, v in source.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _BOOKKEEPING:
                    out.setdefault(str(k), float(v))
    return out


def stale_reason(cfg: Any, stage: str, rebuilt: set[str]) -> str:
    """Why a complete manifest is out of date: an input stage was rebuilt after it ('' if fresh)."""
    mine = manifests.read_manifest(paths.stage_dir(cfg, stage)) or {}
    for up in UPSTREAM[stage]:
        if up in rebuilt:
            return f"input '{up}' was rebuilt in this run"
        theirs = manifests.read_manifest(paths.stage_dir(cfg, up)) or {}
        if str(theirs.get("written_at", "")) > str(mine.get("written_at", "")):
            return f"input '{up}' is newer than its outputs"
    return ""


def resume_reason(cfg: Any, stage: str) -> str:
    """Why an unfinished training stage must not continue its kept checkpoints and MLflow run
    (its input was rebuilt under the same config since they were written), or ''."""
    if stage not in ray_training.TRAIN_SECTION:
        return ""
    upstream = manifests.read_manifest(paths.stage_dir(cfg, UPSTREAM[stage][0]))
    return ray_training.inputs_changed(cfg, stage, upstream) if upstream else ""


def clear_stage_dir(cfg: Any, stage: str) -> None:
    """Remove a stage's outputs so it rebuilds from its (changed) inputs instead of resuming.

    Training stages also keep Ray Train checkpoints under cluster.storage_path, named by
    jobs.training.ray_training.experiment_name; those go too, or the rebuild would resume the old run.
    """
    targets = [paths.stage_dir(cfg, stage)]
    if stage in ("train_tokenizer", "train_generator"):
        targets.append(storage.join(paths.ray_storage_path(cfg), f"{stage}-{stage_fingerprint(cfg, stage)}"))
    for url in targets:
        storage.remove_tree(url)


def _fmt_metrics(metrics: Mapping[str, float], limit: int = _SUMMARY_METRICS) -> str:
    rank = {name: i for i, name in enumerate(_HEADLINE)}
    items = sorted(metrics.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    text = ", ".join(f"{k}={v:.4g}" for k, v in items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def summary_table(results: list[StageResult]) -> str:
    rows = [("stage", "status", "time", "key metrics")]
    for r in results:
        # Why a complete stage was rebuilt is logged when it happens; the table only flags it.
        flag = {"forced": " (forced)"}.get(r.reason, " (stale)") if r.reason and r.status != "skipped" else ""
        status = r.status + flag
        rows.append(
            (
                r.stage,
                status,
                _fmt_time(r.wall_s) if r.status != "not run" else "-",
                _fmt_metrics(r.metrics) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=False)) + "  " + row[3]
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 11)
    return "\n".join(lines)


def mlflow_ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def _print_summary(cfg: Any, results: list[StageResult], parent_run_id: str, total_s: float) -> None:
    uri = paths.tracking_uri(cfg)
    say(f"\n== restok run: {cfg.preset} ({_fmt_time(total_s)}) ==")
    say(summary_table(results))
    say(f"artifacts:    {paths.work_url(cfg)}  (one folder per stage, each with manifest.json)")
    say(f"MLflow store: {uri}  (experiment '{cfg.tracking.experiment}', pipeline run {parent_run_id})")
    say(f"look at it:   {mlflow_ui_command(uri)}")


# ---------------------------------------------------------------------------------------- graph


def preflight(cfg: Any, stages: list[str]) -> None:
    """Checks that fail in seconds with one line, before Ray, MLflow or any output directory exists:
    the data source's layout (when prep runs) and the manifests of inputs not run now."""

    if "prep" in stages:
        check_source(cfg.data)
    for stage in stages:
        for up in UPSTREAM[stage]:
            if up not in stages:
                paths.input_manifest(cfg, up)


def _follow(cfg: Any, stage: str, run_id: str):
    """The terminal's progress bar of a training stage (other stages draw their own)."""
    section = {"train_tokenizer": "tokenizer_train", "train_generator": "generator_train"}.get(stage)
    if section is None:
        return contextlib.nullcontext()
    return tracking.follow_run(paths.tracking_uri(cfg), run_id, int(cfg[section].steps), stage)


def write_resolved_config(cfg: Any) -> None:
    """<work_dir>/config.yaml: the resolved config of the latest run (also in every MLflow run)."""
    storage.write_bytes_atomic(storage.join(paths.work_url(cfg), "config.yaml"), to_yaml(cfg).encode())


def run_pipeline(cfg: Any, force: bool = False, stage_impls: Mapping[str, StageFn] | None = None) -> int:
    """Run the selected stages in order; returns a process exit code (0 ok, 1 a stage failed).

    `force` clears and rebuilds every selected stage. `stage_impls` maps stage names to callables
    with the stage contract `run(cfg, run_id=None) -> manifest`; names not given load the real
    stage modules (tests inject stand-ins here, production never passes it).
    """
    stages = selected_stages(cfg)
    impls = dict(stage_impls or {})
    preflight(cfg, [s for s in stages if s not in impls])
    # Another live driver running one of these stages: stop in one line before anything starts.
    locks.check_free(cfg, stages)
    uri = paths.tracking_uri(cfg)
    say(f"restok run: preset {cfg.preset} | work dir {paths.work_url(cfg)} | MLflow {uri}")
    if console.current_log():
        say(f"full log: {console.current_log()}")
    print(f"# restok run: stages {stages}\n{to_yaml(cfg)}", flush=True)
    write_resolved_config(cfg)

    # Runs left RUNNING by a killed driver: KILLED, and linked to this pipeline run.
    reaped = tracking.reap_dead_runs(cfg)
    parent = tracking.start_run(cfg, "pipeline", extra_tags={"restok.stages": ",".join(stages)})
    client = tracking.client_for(uri)
    for run_id in reaped:
        client.set_tag(run_id, "restok.continued_in", parent)
    if reaped:
        client.set_tag(parent, "restok.continues", ",".join(reaped))
    results = [StageResult(s, "not run") for s in stages]
    rebuilt: set[str] = set()
    started_ray = False
    t_start = time.perf_counter()
    current: StageResult | None = None
    held = contextlib.ExitStack()  # the running stage's lock (pipeline.locks)
    try:
        for result in results:
            held.close()
            current = result
            stage = result.stage
            held.enter_context(locks.stage_lock(cfg, stage))
            stage_dir = paths.stage_dir(cfg, stage)
            fp = stage_fingerprint(cfg, stage)
            if not force and manifests.is_complete(stage_dir, fp):
                reason = stale_reason(cfg, stage, rebuilt)
                if not reason:
                    result.status = "skipped"
                    result.metrics = key_metrics(manifests.read_manifest(stage_dir))
                    client.set_tag(parent, f"restok.stage.{stage}", "skipped")
                    say(f"{stage}: skipped (complete for this config, fingerprint {fp})")
                    continue
                say(f"{stage}: {reason}; clearing {stage_dir} and rebuilding")
                clear_stage_dir(cfg, stage)
                result.reason = reason
            elif force:
                say(f"{stage}: --force, clearing {stage_dir} and rebuilding")
                clear_stage_dir(cfg, stage)
                result.reason = "forced"
            else:
                reason = resume_reason(cfg, stage)
                if reason:
                    say(f"{stage}: {reason}; clearing {stage_dir} and rebuilding")
                    clear_stage_dir(cfg, stage)
                    result.reason = reason

            run_fn = impls.get(stage) or load_stage(stage)
            if not started_ray:
                started_ray = connect_ray(cfg) or started_ray
            # A training stage resuming its checkpoints continues its previous run (one curve).
            child, continued = tracking.continue_or_start_run(cfg, stage, fp, parent_run_id=parent)
            result.run_id = child
            print(
                f"[restok] {stage}: running (MLflow run {child}{', continued' if continued else ''})",
                flush=True,
            )
            t0 = time.perf_counter()
            try:
                with _follow(cfg, stage, child):
                    manifest = run_fn(cfg, run_id=child)
            except BaseException:
                result.wall_s = time.perf_counter() - t0
                result.status = "failed"
                tracking.end_run(cfg, child, "FAILED")
                raise
            result.wall_s = time.perf_counter() - t0
            written = manifests.read_manifest(stage_dir) or {}
            if written.get("fingerprint") != fp:
                tracking.end_run(cfg, child, "FAILED")
                result.status = "failed"
                raise PipelineError(
                    f"stage returned without a manifest for fingerprint {fp} "
                    f"at {manifests.manifest_url(stage_dir)}"
                )
            if not written.get("complete"):
                # A deliberate partial run (e.g. tokenizer_train.stop_after): later stages wait.
                result.status = "incomplete"
                result.metrics = key_metrics(written)
                tracking.end_run(cfg, child, "FINISHED")
                client.set_tag(parent, f"restok.stage.{stage}", "incomplete")
                say(f"{stage}: stopped before completion; `restok run` again resumes it")
                break
            result.status = "ran"
            result.metrics = key_metrics(manifest or manifests.read_manifest(stage_dir))
            rebuilt.add(stage)
            tracking.log_metrics(uri, child, {"stage_wall_s": result.wall_s})
            tracking.end_run(cfg, child, "FINISHED")
            client.set_tag(parent, f"restok.stage.{stage}", "ran")
            say(f"{stage}: done in {_fmt_time(result.wall_s)}  {_fmt_metrics(result.metrics, 3)}")
        current = None
        total = time.perf_counter() - t_start
        _log_parent_metrics(uri, parent, results, total)
        tracking.end_run(cfg, parent, "FINISHED")
        _print_summary(cfg, results, parent, total)
        return 0
    except KeyboardInterrupt:
        tracking.end_run(cfg, parent, "KILLED")
        raise
    except Exception as exc:
        traceback.print_exc()  # the full story goes to the log
        tracking.end_run(cfg, parent, "FAILED")
        _print_summary(cfg, results, parent, time.perf_counter() - t_start)
        stage = current.stage if current else "?"
        where = f"MLflow run {current.run_id}" if current and current.run_id else f"pipeline run {parent}"
        log = f"; full log: {console.current_log()}" if console.current_log() else ""
        console.error(f"restok run: stage '{stage}' FAILED: {console.one_line(exc)} ({where}{log})")
        return 1
    finally:
        held.close()
        if started_ray:
            import ray

            ray.shutdown()


def _log_parent_metrics(uri: str, parent: str, results: list[StageResult], total_s: float) -> None:
    """Each stage's key metrics and wall time on the pipeline run, for side-by-side comparison."""
    metrics: dict[str, float] = {"pipeline_wall_s": total_s}
    for r in results:
        if r.status == "ran":
            metrics[f"{r.stage}.wall_s"] = r.wall_s
        metrics.update({f"{r.stage}.{k}": v for k, v in r.metrics.items()})
    tracking.log_metrics(uri, parent, metrics)
