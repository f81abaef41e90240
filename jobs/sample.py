"""Stage `sample` (`restok sample`): the class-balanced sample set of the trained generator, no
metrics (SPEC "gFID"; protocol in jobs.evaluation.sampling, drawn on the evaluation actor pool)."""

from __future__ import annotations

from configs.schema import RestokConfig
from infra import paths, tracking
from jobs.evaluation.generation import generate_samples, samples_url
from jobs.evaluation.pool import close_pool

STAGE = "sample"


def run(cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """`restok sample`: the class-balanced sample set of the trained generator (no metrics)."""
    paths.input_manifest(cfg, "train_tokenizer")
    paths.input_manifest(cfg, "train_generator")
    with tracking.stage_run(cfg, STAGE, run_id, parent_run_id) as rid:
        try:
            manifest = generate_samples(
                cfg,
                samples_url(cfg),
                paths.stage_dir(cfg, "train_tokenizer"),
                paths.stage_dir(cfg, "train_generator"),
            )
        finally:
            close_pool()
        tracking.log_metrics(
            paths.tracking_uri(cfg), rid, {"sample_images_per_second": manifest["images_per_second"]}
        )
    return manifest
