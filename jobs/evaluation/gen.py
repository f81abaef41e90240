"""Generation metrics (ADM's evaluator via jobs.metrics.adm: gFID, sFID, IS, precision, recall)
of a sample set against the reference, and the CFG search over scales and start ratios."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from configs.schema import RestokConfig
from infra import paths, storage, tracking
from infra.image_grid import grid_rows
from infra.image_shards import image_batches
from infra.manifest import fingerprint
from jobs.evaluation import STAGE
from jobs.evaluation.features import (
    distance_name,
    inception_suffix,
    resolved_feature_spec,
)
from jobs.evaluation.generation import generate_samples, samples_url
from jobs.evaluation.pool import get_pool, require_all_read
from jobs.evaluation.reference import reference_for_gen, shard_activations
from jobs.evaluation.sampling import SAMPLING_PROTOCOL, pick_device
from jobs.metrics.adm import adm_frechet_distance, inception_score, mean_cov, scores


def gen_metrics(
    cfg: RestokConfig, spec: dict, ref: dict, acts: dict, probe: dict | None
) -> tuple[dict, dict]:
    """(metrics, notes) from sample activations and the reference via jobs.metrics.adm."""
    kind, notes = spec["kind"], {}
    device = pick_device(bool(cfg.cluster.use_gpu))
    name = distance_name(kind, "gen", spec.get("weights", ""))
    sfx = inception_suffix(kind, spec.get("weights", ""))  # never a random network's number as IS
    weight = get_pool(cfg).call("logits_weight", [(spec,)])[0] if kind == "inception" else None
    if ref["pool"] is None:  # statistics-only file: no precision/recall
        stats = ref["stats"]
        s = {"fid": adm_frechet_distance(*mean_cov(acts["pool"]), stats["mu"], stats["sigma"], acts["pool"])}
        if "spatial" in acts and stats.get("mu_s") is not None:
            s["sfid"] = adm_frechet_distance(
                *mean_cov(acts["spatial"]), stats["mu_s"], stats["sigma_s"], acts["spatial"]
            )
        if weight is not None:
            s["inception_score"] = inception_score(acts["pool"], weight)
        notes["precision_recall"] = "not computed: the reference file has neither feature rows nor images"
    elif kind == "inception":
        s = scores(
            ref["pool"],
            ref["spatial"],
            acts["pool"],
            acts.get("spatial"),
            weight,
            ref_stats=ref["stats"],
            device=device,
        )
    else:
        s = scores(ref["pool"], None, acts["pool"], None, None, ref_stats=ref["stats"], device=device)
        s["probe_precision"], s["probe_recall"] = s.pop("precision"), s.pop("recall")
    metrics = {name: s.pop("fid")}
    if kind == "inception":
        metrics.update({k + sfx: v for k, v in s.items()})
        if "sfid" not in s:
            notes["sfid"] = "not computed: " + (
                "the TorchScript Inception exposes no mixed_6/conv features"
                if "spatial" not in acts
                else "the reference has no mu_s/sigma_s"
            )
    else:
        metrics.update({k: v for k, v in s.items() if k.startswith("probe_")})
        metrics["probe_class_consistency"] = float((acts["probs"].argmax(1) == acts["labels"]).mean())
        metrics["probe_val_accuracy"] = float((probe or {}).get("val_accuracy", float("nan")))
    return metrics, notes


def evaluate_gen(
    cfg: RestokConfig,
    run_id: str | None,
    tokenizer_url: str | None = None,
    generator_url: str | None = None,
    sampling: Any | None = None,
    spec: dict | None = None,
    probe: dict | None = None,
    step: int | None = None,
    log_prefix: str = "",
) -> dict:
    """Sample (jobs.evaluation.generation), then generation metrics against the reference; logged
    to run_id."""
    tokenizer_url = tokenizer_url or paths.stage_dir(cfg, "train_tokenizer")
    generator_url = generator_url or paths.stage_dir(cfg, "train_generator")
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    ref, ref_url = reference_for_gen(cfg, spec, probe or {})
    default_models = generator_url == paths.stage_dir(
        cfg, "train_generator"
    ) and tokenizer_url == paths.stage_dir(cfg, "train_tokenizer")
    out_url = (
        samples_url(cfg, sampling)
        if default_models
        else _samples_url_for(cfg, tokenizer_url, generator_url, sampling)
    )
    samples = generate_samples(cfg, out_url, tokenizer_url, generator_url, sampling)
    shards = [storage.join(out_url, n) for n in samples["shards"]]
    t0 = time.time()
    acts = shard_activations(cfg, shards, spec, "generation evaluation")
    require_all_read(
        acts["count"],
        samples["num_samples"],
        out_url,
        "images of the sample set",
        "delete that directory and rerun to redraw them",
    )
    metrics, notes = gen_metrics(cfg, spec, ref, acts, probe)
    metrics["sample_images_per_second"] = samples["images_per_second"]
    kind = spec["kind"]
    seconds = time.time() - t0
    report = {
        "metrics": metrics,
        "num_samples": acts["count"],
        "num_actors": acts["num_actors"],
        "reference": ref_url,
        "samples": out_url,
        "notes": notes,
        "feature_net": kind,
        "seconds": round(seconds, 2),
    }
    if run_id:
        uri = paths.tracking_uri(cfg)
        tracking.log_metrics(uri, run_id, {f"{log_prefix}{k}": v for k, v in metrics.items()}, step=step)
        if step is None:
            tracking.log_dict(uri, run_id, report, "gen_eval.json")
            tracking.log_image(uri, run_id, _sample_grid(shards, cfg), "sample_grid.png")
            for k, v in notes.items():
                tracking.client_for(uri).set_tag(run_id, f"restok.{k}", v[:5000])
    print(
        f"[evaluate] gen: {acts['count']} samples on {acts['num_actors']} actors: "
        + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        + "".join(f"; {k} {v}" for k, v in notes.items()),
        flush=True,
    )
    return report


def _samples_url_for(cfg: RestokConfig, tokenizer_url: str, generator_url: str, sampling: Any) -> str:
    """Sample sets of explicitly named checkpoints live under a hash of what produced them."""
    from omegaconf import OmegaConf

    sampling = sampling if sampling is not None else cfg.sampling
    key = fingerprint(
        {
            "tokenizer": tokenizer_url,
            "generator": generator_url,
            "sampling": OmegaConf.to_container(sampling) if OmegaConf.is_config(sampling) else sampling,
            "per_class": int(cfg.eval.num_samples_per_class),
            "samples_per_shard": int(cfg.eval.samples_per_shard),
            "protocol": SAMPLING_PROTOCOL,
        }
    )
    return storage.join(paths.stage_dir(cfg, STAGE), "samples", key)


def _sample_grid(shards: list[str], cfg: RestokConfig) -> np.ndarray:
    n = int(cfg.eval.grid_images)
    rows: list[list[np.ndarray]] = [[]]
    for _, images, _ in image_batches(shards[:1], int(cfg.data.image_size), n * n):
        imgs = list(images.numpy())
        rows = [imgs[i : i + n] for i in range(0, len(imgs), n)]
        break
    return grid_rows(rows)


def cfg_search(
    cfg: RestokConfig,
    run_id: str | None,
    tokenizer_url: str | None = None,
    generator_url: str | None = None,
    spec: dict | None = None,
    probe: dict | None = None,
) -> dict:
    """Sweep eval.cfg_search_scales x eval.cfg_search_start_ratios (paper App. A.3: the best CFG
    schedule per checkpoint); each point is a child run and a metric step of `run_id`; keeps the best."""
    from omegaconf import OmegaConf

    scales = list(cfg.eval.cfg_search_scales) or [float(cfg.sampling.cfg_scale)]
    ratios = list(cfg.eval.cfg_search_start_ratios) or [float(cfg.sampling.start_ratio)]
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    name = distance_name(spec["kind"], "gen", spec.get("weights", ""))
    points = []
    for i, (scale, ratio) in enumerate((s, r) for s in scales for r in ratios):
        sampling = OmegaConf.merge(cfg.sampling, {"cfg_scale": float(scale), "start_ratio": float(ratio)})
        child = (
            tracking.start_run(
                cfg,
                STAGE,
                parent_run_id=run_id,
                extra_tags={"restok.cfg_search": "point", "mlflow.runName": f"cfg s={scale} start={ratio}"},
            )
            if run_id
            else None
        )
        try:
            report = evaluate_gen(cfg, child, tokenizer_url, generator_url, sampling, spec, probe)
        except BaseException:
            if child:
                tracking.end_run(cfg, child, "FAILED")
            raise
        if child:
            tracking.end_run(cfg, child)
            tracking.log_metrics(
                paths.tracking_uri(cfg),
                run_id,
                {
                    "cfg_search_scale": scale,
                    "cfg_search_start_ratio": ratio,
                    f"cfg_search_{name}": report["metrics"][name],
                },
                step=i,
            )
        points.append(
            {
                "cfg_scale": float(scale),
                "cfg_start_ratio": float(ratio),
                **report["metrics"],
                "child_run_id": child,
            }
        )
    best = min(points, key=lambda p: p[name])
    if run_id:
        tracking.log_metrics(
            paths.tracking_uri(cfg),
            run_id,
            {
                f"best_{name}": best[name],
                "best_cfg_scale": best["cfg_scale"],
                "best_cfg_start_ratio": best["cfg_start_ratio"],
            },
        )
        tracking.log_dict(
            paths.tracking_uri(cfg), run_id, {"points": points, "best": best}, "cfg_search.json"
        )
    print(
        f"[evaluate] cfg search: best {name}={best[name]:.4g} at scale {best['cfg_scale']}, "
        f"start {best['cfg_start_ratio']} ({len(points)} points)",
        flush=True,
    )
    return {"points": points, "best": best, "metric": name}
