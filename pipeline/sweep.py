"""`restok sweep`: reconstruction vs generation over tokenizer checkpoints (paper Fig. 7, Sec. 5.4).

The checkpoints: a train_tokenizer stage directory stands for the checkpoints Ray Train kept for it
(all, or `--steps`), each exported first (jobs.training.checkpoints.export_checkpoint: any ZeRO stage, EMA
weights as the EMA, into <stage dir>/exports/step_<N>); a Ray Train checkpoint directory is
exported alone; an export directory (or its `.safetensors` beside its config.yaml) is used as is.
With no `--checkpoints`, the config's own train_tokenizer stage directory. For each, the sweep
builds a work directory `<work>/sweeps/<id>/ckpt-<i>` that shares the parent's image shards and
MLflow store, seeds it with the checkpoint as its train_tokenizer stage, then runs the chain
extract_codes -> train_generator -> evaluate (recon + gen), every stage an
MLflow child run under one sweep parent run. Chains run as Ray tasks (`eval.sweep_parallel` at once;
on a local 2-core Ray one at a time, since each stage already fans out on Ray itself; on a small
cluster keep it low: the eval pool reserves its actors atomically, extraction's actor pool does
not). The probe and its reference statistics are made once in the parent and shared, so FD-probe
numbers of all checkpoints are in the same feature space.

Outputs (artifacts of the parent run and files in the sweep dir): `recon_vs_gen.png` (one point per
checkpoint: rFID vs gFID with Inception, FD-probe recon vs gen with the probe; never labelled FID
then), `sweep.csv`, `sweep.md`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import OmegaConf

from configs.loading import from_yaml_text, to_yaml
from configs.schema import RestokConfig
from infra import paths, storage, tracking
from infra.manifest import fingerprint, read_manifest, write_manifest
from infra.ray_connect import connect_ray, starts_local_ray
from infra.stages import stage_fingerprint
from jobs import evaluate, extract_codes, train_generator
from jobs.evaluation.features import distance_name, resolved_feature_spec
from jobs.evaluation.pool import close_pool, shared_pool
from jobs.evaluation.reference import reference_for_gen
from jobs.training import checkpoints as ckpts
from pipeline import locks
from pipeline.graph import clear_stage_dir, resume_reason, stale_reason

TOKENIZER_FILES = ("tokenizer.safetensors", "tokenizer_ema.safetensors", "config.yaml")
AXIS_LABELS = {
    "inception": ("rFID (reconstruction)", "gFID (generation)"),
    "probe": ("FD-probe, reconstruction (not FID)", "FD-probe, generation (not FID)"),
}


def checkpoint_dir(path: str) -> str:
    """The export directory of a checkpoint given as a directory or one of its weight files."""
    return path.rsplit("/", 1)[0] if path.endswith(".safetensors") else path.rstrip("/")


def checkpoint_label(path: str, index: int) -> str:
    manifest = read_manifest(checkpoint_dir(path)) or {}
    steps = manifest.get("steps_done")
    if steps is not None and manifest.get("source_checkpoint"):  # an export of a kept checkpoint
        return f"step {steps}"
    name = os.path.basename(checkpoint_dir(path)) or f"ckpt-{index}"
    return f"{name}@{steps}" if steps is not None else name


def resolve_checkpoints(cfg: RestokConfig, entries: Sequence[str], steps: Sequence[int] = ()) -> list[str]:
    """The export directories to sweep. An entry is a train_tokenizer stage directory (its kept Ray
    Train checkpoints, all or `steps`, each exported by jobs.training.checkpoints.export_checkpoint into
    <stage dir>/exports/), a Ray Train checkpoint directory (exported under the sweeps dir), or an
    export directory / weights file. No entry: this config's train_tokenizer stage directory."""

    out: list[str] = []
    for entry in [str(e).rstrip("/") for e in entries] or [paths.stage_dir(cfg, "train_tokenizer")]:
        if entry.endswith(".safetensors") or (read_manifest(entry) or {}).get("source_checkpoint"):
            out.append(entry)  # already an export
            continue
        if ckpts.is_checkpoint_dir(entry):
            dst = storage.join(
                paths.work_url(cfg), "sweeps", ckpts.EXPORTS_DIR, fingerprint({"checkpoint": entry})
            )
            out.append(ckpts.export_checkpoint(entry, None, dst, cfg))
            continue
        try:
            stage, kept, searched = ckpts.kept_checkpoints(entry, cfg)
        except FileNotFoundError:  # nothing names a training run here: an export dir at most
            if not storage.exists(storage.join(entry, "tokenizer_ema.safetensors")):
                raise
            stage, kept, searched = "train_tokenizer", {}, [entry]
        if stage != "train_tokenizer":
            raise FileNotFoundError(f"{entry}: a {stage} directory; the sweep takes tokenizer checkpoints")
        if not kept:
            if steps or not storage.exists(storage.join(entry, "tokenizer_ema.safetensors")):
                raise FileNotFoundError(
                    f"{entry}: no kept train_tokenizer checkpoints (searched {searched}) "
                    "and no tokenizer export"
                )
            out.append(entry)  # an export directory made elsewhere
            continue
        for step in steps or sorted(kept):
            if step not in kept:
                raise FileNotFoundError(
                    f"{entry}: no kept checkpoint for step {step}; available steps: {sorted(kept)}"
                )
            out.append(ckpts.export_checkpoint(entry, step, None, cfg))
    return list(dict.fromkeys(out))


