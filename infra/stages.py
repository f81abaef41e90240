"""The stage graph's static facts: order, inputs, and which config each stage's output depends on.

A stage's fingerprint hashes its own config sections and its upstream fingerprints, so it can be
computed before anything runs: the graph skips a stage whose manifest is complete with the same
fingerprint, and a change upstream (say the tokenizer's config) invalidates everything after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from configs.schema import STAGE_NAMES, RestokConfig
from infra.manifest import config_subtree, fingerprint

STAGE_ORDER = STAGE_NAMES  # graph order (configs.schema.StageName)


class StageRun(Protocol):
    """The stage contract: every stage module (data_prep.prepare, jobs.<stage>) exposes `run` so.

    `run_id`: log into this MLflow run (the graph's child run); else the stage opens its own run,
    nested under `parent_run_id` when given (a sweep chain). Returns the stage's manifest, written
    last; a complete manifest with the same fingerprint makes the call a no-op that returns it."""

    def __call__(
        self, cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None
    ) -> dict[str, Any]: ...


UPSTREAM: dict[str, tuple[str, ...]] = {
    "prep": (),
    "train_tokenizer": ("prep",),
    "extract_codes": ("prep", "train_tokenizer"),
    "train_generator": ("extract_codes",),
    "evaluate": ("prep", "train_tokenizer", "train_generator"),
}

# Config sections that change a stage's output. Loader worker counts, logging cadence and the
# cluster address do not; they are left out so that moving a run to a cluster does not redo it.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "prep": (
        "data.source",
        "data.root",
        "data.val_labels_csv",
        "data.splits",
        "data.samples_per_shard",
        "data.resize",
        "data.jpeg_quality",
        "data.max_images_per_split",
        "data.synthetic",
    ),
    "train_tokenizer": (
        "seed",
        "tokenizer",
        "tokenizer_train.steps",
        "tokenizer_train.global_batch_size",
        "tokenizer_train.optim",
        "tokenizer_train.loss",
        "tokenizer_train.ema_decay",
        "tokenizer_train.ema_warmup",
        "tokenizer_train.precision",
        "tokenizer_train.seed",
        "tokenizer_train.disc_lr",
        "data.image_size",
        "data.crop_scale_min",
        "data.hflip",
        "data.shuffle_buffer",  # the sample order the tokenizer trains on
    ),
    "extract_codes": (
        "extract.augment",
        "extract.code_dtype",
        "extract.splits",
        "extract.use_ema",
        "data.image_size",
    ),
    "train_generator": (
        "seed",
        "generator",
        "generator_train.steps",
        "generator_train.global_batch_size",
        "generator_train.optim",
        "generator_train.ema_decay",
        "generator_train.ema_warmup",
        "generator_train.precision",
        "generator_train.seed",
    ),
    "evaluate": ("eval", "sampling"),
}

# Every other config key, and why it leaves every stage's output as it is. Each key of the schema
# is in exactly one of CONFIG_KEYS and this table (tests/test_pipeline_graph.py), so a new key must
# be placed: one left out of both would let a changed value reuse stale outputs.
OUTPUT_NEUTRAL_KEYS: dict[str, str] = {
    "preset": "names the preset; its values are the other keys",
    "work_dir": "where outputs go",
    "stages": "which stages run",
    "data.shards_url": "where prep's shards go",
    "data.prep_tasks": "parallelism",
    "data.loader_workers": "parallelism",
    "tokenizer_train.micro_batch_size": "gradient accumulation: the same global batch",
    "tokenizer_train.zero_stage": "how optimizer state is partitioned",
    "tokenizer_train.compile": "the same functions, compiled",
    "tokenizer_train.log_every": "logging",
    "tokenizer_train.image_log_every": "logging",
    "tokenizer_train.checkpoint_every": "fault tolerance",
    "tokenizer_train.keep_checkpoints": "fault tolerance",
    "tokenizer_train.max_failures": "fault tolerance",
    "tokenizer_train.resume": "continues this stage's training from a checkpoint",
    "tokenizer_train.stop_after": "a deliberate partial run (its manifest stays incomplete)",
    "generator_train.micro_batch_size": "gradient accumulation: the same global batch",
    "generator_train.zero_stage": "how optimizer state is partitioned",
    "generator_train.log_every": "logging",
    "generator_train.image_log_every": "logging",
    "generator_train.checkpoint_every": "fault tolerance",
    "generator_train.keep_checkpoints": "fault tolerance",
    "generator_train.max_failures": "fault tolerance",
    "generator_train.resume": "continues this stage's training from a checkpoint",
    "generator_train.stop_after": "a deliberate partial run (its manifest stays incomplete)",
    "extract.batch_size": "parallelism",
    "extract.num_actors": "parallelism",
    "tracking": "where runs are logged",
    "cluster": "where and on how many workers stages run",
}


# Raised when a stage's code changes its outputs under the same config: the fingerprint of that
# stage and of every stage after it moves, so no output of the old code is reused.
# extract_codes 2: the release's crops (ADM centre crop, int(1.1 x size), TenCrop order).
METHOD_VERSION = {"extract_codes": 2}


def stage_fingerprint(cfg: RestokConfig, stage: str) -> str:
    if stage not in CONFIG_KEYS:
        raise KeyError(f"unknown stage {stage!r}; valid: {list(STAGE_ORDER)}")
    inputs = {up: stage_fingerprint(cfg, up) for up in UPSTREAM[stage]}
    if stage in METHOD_VERSION:
        inputs["method"] = str(METHOD_VERSION[stage])
    return fingerprint(config_subtree(cfg, list(CONFIG_KEYS[stage])), inputs)


def discarded_line(
    stage: str, discarded: Mapping[str, int], total: int, unit: str, reasons: Mapping[str, str]
) -> str:
    """The one line a stage prints when its resume drops partial outputs of another producer:
    how many of `total` `unit`, counted by reason (the first identity field that differed)."""
    counts = ", ".join(f"{n} {reasons.get(r, r)}" for r, n in discarded.items())
    return f"{stage}: discarded {sum(discarded.values())} of {total} {unit}: {counts}"
