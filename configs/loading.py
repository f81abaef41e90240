"""Load presets and overrides into a validated `RestokConfig`.

A preset is `configs/presets/<name>.yaml` (or a path to any YAML file). A preset may name a
`base:` preset that it extends. Overrides are OmegaConf dotlist `key=value` strings.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from configs.schema import RestokConfig

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "default"


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    return path


def _valid_keys(node: Any) -> list[str]:
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _schema_node_at(dotted: str) -> Any:
    """The schema dataclass instance at the parent of `dotted` (for listing valid keys)."""
    node: Any = RestokConfig()
    for part in dotted.split(".")[:-1]:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = _schema_node_at(key) if key else None
        valid = _valid_keys(parent)
        where = key.rsplit(".", 1)[0] if "." in key else "top level"
        return ConfigError(
            f"{source}: unknown config key {key!r}; valid keys at {where}: {', '.join(valid)}"
        )
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: invalid value for {key!r}: {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]}")


def _load_yaml_chain(name: str, seen: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    if name in seen:
        raise ConfigError(f"preset {name!r}: circular base chain {' -> '.join(seen + (name,))}")
    path = _preset_path(name)
    raw = OmegaConf.load(path)
    base = raw.pop("base", None)
    chain = _load_yaml_chain(str(base), seen + (name,)) if base else []
    return chain + [(str(path), raw)]


def load_config(preset: str | None = None, overrides: Iterable[str] = ()) -> RestokConfig:
    """Resolve preset + overrides into a validated RestokConfig (as an OmegaConf-typed object)."""
    preset = preset or DEFAULT_PRESET
    cfg = OmegaConf.structured(RestokConfig)
    for source, layer in _load_yaml_chain(preset):
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, source) from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "override") from None
    cfg.preset = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _explain(exc, preset) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


_CHOICES = {
    "data.source": ("synthetic", "imagenet_folder", "imagenet_tar"),
    "tokenizer_train.precision": ("bf16", "fp32"),
    "generator_train.precision": ("bf16", "fp32"),
    "tokenizer_train.zero_stage": (0, 1, 2, 3),
    "generator_train.zero_stage": (0, 1, 2, 3),
    "extract.augment": ("none", "flip", "tencrop"),
    "extract.code_dtype": ("int16", "int32"),
    "sampling.cfg_schedule": ("constant", "step", "linear"),
    "eval.feature_net": ("inception", "probe"),
    "eval.inception_resize": ("tf1", "pytorch_fid"),
    "tokenizer.merge_op": ("nearest", "avg"),
    "tokenizer.vf_align": ("none", "encoder", "decoder", "both"),
    "tokenizer.merge_layout": ("width", "alternate"),
    "tokenizer.latent_init": ("pool", "learned"),
    "tokenizer_train.loss.lpips_backbone": ("pretrained", "random-untrained"),
    "tokenizer_train.loss.vf_teacher_backbone": ("pretrained", "random-untrained"),
    "tokenizer_train.loss.disc_backbone": ("pretrained", "random-untrained"),
    "tokenizer_train.loss.vf_margin_convention": ("release", "paper"),
}


def validate(cfg: Any) -> None:
    """Semantic checks beyond types: enumerated choices and batch arithmetic."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
    unknown = [s for s in cfg.stages if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; valid: {list(STAGE_NAMES)}")
    for name in ("tokenizer_train", "generator_train"):
        train = cfg[name]
        per_step = train.micro_batch_size * cfg.cluster.num_workers
        if train.global_batch_size % per_step:
            raise ConfigError(
                f"{name}.global_batch_size={train.global_batch_size} must be a multiple of "
                f"micro_batch_size x cluster.num_workers = {per_step}"
            )


STAGE_NAMES = ("prep", "train_tokenizer", "extract_codes", "train_generator", "evaluate")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """Flatten for MLflow params: {'tokenizer.levels': '[1, 1, 2]', ...}."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def from_yaml_text(text: str) -> RestokConfig:
    """Re-create a config from a resolved YAML dump (e.g. a manifest's producing config)."""
    cfg = OmegaConf.merge(OmegaConf.structured(RestokConfig), OmegaConf.create(text))
    return cfg  # type: ignore[return-value]