def child_config(cfg: RestokConfig, ckpt: str, index: int, sweep_dir: str, shared: dict) -> Any:
    """The parent config with its own work dir, the parent's shards / tracking store / probe, and
    the checkpoint's tokenizer architecture."""

    fs, path = storage.filesystem(storage.join(checkpoint_dir(ckpt), "config.yaml"))
    with fs.open(path, "r") as fh:
        ckpt_cfg = from_yaml_text(fh.read())
    child = OmegaConf.merge(
        cfg,
        {
            # Its own work dir gives it its own Ray Train folder, also under the parent's
            # cluster.storage_path (infra.paths.ray_storage_path): the children's stage
            # fingerprints are equal, so a shared folder would resume another child's generator.
            "work_dir": storage.join(sweep_dir, f"ckpt-{index}"),
            "tokenizer": OmegaConf.to_container(ckpt_cfg.tokenizer, resolve=True),
            # data.shards_url stays the parent's: the same prep fingerprint names the same shard
            # directory (infra.paths.shards_url), and the seeded prep manifest lists the shards.
            "tracking": {
                "tracking_uri": paths.tracking_uri(cfg),
                "run_name": f"{cfg.tracking.run_name or cfg.preset}/sweep/ckpt-{index}",
            },
            "eval": {
                "probe_cache": shared.get("probe_cache", ""),
                "reference_stats": shared.get("reference_stats", ""),
                "cfg_search_scales": [],
                "cfg_search_start_ratios": [],
            },
        },
    )
    # The generator must match the checkpoint's codes (train_generator.check_against_codes).
    child.generator.vocab_size = int(ckpt_cfg.tokenizer.codebook_size)
    child.generator.levels = list(ckpt_cfg.tokenizer.levels)
    return child


def seed_work_dir(child: Any, ckpt: str, prep_dir: str) -> None:
    """The child's prep stage = the parent's manifest (same shards); its train_tokenizer stage =
    the checkpoint's files, with a manifest under the child's own fingerprint. Rewritten only when
    the checkpoint's weights changed: a rewrite is newer than the child's later stages, which
    run_chain then redoes."""
    child_prep = paths.stage_dir(child, "prep")
    storage.makedirs(child_prep)
    prep = read_manifest(prep_dir)
    storage.write_json_atomic(
        storage.join(child_prep, "manifest.json"), {**prep, "fingerprint": stage_fingerprint(child, "prep")}
    )
    src, dst = checkpoint_dir(ckpt), paths.stage_dir(child, "train_tokenizer")
    source_sha = storage.sha256_url(storage.join(src, "tokenizer_ema.safetensors"))
    seeded = read_manifest(dst) or {}
    if seeded.get("complete") and seeded.get("source_sha256") == source_sha:
        return
    storage.makedirs(dst)
    fs_src, _ = storage.filesystem(src)
    for name in TOKENIZER_FILES:
        url = storage.join(src, name)
        if storage.exists(url):
            with fs_src.open(storage.filesystem(url)[1], "rb") as fh:
                storage.write_bytes_atomic(storage.join(dst, name), fh.read())
    if not storage.exists(storage.join(dst, "tokenizer_ema.safetensors")):
        raise FileNotFoundError(f"{src}: no tokenizer_ema.safetensors (a train_tokenizer export directory?)")
    upstream = read_manifest(src) or {}
    tok = child.tokenizer
    write_manifest(
        dst,
        "train_tokenizer",
        stage_fingerprint(child, "train_tokenizer"),
        complete=True,
        **{
            **{
                k: v
                for k, v in upstream.items()
                if k not in ("fingerprint", "complete", "stage", "version", "written_at")
            },
            "levels": list(tok.levels),
            "codebook_size": int(tok.codebook_size),
            "num_tokens": int(sum(tok.levels)),
            "source_checkpoint": ckpt,
            "source_sha256": source_sha,
        },
    )


