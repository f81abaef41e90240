"""One training stage, start to end: what `train_tokenizer` and `train_generator` share.

A stage is a `TrainingStage` spec (its name, its input stage, the Ray Train worker loop, an optional
check of the input manifest); `run_training_stage` skips a finished stage, fits on Ray Train
(jobs.training.ray_training), and then either records an unfinished run (stop_after) in an
incomplete manifest or exports the model (raw + EMA safetensors, config; jobs.training.checkpoints
.EXPORTABLE says which model and which manifest fields), registers it in MLflow and writes the
complete manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from configs.loading import to_yaml
from configs.schema import RestokConfig
from infra import paths, storage, tracking
from infra.manifest import is_complete, read_manifest, remove_manifest, write_manifest
from infra.stages import stage_fingerprint
from jobs.training import ray_training
from jobs.training.checkpoints import (
    CONFIG_NAME,
    EXPORTABLE,
    export_weights,
    register_stage_files,
    write_export,
)


@dataclass(frozen=True)
class TrainingStage:
    name: str  # "train_tokenizer" | "train_generator" (its export: checkpoints.EXPORTABLE[name])
    upstream: str  # the stage whose complete manifest it reads
    loop: Callable[[dict], None]  # the Ray Train worker loop (importable from the package)
    check_inputs: Callable[[RestokConfig, dict], None] | None = None  # (cfg, upstream manifest)


def run_training_stage(
    spec: TrainingStage, cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None
) -> dict:
    """The stage contract (infra.stages.StageRun) for a training stage."""
    stage_dir = paths.stage_dir(cfg, spec.name)
    fp = stage_fingerprint(cfg, spec.name)
    if is_complete(stage_dir, fp):
        return read_manifest(stage_dir)
    upstream = paths.input_manifest(cfg, spec.upstream)
    if spec.check_inputs is not None:
        spec.check_inputs(cfg, upstream)
    # The export is rewritten in place at the end: a manifest of another fingerprint must not stay
    # beside the new files should the fit, the export or the registration fail.
    remove_manifest(stage_dir)
    # Checkpoints trained on an input since rebuilt under the same config are not resumed. (The
    # graph and sweeps clear the whole stage first, MLflow run included; this covers a stage run
    # alone.)
    reason = ray_training.inputs_changed(cfg, spec.name, upstream)
    if reason:
        print(f"[{spec.name}] {reason}: its checkpoints are removed, training starts over", flush=True)
        storage.remove_tree(ray_training.experiment_url(cfg, spec.name))
    ray_training.record_inputs(cfg, spec.name, upstream)
    print(f"[{spec.name}] resolved config:\n{to_yaml(cfg)}", flush=True)
    with tracking.stage_run(cfg, spec.name, run_id, parent_run_id) as rid:
        result = ray_training.fit(cfg, spec.name, spec.loop, rid)
        return finish_training_stage(spec, cfg, stage_dir, fp, rid, result)


def finish_training_stage(
    spec: TrainingStage, cfg: RestokConfig, stage_dir: str, fp: str, run_id: str, result: Any
) -> dict:
    """An unfinished run (stop_after) gets an incomplete manifest; a finished one is exported,
    registered in MLflow and recorded in a complete manifest. The model is built only when there
    is something to export."""
    import ray.train  # heavy (seconds); third-party imports of Ray stay where they are used

    export = EXPORTABLE[spec.name]
    total_steps = int(cfg[ray_training.TRAIN_SECTION[spec.name]].steps)
    # The newest complete checkpoint on storage (our marker), not Ray's latest registered one.
    checkpoint_url, steps_done, reported = ray_training.final_checkpoint(cfg, spec.name)
    if steps_done < total_steps:
        return write_manifest(
            stage_dir, spec.name, fp, complete=False, steps_done=steps_done, checkpoint=checkpoint_url
        )
    model = export.build_model(cfg)
    with ray.train.Checkpoint(checkpoint_url).as_directory() as directory:
        raw, ema = export_weights(directory, export.engine, model)
    hashes = write_export(stage_dir, export.name, raw, ema, cfg)
    version = None
    if cfg.tracking.register_models:
        version = register_stage_files(
            paths.tracking_uri(cfg),
            run_id,
            stage_dir,
            [*hashes, CONFIG_NAME],
            f"restok-{export.name}",
            ["last-trained", str(cfg.preset)],
        )
    return export.write_manifest(
        stage_dir,
        spec.name,
        fp,
        model,
        cfg,
        hashes,
        steps_done,
        final_metrics={
            k: float(v) for k, v in (result.metrics or reported).items() if isinstance(v, (int, float))
        },
        ray_checkpoint=checkpoint_url,
        mlflow_run_id=run_id,
        registered_version=version,
    )
