"""Reconstruction metrics of the val split on the actor pool (SPEC "rFID"): the val shards are dealt
to the actors (shard i -> actor i % n, each image exactly once; the driver checks the union of
keys), which return mergeable statistics; the driver merges and logs them (and the paper's Fig. 5
curve of distance vs kept tokens)."""

from __future__ import annotations

import time

import torch

from configs.schema import RestokConfig
from data_prep.loaders import resolve_shards
from infra import paths, tracking
from infra.image_grid import grid_rows
from jobs.evaluation.features import (
    distance_name,
    inception_suffix,
    resolved_feature_spec,
)
from jobs.evaluation.pool import check_each_once, get_pool, lpips_availability, require_all_read
from jobs.metrics.inception_score import inception_score
from models.losses.codebook_stats import codebook_entropy_bits, codebook_usage


def evaluate_recon(
    cfg: RestokConfig,
    run_id: str | None,
    tokenizer_url: str | None = None,
    spec: dict | None = None,
    probe: dict | None = None,
) -> dict:
    """Reconstruction metrics of the val split; logs them (and a grid, and the Fig. 5 curve) to run_id."""
    tokenizer_url = tokenizer_url or paths.stage_dir(cfg, "train_tokenizer")
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    # prep's manifest (under the work dir, also when data.shards_url puts the shards elsewhere)
    shards, counts = resolve_shards(paths.input_manifest(cfg, "prep"), "val")
    t0 = time.time()
    lpips_status = lpips_availability(str(cfg.eval.lpips_vgg_weights))
    results = get_pool(cfg).map_shards(
        "recon",
        shards,
        tokenizer_url,
        spec,
        int(cfg.data.image_size),
        int(cfg.eval.batch_size),
        list(cfg.eval.keep_lengths),
        str(cfg.eval.lpips_vgg_weights),
        lpips_status,
        int(cfg.eval.grid_images),
    )
    seconds = time.time() - t0
    count = check_each_once([r["keys"] for r in results], "reconstruction evaluation")
    expected = sum(counts)
    # prep dropped corrupt images before writing these shards, so a short read is later damage
    require_all_read(
        count,
        expected,
        shards[0].rsplit("/", 1)[0] if shards else "val shards",
        "val images prep wrote",
        "restore them or redo prep (`restok run --force`)",
    )
    real, recon = results[0]["real"], results[0]["recon"]
    hist = results[0]["codes_hist"].copy()
    sums = dict(results[0]["sums"])
    for r in results[1:]:
        real.merge(r["real"])
        for k in recon:
            recon[k].merge(r["recon"][k])
        hist += r["codes_hist"]
        for k in sums:
            sums[k] += r["sums"][k]
    kind, full = spec["kind"], results[0]["num_tokens"]
    name = distance_name(kind, "recon", spec.get("weights", ""))
    sfx = inception_suffix(kind, spec.get("weights", ""))
    mu, sigma = real.pool.mean_cov()
    metrics = {
        name: recon[full].pool.distance_to(mu, sigma),
        "psnr": sums["psnr"] / count,
        "ssim": sums["ssim"] / count,
        "codebook_usage": codebook_usage(torch.from_numpy(hist)),
        "codebook_entropy_bits": codebook_entropy_bits(torch.from_numpy(hist)),
        "recon_images_per_second": count / max(seconds, 1e-9),
    }
    if lpips_status == "computed":
        # Named for its trunk: LPIPS-VGG (the training loss's network). TiTok's evaluator (the
        # release's evaluator.py) reports LPIPS-AlexNet, a different number on the same images.
        metrics["lpips_vgg"] = sums["lpips"] / count
    curve = {}
    for k in sorted(recon):
        curve[k] = recon[k].pool.distance_to(mu, sigma)
        if k != full:
            metrics[f"{name}_keep{k}"] = curve[k]
    if kind == "inception":
        metrics["recon_inception_score" + sfx] = inception_score(recon[full].probs_array())
    else:
        probs, labels = recon[full].probs_array(), recon[full].labels_array()
        metrics["probe_recon_class_consistency"] = float((probs.argmax(1) == labels).mean())
        metrics["probe_val_accuracy"] = float(probe.get("val_accuracy", float("nan")))
    rows = [results[0]["grid"].get("real", [])] + [
        results[0]["grid"].get(k, []) for k in sorted(recon, reverse=True)
    ]
    report = {
        "metrics": metrics,
        "num_images": count,
        "expected_images": expected,
        "num_actors": len(results),
        "num_shards": len(shards),
        "images_per_actor": [len(r["keys"]) for r in results],
        "lpips": lpips_status,
        "feature_net": kind,
        "curve": {str(k): v for k, v in curve.items()},
        "seconds": round(seconds, 2),
        "probe": {k: probe[k] for k in ("key", "val_accuracy", "path") if k in probe} if probe else None,
    }
    if run_id:
        uri = paths.tracking_uri(cfg)
        tracking.log_metrics(uri, run_id, metrics)
        for k, v in curve.items():  # paper Fig. 5: distance vs kept tokens, one step per length
            tracking.log_metrics(uri, run_id, {f"{name}_by_kept_tokens": v}, step=k)
        tracking.log_image(uri, run_id, grid_rows(rows), "recon_grid.png")
        tracking.log_dict(uri, run_id, report, "recon_eval.json")
        client = tracking.client_for(uri)
        client.set_tag(run_id, "restok.lpips", lpips_status[:5000])
        if len(curve) > 1:
            tracking.log_figure(uri, run_id, _curve_figure(curve, name), "recon_vs_kept_tokens.png")
    print(
        f"[evaluate] recon: {count} images on {len(results)} actors in {seconds:.1f}s: "
        + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        + f"; LPIPS {lpips_status.split(';')[0]}",
        flush=True,
    )
    return report


def _curve_figure(curve: dict, name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ks = sorted(curve)
    ax.plot(ks, [curve[k] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("kept tokens")
    ax.set_ylabel(name)
    fig.tight_layout()
    return fig
