"""The evaluate stage: reconstruction and generation metrics on Ray actor pools (SPEC "Evaluation protocol").

Reconstruction (`evaluate_recon`): the val shards are dealt to `eval.num_actors` actors (shard i ->
actor i % n, each image exactly once; the driver checks the union of keys). Each actor holds the
tokenizer and the feature network, reconstructs (optionally also at kept-token lengths, paper
Fig. 5), clamps and rounds to uint8 (SPEC "rFID") and returns mergeable statistics: features of the
originals and of each reconstruction, PSNR / SSIM / LPIPS sums, the code histogram (usage, entropy
in bits, eps 1e-8) and a few images for the grid.

Generation (`evaluate_gen`): jobs.evaluation.generation writes the class-interleaved sample set (PNG
shards + ADM npz); feature actors turn its shards into activations (pool, spatial; kept in sample
order) and jobs.metrics.adm computes ADM's gFID, sFID (state-dict Inception only), IS, precision and
recall over all rows against the reference (`eval.reference_stats`: ADM's
VIRTUAL_imagenet256_labeled.npz or `restok eval make-ref` output). The reference activations are
computed once by the actor pool and cached (<evaluate dir>/reference-cache/<fingerprint of the
file's sha256 and the feature config>.npz), so every later evaluation and CFG-search point reads
them. rFID and gFID use different references and are not comparable (SPEC note).

Feature networks (`eval.feature_net`): `inception` gives the real metrics (rfid, gfid, sfid,
inception_score, precision, recall); `probe` is the built-in dataset's stand-in (jobs.metrics.probe)
and its numbers are named fd_probe_*, probe_* only, never FID / IS.
"""

from __future__ import annotations

import os
import time
from typing import Any

from configs.schema import RestokConfig
from infra import paths, storage, tracking
from infra.console import say
from infra.manifest import is_complete, read_manifest, write_manifest
from infra.stages import stage_fingerprint
from jobs.evaluation import STAGE
from jobs.evaluation.features import feature_spec, resolved_feature_spec
from jobs.evaluation.gen import cfg_search, evaluate_gen, gen_metrics
from jobs.evaluation.pool import close_pool
from jobs.evaluation.recon import evaluate_recon
from jobs.evaluation.reference import (
    array_activations,
    make_reference,
    reference_for_gen,
)
from jobs.metrics.fid import npz_array_shape
from jobs.metrics.inception import resolve_weights