def default_stages() -> dict[str, Callable]:

    return {
        "extract_codes": extract_codes.run,
        "train_generator": train_generator.run,
        "evaluate": evaluate.run,
    }


def run_chain(child_yaml: str, parent_run_id: str, stages: dict | None = None) -> dict:
    """extract_codes -> train_generator -> evaluate for one checkpoint (a Ray task, or in-process)."""
    child = from_yaml_text(child_yaml)
    stages = stages or default_stages()
    # The eval pool reserves CPUs; extraction and Ray Train need them (else a 2-core local Ray deadlocks).
    close_pool(force=True)
    # The graph's staleness rule (pipeline.graph.stale_reason): a stage whose input was rebuilt
    # after it (new weights at a checkpoint's path) is cleared and redone, not skipped.
    rebuilt: set[str] = set()
    for name in ("extract_codes", "train_generator", "evaluate"):
        # One driver per stage of a chain's work dir, as under `restok run`: the same sweep
        # started twice would otherwise clear and write one chain's stages from two processes.
        with locks.stage_lock(child, name):
            before = read_manifest(paths.stage_dir(child, name)) or {}
            if before.get("complete") and stale_reason(child, name, rebuilt):
                clear_stage_dir(child, name)
            elif not before.get("complete") and resume_reason(child, name):
                clear_stage_dir(child, name)  # a killed chain's checkpoints of older codes
            manifest = stages[name](child, parent_run_id=parent_run_id)
        if manifest.get("written_at") != before.get("written_at"):
            rebuilt.add(name)
    return {
        "metrics": manifest.get("metrics", {}),
        "run_id": manifest.get("run_id"),
        "work_dir": str(child.work_dir),
    }


