"""Consolidated exports of the training stages and the one loader every later stage uses.

A training stage directory holds `<name>.safetensors` (raw fp32 weights), `<name>_ema.safetensors`
(EMA weights, fp32) and `config.yaml` (the resolved config that produced them), all written
atomically. No pickle: safetensors only. `load_tokenizer` / `load_generator` are what extraction,
sampling and evaluation call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from configs.loading import from_yaml_text, to_yaml
from configs.schema import RestokConfig
from infra import storage
from infra.manifest import read_manifest, remove_manifest, write_manifest
from infra.paths import ray_storage_path
from infra.stages import stage_fingerprint
from infra.tracking import client_for
from jobs.training.ray_training import (
    COMPLETE_NAME,
    STATE_TAG,
    checkpoint_meta,
    read_ema_parts,
)
from models.generator import GPT, GeneratorConfig
from models.tokenizer import ResTok, TokenizerConfig

CONFIG_NAME = "config.yaml"


def _read_fp32_state(engine_dir: str, zero_stage: int, tag: str) -> dict[str, torch.Tensor]:
    """The raw fp32 weights of one DeepSpeed engine checkpoint (ZeRO shards merged)."""
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag=tag)
    else:
        # Stage 0 keeps whole weights in the model-states file (written by DeepSpeed itself).
        path = os.path.join(engine_dir, tag, "mp_rank_00_model_states.pt")
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def export_weights(checkpoint_dir: str, engine_name: str, model: torch.nn.Module) -> tuple[dict, dict]:
    """(raw, ema) full fp32 state dicts for `model` from a Ray Train checkpoint directory, checked
    by loading both into `model` strictly. EMA covers trainable parameters; buffers and frozen
    tensors come from the raw weights."""

    meta = checkpoint_meta(checkpoint_dir)
    raw = _read_fp32_state(os.path.join(checkpoint_dir, engine_name), int(meta["zero_stage"]), STATE_TAG)
    expected = model.state_dict()
    raw = {k: v for k, v in raw.items() if k in expected}
    ema = {**raw, **{k: v for k, v in read_ema_parts(checkpoint_dir, meta).items() if k in expected}}
    for state in (raw, ema):
        model.load_state_dict(state, strict=True)
    return raw, ema


def write_export(stage_dir: str, name: str, raw: dict, ema: dict, cfg: RestokConfig) -> dict[str, str]:
    """Atomically write `<name>.safetensors`, `<name>_ema.safetensors`, `config.yaml`; returns the
    file names (relative to the stage dir) and their sha256."""
    from safetensors.torch import save

    out = {}
    for fname, state in ((f"{name}.safetensors", raw), (f"{name}_ema.safetensors", ema)):
        data = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
        storage.write_bytes_atomic(storage.join(stage_dir, fname), data)
        out[fname] = storage.sha256_bytes(data)
    storage.write_bytes_atomic(storage.join(stage_dir, CONFIG_NAME), to_yaml(cfg).encode())
    return out


def weights_name(name: str, ema: bool) -> str:
    """The export's weights file: <name>_ema.safetensors (EMA) or <name>.safetensors (raw)."""
    return f"{name}_ema.safetensors" if ema else f"{name}.safetensors"


def _resolve(stage_dir_or_file: str, name: str, ema: bool) -> tuple[str, str]:
    """(weights file, config.yaml) for a stage dir or a weights file beside its config.yaml."""
    if stage_dir_or_file.endswith(".safetensors"):
        weights = stage_dir_or_file
        stage_dir = weights.rsplit("/", 1)[0] if "/" in weights else "."
    else:
        stage_dir = stage_dir_or_file
        weights = storage.join(stage_dir, weights_name(name, ema))
    config = storage.join(stage_dir, CONFIG_NAME)
    for url in (weights, config):
        if not storage.exists(url):
            raise FileNotFoundError(f"{url}: missing; run the stage that writes it first")
    return weights, config


