"""Consolidated exports of the training stages and the one loader every later stage uses.

A training stage directory holds `<name>.safetensors` (raw fp32 weights), `<name>_ema.safetensors`
(EMA weights, fp32) and `config.yaml` (the resolved config that produced them), all written
atomically. No pickle: safetensors only. `load_tokenizer` / `load_generator` are what extraction,
sampling and evaluation call.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import torch

from pipeline import storage

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


def _read_ema(checkpoint_dir: str, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from jobs.deepspeed_runtime import consolidate_shards

    files = sorted(glob.glob(os.path.join(checkpoint_dir, "ema_rank*.safetensors")),
                   key=lambda p: int(os.path.basename(p)[len("ema_rank"):-len(".safetensors")]))
    if not files:
        return {}
    if meta.get("ema_sharded"):
        return consolidate_shards([load_file(f) for f in files], meta["ema_shapes"])
    return load_file(files[0])


def export_weights(checkpoint_dir: str, engine_name: str, model: torch.nn.Module) -> tuple[dict, dict]:
    """(raw, ema) full fp32 state dicts for `model` from a Ray Train checkpoint directory, checked
    by loading both into `model` strictly. EMA covers trainable parameters; buffers and frozen
    tensors come from the raw weights."""
    from jobs.ray_training import STATE_TAG, checkpoint_meta

    meta = checkpoint_meta(checkpoint_dir)
    raw = _read_fp32_state(os.path.join(checkpoint_dir, engine_name), int(meta["zero_stage"]), STATE_TAG)
    expected = model.state_dict()
    raw = {k: v for k, v in raw.items() if k in expected}
    ema = {**raw, **{k: v for k, v in _read_ema(checkpoint_dir, meta).items() if k in expected}}
    for state in (raw, ema):
        model.load_state_dict(state, strict=True)
    return raw, ema


def write_export(stage_dir: str, name: str, raw: dict, ema: dict, cfg: Any) -> dict[str, str]:
    """Atomically write `<name>.safetensors`, `<name>_ema.safetensors`, `config.yaml`; returns the
    file names (relative to the stage dir) and their sha256."""
    from safetensors.torch import save

    from configs.loading import to_yaml

    out = {}
    for fname, state in ((f"{name}.safetensors", raw), (f"{name}_ema.safetensors", ema)):
        data = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
        storage.write_bytes_atomic(storage.join(stage_dir, fname), data)
        out[fname] = storage.sha256_bytes(data)
    storage.write_bytes_atomic(storage.join(stage_dir, CONFIG_NAME), to_yaml(cfg).encode())
    return out


def _resolve(stage_dir_or_file: str, name: str, ema: bool) -> tuple[str, str]:
    """(weights file, config.yaml) for a stage dir or a weights file beside its config.yaml."""
    if stage_dir_or_file.endswith(".safetensors"):
        weights = stage_dir_or_file
        stage_dir = weights.rsplit("/", 1)[0] if "/" in weights else "."
    else:
        stage_dir = stage_dir_or_file
        weights = storage.join(stage_dir, f"{name}_ema.safetensors" if ema else f"{name}.safetensors")
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
    from configs.loading import from_yaml_text

    fs, path = storage.filesystem(url)
    with fs.open(path, "r") as fh:
        return from_yaml_text(fh.read())


def load_tokenizer(stage_dir_or_file: str, ema: bool = True, device: str | torch.device = "cpu"):
    """The trained ResTok in eval mode (EMA weights by default) from a train_tokenizer export."""
    from models.tokenizer import ResTok

    weights, config = _resolve(stage_dir_or_file, "tokenizer", ema)
    cfg = _load_config(config)
    model = ResTok(tokenizer_config(cfg))
    model.load_state_dict(_load_weights(weights), strict=True)
    return model.to(device).eval()


def load_generator(stage_dir_or_file: str, ema: bool = True, device: str | torch.device = "cpu"):
    """The trained GPT in eval mode (EMA weights by default) from a train_generator export."""
    from models.generator import GPT

    weights, config = _resolve(stage_dir_or_file, "generator", ema)
    cfg = _load_config(config)
    model = GPT(generator_config(cfg))
    model.load_state_dict(_load_weights(weights), strict=True)
    return model.to(device).eval()


def _plain(cls: type, node: Any) -> Any:
    """A model dataclass from an OmegaConf node (plain lists, no containers)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(vars(node))
    return cls(**values)


def generator_config(cfg: Any):
    from models.generator import GeneratorConfig

    return _plain(GeneratorConfig, cfg.generator)


def tokenizer_config(cfg: Any):
    from models.tokenizer import TokenizerConfig

    return _plain(TokenizerConfig, cfg.tokenizer)


def register_model(tracking_uri: str, run_id: str, files: list[str], model_name: str,
                   aliases: list[str]) -> str:
    """Log `files` as run artifacts under checkpoints/ and register that artifact URI as a new
    version of `model_name` with `aliases` (MLflow registry; no deprecated stages). Returns the
    version."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import client_for

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


def finish_training_stage(cfg: Any, stage: str, stage_dir: str, fp: str, run_id: str, result: Any,
                          build_model: Any, engine_name: str, export_name: str,
                          total_steps: int, fields: Any) -> dict:
    """Shared end of both training stages: an unfinished run (stop_after) gets an incomplete
    manifest; a finished one is exported (raw + EMA safetensors, config), registered in MLflow
    and recorded in a complete manifest with `fields(model)` added. `build_model()` is called
    only when there is something to export."""
    import os

    import ray.train

    from jobs.ray_training import final_checkpoint
    from pipeline.manifest import write_manifest
    from pipeline.paths import tracking_uri

    # The newest complete checkpoint on storage (our marker), not Ray's latest registered one.
    checkpoint_url, steps_done, reported = final_checkpoint(cfg, stage)
    if steps_done < total_steps:
        return write_manifest(stage_dir, stage, fp, complete=False, steps_done=steps_done,
                              checkpoint=checkpoint_url)
    model = build_model()
    with ray.train.Checkpoint(checkpoint_url).as_directory() as directory:
        raw, ema = export_weights(directory, engine_name, model)
    hashes = write_export(stage_dir, export_name, raw, ema, cfg)
    version = None
    if cfg.tracking.register_models and "://" not in stage_dir:
        files = [os.path.join(stage_dir, name) for name in [*hashes, CONFIG_NAME]]
        version = register_model(tracking_uri(cfg), run_id, files, f"restok-{export_name}",
                                 ["last-trained", str(cfg.preset)])
    return write_manifest(
        stage_dir, stage, fp, complete=True, steps_done=steps_done,
        weights=f"{export_name}.safetensors", weights_ema=f"{export_name}_ema.safetensors",
        config=CONFIG_NAME, sha256=hashes, num_params=sum(p.numel() for p in model.parameters()),
        **fields(model),
        final_metrics={k: float(v) for k, v in (result.metrics or reported).items()
                       if isinstance(v, (int, float))},
        ray_checkpoint=checkpoint_url, mlflow_run_id=run_id, registered_version=version)