def sweep(
    cfg: RestokConfig, checkpoints: Sequence[str] = (), stages: dict | None = None, steps: Sequence[int] = ()
) -> dict:
    """Run the sweep over `checkpoints` (see resolve_checkpoints); returns {rows, parent_run_id,
    sweep_dir, plot, csv, markdown}."""

    prep_dir = paths.stage_dir(cfg, "prep")
    paths.input_manifest(cfg, "prep")
    checkpoints = resolve_checkpoints(cfg, checkpoints, steps)
    sweep_id = fingerprint(
        {"checkpoints": list(checkpoints), "config": OmegaConf.to_container(cfg, resolve=True)}
    )
    sweep_dir = storage.join(paths.work_url(cfg), "sweeps", sweep_id)
    kind = str(cfg.eval.feature_net)
    uri = paths.tracking_uri(cfg)
    with tracking.stage_run(cfg, "sweep") as parent, shared_pool():
        shared: dict = {"reference_stats": str(cfg.eval.reference_stats)}
        if kind == "probe":  # one probe and one probe reference for every checkpoint
            spec, probe = resolved_feature_spec(cfg)
            shared["probe_cache"] = str(cfg.eval.probe_cache) or storage.join(
                paths.stage_dir(cfg, "evaluate"), "probe"
            )
            if not shared["reference_stats"]:
                shared["reference_stats"] = reference_for_gen(cfg, spec, probe)[1]
        children = []
        for i, ckpt in enumerate(checkpoints):
            child = child_config(cfg, ckpt, i, sweep_dir, shared)
            seed_work_dir(child, ckpt, prep_dir)
            children.append(to_yaml(child))
        outcomes = _run_chains(cfg, children, parent, stages)
        rows = []
        weights = str(cfg.eval.inception_weights)
        recon_key, gen_key = (distance_name(kind, "recon", weights), distance_name(kind, "gen", weights))
        for i, (ckpt, out) in enumerate(zip(checkpoints, outcomes, strict=False)):
            m = out["metrics"]
            rows.append(
                {
                    "checkpoint": checkpoint_label(ckpt, i),
                    "path": ckpt,
                    recon_key: m.get(recon_key),
                    gen_key: m.get(gen_key),
                    "step": (read_manifest(checkpoint_dir(ckpt)) or {}).get("steps_done"),
                    **{k: v for k, v in sorted(m.items()) if k not in (recon_key, gen_key)},
                    "evaluate_run_id": out.get("run_id"),
                }
            )
        csv_text, md_text = table_csv(rows), table_markdown(rows)
        fig = recon_vs_gen_figure(rows, recon_key, gen_key, kind)
        storage.makedirs(sweep_dir)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        storage.write_bytes_atomic(storage.join(sweep_dir, "recon_vs_gen.png"), buf.getvalue())
        storage.write_bytes_atomic(storage.join(sweep_dir, "sweep.csv"), csv_text.encode())
        storage.write_bytes_atomic(storage.join(sweep_dir, "sweep.md"), md_text.encode())
        tracking.log_figure(uri, parent, fig, "recon_vs_gen.png")
        client = tracking.client_for(uri)
        client.log_text(parent, csv_text, "sweep.csv")
        client.log_text(parent, md_text, "sweep.md")
        client.set_tag(parent, "restok.sweep_dir", sweep_dir)
        for i, row in enumerate(rows):  # one metric step per checkpoint on the parent
            tracking.log_metrics(
                uri, parent, {k: row[k] for k in (recon_key, gen_key) if row[k] is not None}, step=i
            )
        import matplotlib.pyplot as plt

        plt.close(fig)
    print(md_text, flush=True)
    return {
        "rows": rows,
        "parent_run_id": parent,
        "sweep_dir": sweep_dir,
        "plot": storage.join(sweep_dir, "recon_vs_gen.png"),
        "csv": storage.join(sweep_dir, "sweep.csv"),
        "markdown": storage.join(sweep_dir, "sweep.md"),
    }


def _run_chains(cfg: RestokConfig, children: list[str], parent: str, stages: dict | None) -> list[dict]:
    parallel = int(cfg.eval.sweep_parallel) or (1 if starts_local_ray(cfg) else len(children))
    if parallel <= 1:
        # In-process: each stage still distributes its own work on Ray (actor pools, Ray Train).
        return [run_chain(child, parent, stages) for child in children]
    import ray

    connect_ray(cfg)
    close_pool(force=True)  # the chains' tasks make their own pools: free the driver's CPUs
    # num_cpus=0: the task only orchestrates; its stages ask Ray for their own workers.
    remote = ray.remote(num_cpus=0, max_retries=0)(run_chain)
    pending, results = list(enumerate(children)), {}
    running: dict = {}
    while pending or running:
        while pending and len(running) < parallel:
            i, child = pending.pop(0)
            running[remote.remote(child, parent, stages)] = i
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            results[running.pop(ref)] = ray.get(ref)
    return [results[i] for i in range(len(children))]


def table_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_markdown(rows: list[dict]) -> str:
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("path", "evaluate_run_id")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def recon_vs_gen_figure(rows: list[dict], recon_key: str, gen_key: str, kind: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, ylabel = AXIS_LABELS.get(kind, (recon_key, gen_key))
    fig, ax = plt.subplots(figsize=(5, 4))
    points = [
        (r[recon_key], r[gen_key], r["checkpoint"])
        for r in rows
        if r.get(recon_key) is not None and r.get(gen_key) is not None
    ]
    ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color="tab:blue")
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Reconstruction vs generation per tokenizer checkpoint")
    fig.tight_layout()
    return fig


def run_sweep(cfg: RestokConfig, checkpoints: Sequence[str] = (), steps: Sequence[int] = ()) -> int:
    """CLI entry (`restok sweep [PRESET] [k=v ...] [--checkpoints A B ...] [--steps N ...]`)."""
    result = sweep(cfg, checkpoints, steps=steps)
    print(f"sweep: plot {result['plot']}, table {result['csv']}, parent run {result['parent_run_id']}")
    return 0


__all__ = [
    "recon_vs_gen_figure",
    "resolve_checkpoints",
    "run_chain",
    "run_sweep",
    "sweep",
    "table_csv",
    "table_markdown",
]