def _load_weights(url: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        return load(fh.read())


def _load_config(url: str) -> Any:

    fs, path = storage.filesystem(url)
    with fs.open(path, "r") as fh:
        return from_yaml_text(fh.read())


def load_export(stage: str, stage_dir_or_file: str, ema: bool = True, device: str | torch.device = "cpu"):
    """A training stage's exported model in eval mode (EMA weights by default)."""
    export = EXPORTABLE[stage]
    weights, config = _resolve(stage_dir_or_file, export.name, ema)
    model = export.build_model(_load_config(config))
    model.load_state_dict(_load_weights(weights), strict=True)
    return model.to(device).eval()


def load_tokenizer(stage_dir_or_file: str, ema: bool = True, device: str | torch.device = "cpu") -> ResTok:
    """The trained ResTok from a train_tokenizer export (what extraction and evaluation load)."""
    return load_export("train_tokenizer", stage_dir_or_file, ema, device)


def load_generator(stage_dir_or_file: str, ema: bool = True, device: str | torch.device = "cpu") -> GPT:
    """The trained GPT from a train_generator export (what sampling loads)."""
    return load_export("train_generator", stage_dir_or_file, ema, device)


def _plain(cls: type, node: Any) -> Any:
    """A model dataclass from an OmegaConf node (plain lists, no containers)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(vars(node))
    return cls(**values)


def generator_config(cfg: RestokConfig):

    return _plain(GeneratorConfig, cfg.generator)


def tokenizer_config(cfg: RestokConfig):

    return _plain(TokenizerConfig, cfg.tokenizer)


@dataclass(frozen=True)
class ExportSpec:
    """How a training stage's model is exported: the DeepSpeed engine directory in its checkpoints,
    the export file name, the model to load the weights into, and the manifest fields it adds."""

    engine: str
    name: str
    build_model: Callable[[Any], torch.nn.Module]
    manifest_fields: Callable[[Any, Any], dict[str, Any]]  # (model, cfg) -> fields

    def write_manifest(
        self,
        out: str,
        stage: str,
        fp: str,
        model: torch.nn.Module,
        cfg: Any,
        hashes: dict,
        steps_done: int,
        **extra: Any,
    ) -> dict:
        """The complete manifest of an export written by write_export (training stage or `restok export`)."""
        return write_manifest(
            out,
            stage,
            fp,
            complete=True,
            steps_done=steps_done,
            weights=f"{self.name}.safetensors",
            weights_ema=f"{self.name}_ema.safetensors",
            config=CONFIG_NAME,
            sha256=hashes,
            num_params=sum(p.numel() for p in model.parameters()),
            **self.manifest_fields(model, cfg),
            **extra,
        )


# Training stage -> its export (what jobs.training.stage, `restok export` and sweeps write).
EXPORTABLE: dict[str, ExportSpec] = {
    "train_tokenizer": ExportSpec(
        "tokenizer",
        "tokenizer",
        lambda cfg: ResTok(tokenizer_config(cfg)),
        lambda model, cfg: {
            "num_tokens": int(model.num_tokens),
            "levels": list(model.levels),
            "codebook_size": int(model.codebook_size),
        },
    ),
    "train_generator": ExportSpec(
        "generator",
        "generator",
        lambda cfg: GPT(generator_config(cfg)),
        lambda model, cfg: {"block_size": model.block_size, "vocab_size": int(cfg.generator.vocab_size)},
    ),
}


def register_model(
    tracking_uri: str, run_id: str, files: list[str], model_name: str, aliases: list[str]
) -> str:
    """Log `files` as run artifacts under checkpoints/ and register that artifact URI as a new
    version of `model_name` with `aliases` (MLflow registry; no deprecated stages). Returns the
    version."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    for f in files:
        client.log_artifact(run_id, f, "checkpoints")
    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # already registered
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoints"
    version = client.create_model_version(model_name, source, run_id=run_id).version
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    return str(version)


def register_stage_files(
    uri: str, run_id: str, stage_dir: str, names: list[str], model_name: str, aliases: list[str]
) -> str:
    """register_model for files of a stage dir on any filesystem: a URL stage dir (s3://...) is
    copied to a local temporary directory first (MLflow logs local files)."""
    import shutil
    import tempfile

    if "://" not in stage_dir or stage_dir.startswith("file://"):
        local = stage_dir.removeprefix("file://")
        return register_model(uri, run_id, [os.path.join(local, n) for n in names], model_name, aliases)
    tmp = tempfile.mkdtemp(prefix="restok-register-")
    try:
        files = []
        for name in names:
            fs, path = storage.filesystem(storage.join(stage_dir, name))
            fs.get_file(path, os.path.join(tmp, name))
            files.append(os.path.join(tmp, name))
        return register_model(uri, run_id, files, model_name, aliases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- kept Ray Train checkpoints -> exports (`restok export`, `restok sweep`) -------------------------
EXPORTS_DIR = "exports"


def _fs_glob(pattern: str) -> list[str]:
    """Matches of `pattern`, as URLs of the same filesystem."""
    fs, path = storage.filesystem(pattern)
    matches = sorted(fs.glob(path))
    return matches if "://" not in pattern else [fs.unstrip_protocol(p) for p in matches]


def _read_config_url(url: str) -> Any | None:
    return _load_config(url) if storage.exists(url) else None


def is_checkpoint_dir(url: str) -> bool:
    """A Ray Train checkpoint directory of a training stage (jobs.training.ray_training layout)."""
    return storage.exists(storage.join(url, "meta.json"))


def _checkpoint_complete(url: str, meta: dict) -> bool:
    """Complete by the training loop's own marker (jobs.training.ray_training.COMPLETE_NAME, written last);
    a checkpoint from before the marker existed counts when every rank's state file is there. One
    whose meta has `ema_layout` was written by a loop that writes the marker: without it, it is an
    upload still in flight (its rank files may be there before its engine files)."""

    if storage.exists(storage.join(url, COMPLETE_NAME)):
        return True
    if "ema_layout" in meta:
        return False
    return all(storage.exists(storage.join(url, f"rank{r}.pt")) for r in range(int(meta.get("world", 1))))


def _stage_of(stage_dir: str, manifest: dict) -> str:
    stage = str(manifest.get("stage") or os.path.basename(stage_dir.rstrip("/")))
    if stage not in EXPORTABLE:
        raise FileNotFoundError(
            f"{stage_dir}: not a training stage directory (stage {stage!r}; valid: {sorted(EXPORTABLE)})"
        )
    return stage


def experiment_dirs(stage_dir: str, cfg: RestokConfig | None = None) -> tuple[str, list[str], list[str]]:
    """(stage, Ray Train experiment directories found, patterns looked for) of a training stage dir.

    Ray Train names a stage's run `<stage>-<fingerprint>[-<time>]`
    (jobs.training.ray_training.experiment_name)
    under cluster.storage_path (default <work_dir>/ray, infra.paths.ray_storage_path). The
    fingerprint comes from the stage manifest (else from the stage's config), the storage path from
    the config that trained it (its config.yaml, else `cfg`), and the default beside the stage dir;
    the manifest's own checkpoint path names its directory first."""

    stage_dir = stage_dir.rstrip("/")
    manifest = storage.read_json(storage.join(stage_dir, "manifest.json")) or {}
    stage = _stage_of(stage_dir, manifest)
    dirs: list[str] = []
    patterns: list[str] = []
    for key in ("ray_checkpoint", "checkpoint"):  # written by finish_training_stage
        path = manifest.get(key)
        if path and storage.exists(str(path)):
            dirs.append(str(path).rstrip("/").rsplit("/", 1)[0])
    configs = [c for c in (_read_config_url(storage.join(stage_dir, CONFIG_NAME)), cfg) if c is not None]
    fps = (
        [str(manifest["fingerprint"])]
        if manifest.get("fingerprint")
        else [stage_fingerprint(c, stage) for c in configs]
    )
    roots = [ray_storage_path(c) for c in configs] + [storage.join(stage_dir.rsplit("/", 1)[0], "ray")]
    for root in dict.fromkeys(roots):
        if not fps:  # nothing names the run: only an unambiguous one will do
            patterns.append(storage.join(root, f"{stage}-*"))
            runs = _fs_glob(patterns[-1])
            if len({os.path.basename(r).split("-")[1] for r in runs}) > 1:
                raise FileNotFoundError(
                    f"{stage_dir}: no manifest or config names its Ray Train run among "
                    f"{runs}; pass the preset and overrides that trained it"
                )
            dirs += sorted(runs, reverse=True)
        for fp in dict.fromkeys(fps):
            # The run itself, then `resume: never` runs (<stage>-<fp>-<time>), newest first.
            patterns.append(storage.join(root, f"{stage}-{fp}[-*]"))
            dirs += _fs_glob(storage.join(root, f"{stage}-{fp}"))
            dirs += sorted(_fs_glob(storage.join(root, f"{stage}-{fp}-*")), reverse=True)
    return stage, list(dict.fromkeys(d.rstrip("/") for d in dirs)), patterns


def kept_checkpoints(source: str, cfg: RestokConfig | None = None) -> tuple[str, dict[int, str], list[str]]:
    """(stage, {step: checkpoint URL}, directories searched) of the complete checkpoints Ray Train
    kept for a training stage directory (or of one checkpoint directory given itself)."""
    source = source.rstrip("/")
    if is_checkpoint_dir(source):
        meta = storage.read_json(storage.join(source, "meta.json"))
        return _stage_of(source, {"stage": meta.get("stage")}), {int(meta["step"]): source}, [source]
    stage, dirs, patterns = experiment_dirs(source, cfg)
    found: dict[int, str] = {}
    for d in dirs:
        # Ray Train v2 keeps <experiment>/checkpoint_*; v1 <experiment>/<trial>/checkpoint_*.
        # Newest first (checkpoint_<time>): a step saved twice (a rerun after a kill) is the rerun's.
        metas = _fs_glob(storage.join(d, "*", "meta.json")) + _fs_glob(storage.join(d, "*", "*", "meta.json"))
        for meta_url in sorted(metas, reverse=True):
            ckpt = meta_url.rsplit("/", 1)[0]
            meta = storage.read_json(meta_url) or {}
            if meta.get("stage") == stage and "step" in meta and _checkpoint_complete(ckpt, meta):
                found.setdefault(int(meta["step"]), ckpt)  # the manifest's own run first
    return stage, dict(sorted(found.items())), dirs or patterns


def find_checkpoint(source: str, step: int | None, cfg: RestokConfig | None = None) -> tuple[str, int, str]:
    """(stage, step, checkpoint URL) of a kept checkpoint, the newest when `step` is None; a
    one-line FileNotFoundError naming where it looked and the steps there otherwise."""
    stage, kept, searched = kept_checkpoints(source, cfg)
    if not kept:
        raise FileNotFoundError(f"{source}: no kept Ray Train checkpoints (searched {searched})")
    if step is None:
        step = max(kept)
    if step not in kept:
        raise FileNotFoundError(
            f"{source}: no kept checkpoint for step {step}; available steps: {sorted(kept)}"
        )
    return stage, step, kept[step]


def checkpoint_config(ckpt: str, stage: str, source: str, cfg: RestokConfig | None = None) -> Any:
    """The config that trained a checkpoint: its own config.yaml, else the stage dir's or `cfg` when
    its fingerprint is the one in the experiment name."""

    own = _read_config_url(storage.join(ckpt, CONFIG_NAME))
    if own is not None:
        return own
    experiment = next((part for part in reversed(ckpt.split("/")) if part.startswith(f"{stage}-")), "")
    candidates = [c for c in (_read_config_url(storage.join(source, CONFIG_NAME)), cfg) if c is not None]
    for c in candidates:
        fp = stage_fingerprint(c, stage)
        if experiment == f"{stage}-{fp}" or experiment.startswith(f"{stage}-{fp}-"):
            return c
    raise FileNotFoundError(
        f"{ckpt}: no config.yaml, and no config given whose {stage} fingerprint "
        f"matches {experiment or 'its experiment'}; pass the preset and overrides that trained it"
    )


def default_export_dir(source: str, step: int) -> str:
    """`<stage dir>/exports/step_<N>` (a checkpoint directory given alone needs an explicit out)."""
    if is_checkpoint_dir(source):
        raise FileNotFoundError(f"{source}: a checkpoint directory; give the export directory (--out)")
    return storage.join(source.rstrip("/"), EXPORTS_DIR, f"step_{step:07d}")


def export_checkpoint(
    source: str, step: int | None = None, out: str | None = None, cfg: RestokConfig | None = None
) -> str:
    """Export a kept Ray Train checkpoint of a training stage (any ZeRO stage; EMA weights as the
    EMA) to the export format (<name>.safetensors, <name>_ema.safetensors, config.yaml, manifest
    with the step) that load_tokenizer / load_generator and `restok sweep` read. `source` is a
    training stage directory (with `step`, default the newest) or a checkpoint directory. Returns
    the export directory; an export of the same checkpoint already there is reused."""
    import shutil
    import tempfile

    stage, step, ckpt = find_checkpoint(source, step, cfg)
    out = (out or default_export_dir(source, step)).rstrip("/")
    done = read_manifest(out) or {}
    # A retrain (`restok run --force`) writes a new checkpoint under the same path and step: the
    # completeness marker's time tells them apart.
    made_at = (storage.read_json(storage.join(ckpt, COMPLETE_NAME)) or {}).get("written_at")
    if (
        done.get("complete")
        and done.get("source_checkpoint") == ckpt
        and done.get("steps_done") == step
        and done.get("source_written_at") == made_at
    ):
        return out
    remove_manifest(out)  # the files below are rewritten in place: no manifest of another export
    train_cfg = checkpoint_config(ckpt, stage, source, cfg)
    export = EXPORTABLE[stage]
    engine_name, export_name = export.engine, export.name
    model = export.build_model(train_cfg)
    fs, path = storage.filesystem(ckpt)
    tmp = None
    if "://" in ckpt and not ckpt.startswith("file://"):  # DeepSpeed's consolidation reads local files
        tmp = tempfile.mkdtemp(prefix="restok-export-")
        fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)  # the contents, not the dir
        path = tmp
    try:
        raw, ema = export_weights(path, engine_name, model)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    hashes = write_export(out, export_name, raw, ema, train_cfg)
    export.write_manifest(
        out,
        stage,
        stage_fingerprint(train_cfg, stage),
        model,
        train_cfg,
        hashes,
        step,
        source_checkpoint=ckpt,
        source_written_at=made_at,
    )
    return out