def run(cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """The evaluate stage: recon and/or gen per cfg.eval (+ CFG search when its lists are set)."""
    stage_dir = paths.stage_dir(cfg, STAGE)
    fp = stage_fingerprint(cfg, STAGE)
    if is_complete(stage_dir, fp):
        print(f"[evaluate] complete with fingerprint {fp}: skipped", flush=True)
        return read_manifest(stage_dir)
    paths.input_manifest(cfg, "prep")
    paths.input_manifest(cfg, "train_tokenizer")
    if cfg.eval.gen:
        paths.input_manifest(cfg, "train_generator")
    storage.makedirs(stage_dir)
    storage.remove_stale_temporaries(stage_dir)
    fields: dict[str, Any] = {}
    try:
        fields = _run_evaluations(cfg, run_id, parent_run_id, stage_dir)
    finally:
        close_pool()
    metrics = {**fields.get("recon", {}).get("metrics", {}), **fields.get("gen", {}).get("metrics", {})}
    return write_manifest(stage_dir, STAGE, fp, complete=True, metrics=metrics, **fields)


def _run_evaluations(
    cfg: RestokConfig, run_id: str | None, parent_run_id: str | None, stage_dir: str
) -> dict:
    fields: dict[str, Any] = {}
    with tracking.stage_run(cfg, STAGE, run_id, parent_run_id) as rid:
        spec, probe = resolved_feature_spec(cfg)
        if probe:
            fields["probe"] = {k: probe[k] for k in ("key", "val_accuracy", "num_train_images") if k in probe}
            fields["probe"]["path"] = (
                os.path.relpath(probe["path"], stage_dir) if "://" not in probe["path"] else probe["path"]
            )
        if cfg.eval.recon:
            fields["recon"] = evaluate_recon(cfg, rid, spec=spec, probe=probe)
        if cfg.eval.gen:
            if list(cfg.eval.cfg_search_scales) or list(cfg.eval.cfg_search_start_ratios):
                fields["cfg_search"] = cfg_search(cfg, rid, spec=spec, probe=probe)
            fields["gen"] = evaluate_gen(cfg, rid, spec=spec, probe=probe)
        fields["run_id"] = rid
    return fields


def score_files(cfg: RestokConfig, ref_url: str, samples_url: str) -> dict:
    """`restok eval score REF.npz SAMPLES.npz`: ADM's evaluator (evaluations/evaluator.py) in our
    environment. Inputs in its format: arr_0 uint8 NHWC images; the reference's mu, sigma, mu_s,
    sigma_s are used when present. Always the Inception network (eval.inception_weights,
    eval.inception_resize). Prints ADM's five lines and logs them to an `evaluate` MLflow run."""

    for url in (ref_url, samples_url):
        if not storage.exists(url):
            raise FileNotFoundError(f"restok eval score: no such file {url}")
    shape = npz_array_shape(samples_url)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{samples_url}: needs arr_0 uint8 images [N, H, W, 3] (ADM's sample batch format), got {shape}"
        )
    spec = {
        **feature_spec(cfg),
        "kind": "inception",
        "weights": resolve_weights(str(cfg.eval.inception_weights)),
    }
    cfg.eval.reference_stats = ref_url
    t0 = time.time()
    ref, _ = reference_for_gen(cfg, spec, {})
    acts = array_activations(cfg, samples_url, shape[0], spec)
    metrics, notes = gen_metrics(cfg, spec, ref, acts, None)

    for label, key in (
        ("Inception Score", "inception_score"),
        ("FID", "gfid"),
        ("sFID", "sfid"),
        ("Precision", "precision"),
        ("Recall", "recall"),
    ):  # ADM's lines, on the terminal
        say(f"{label}: {metrics[key]}" if key in metrics else f"{label}: {notes.get(key, 'not computed')}")
    with tracking.stage_run(cfg, STAGE) as rid:
        uri = paths.tracking_uri(cfg)
        tracking.log_metrics(uri, rid, metrics)
        client = tracking.client_for(uri)
        client.set_tag(rid, "restok.eval_score.reference", ref_url)
        client.set_tag(rid, "restok.eval_score.samples", samples_url)
    return {
        "metrics": metrics,
        "notes": notes,
        "num_samples": shape[0],
        "seconds": round(time.time() - t0, 2),
        "run_id": rid,
    }


def cli(action: str, cfg: RestokConfig, files: list[str] | None = None) -> int:
    """`restok eval recon|gen|all|make-ref|cfg-search`, `restok eval score REF.npz SAMPLES.npz`."""
    actions = ("recon", "gen", "all", "make-ref", "cfg-search", "score")
    if action not in actions:
        raise ValueError(f"unknown eval action {action!r}; valid: {list(actions)}")
    if action == "score":
        if not files or len(files) != 2:
            raise ValueError("usage: restok eval score REF.npz SAMPLES.npz [preset] [key=value ...]")
        try:
            score_files(cfg, *files)
        finally:
            close_pool()
        return 0
    if action == "all":
        run(cfg)
        return 0
    try:
        if action == "make-ref":
            make_reference(cfg)
            return 0
        with tracking.stage_run(cfg, STAGE) as rid:
            {"recon": evaluate_recon, "gen": evaluate_gen, "cfg-search": cfg_search}[action](cfg, rid)
    finally:
        close_pool()
    return 0
