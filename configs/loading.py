"""Load presets and overrides into a validated `RestokConfig`.

A preset is `configs/presets/<name>.yaml` (or a path to any YAML file). A preset may name a
`base:` preset that it extends. Overrides are OmegaConf dotlist `key=value` strings.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from configs.schema import RestokConfig, SamplerConfig
from models.generator.gpt import GPT
from models.losses.diffaugment import parse_policy
from models.tokenizer.restok import ResTok

# In-place random fills, skipped when a model is built only for its shapes.
_RANDOM_FILLS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("normal_", "uniform_", "bernoulli_", "exponential_", "log_normal_", "random_")
)


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Weight initialisation skipped (torch.nn.init and in-place random fills return their tensor
    unchanged): on the meta device `nn.init.normal_` runs torch._refs, whose first call imports
    torch._dynamo, ~1 s of every command's start for values nobody reads."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" or func in _RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


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
        return ConfigError(f"{source}: unknown config key {key!r}; valid keys at {where}: {', '.join(valid)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        choice = re.match(r"Invalid value (.+), expected one of (\[.*\])$", msg)
        if choice:  # a Literal field: the choices are declared on it (configs.schema, models configs)
            return ConfigError(
                f"{source}: {key}={choice.group(1)} is not valid; choose one of {choice.group(2)}"
            )
        return ConfigError(f"{source}: invalid value for {key!r}: {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]}")


def _load_yaml_chain(name: str, seen: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    if name in seen:
        raise ConfigError(f"preset {name!r}: circular base chain {' -> '.join(seen + (name,))}")
    path = _preset_path(name)
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a preset is a mapping of config keys, not a {type(raw).__name__}")
    base = raw.pop("base", None)
    if base and str(base).endswith((".yaml", ".yml")) and not os.path.isabs(str(base)):
        beside = path.parent / str(base)  # a file's base is found next to the file first
        base = str(beside) if beside.exists() else base
    chain = _load_yaml_chain(str(base), seen + (name,)) if base else []
    return chain + [(str(path), raw)]


def _string_override(item: str) -> str:
    """`key=value` on a string field keeps the value as typed: OmegaConf's dotlist reads it as
    YAML (`run_name=1e-4` would become '0.0001', `experiment=no` 'False', `key=` None, `a #b`
    'a'). Interpolations (`${...}`) and values already quoted are left to OmegaConf."""
    key, eq, value = item.partition("=")
    if not eq or value.startswith("${") or value[:1] in ("'", '"'):
        return item
    parent = _schema_node_at(key)
    name = key.rsplit(".", 1)[-1]
    if dataclasses.is_dataclass(parent):
        for f in dataclasses.fields(parent):
            if f.name == name and f.type in ("str", str):
                return f"{key}='{value.replace(chr(39), chr(39) * 2)}'"
    return item


def load_config(
    preset: str | None = None, overrides: Iterable[str] = (), resolve_relative_paths: bool = True
) -> RestokConfig:
    """Resolve preset + overrides into a validated RestokConfig (as an OmegaConf-typed object).

    Path fields are made absolute against the current directory unless `resolve_relative_paths`
    is off (`restok submit`, whose job resolves them in its own directory on the cluster)."""
    preset = preset or DEFAULT_PRESET
    cfg = OmegaConf.structured(RestokConfig)
    for source, layer in _load_yaml_chain(preset):
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, source) from None
    overrides = [_string_override(item) for item in overrides]
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
    if resolve_relative_paths:
        resolve_paths(cfg)
    return cfg  # type: ignore[return-value]


def path_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Dotted keys of every schema field declared a path (`metadata=PATH` in configs.schema)."""
    node = RestokConfig() if node is None else node
    keys: list[str] = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += path_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            keys.append(prefix + f.name)
    return keys


# Values of path fields that are words, not paths (TrainConfig.resume; eval.inception_weights).
_PATH_WORDS = ("auto", "never", "random-untrained")


def absolute_path(value: str, base: str) -> str:
    """`value` made absolute against `base`; URLs with a scheme and empty values unchanged.

    A sqlite tracking URI's file part is a path too (`sqlite:///rel.db` is relative to the cwd of
    whichever process opens it). A comma may be part of a path or URL: only `resolve_paths` splits,
    and only the keys in COMMA_LIST_KEYS.
    """
    if not value or value in _PATH_WORDS:
        return value
    if value.startswith("sqlite:///"):
        return "sqlite:///" + absolute_path(value[len("sqlite:///") :], base)
    if "://" in value or value.startswith("file:"):
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# Path fields that hold a comma-separated list of paths (configs.schema).
COMMA_LIST_KEYS = ("eval.reference_shards",)


def absolute_paths(key: str, value: str, base: str) -> str:
    """absolute_path of a path field's value; item by item for a COMMA_LIST_KEYS field."""
    if key in COMMA_LIST_KEYS and "," in value:
        return ",".join(absolute_path(v.strip(), base) for v in value.split(","))
    return absolute_path(value, base)


def resolve_paths(cfg: Any, base: str | None = None) -> None:
    """Make every path field absolute against `base` (default: the current directory), once, on
    the driver: Ray Train workers, tasks and actors run in directories of their own (issue 18)."""
    base = base or os.getcwd()
    for key in path_keys():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value:
            resolved = absolute_paths(key, value, base)
            if resolved != value:
                OmegaConf.update(cfg, key, resolved)


def validate(cfg: Any) -> None:
    """Checks beyond types (choices are Literal fields, checked on merge): models build, batch arithmetic."""
    check_models_build(cfg)
    if not str(cfg.work_dir).strip():
        raise ConfigError("work_dir is empty: name a directory or URL (outputs would land in the cwd)")
    address = str(cfg.cluster.address)
    if address.startswith(("http://", "https://")):
        # The dashboard / Jobs API address (port 8265) is what `restok submit --address` takes.
        raise ConfigError(
            f"cluster.address={address} is an HTTP (Jobs API) address: use local, auto, "
            "ray://HEAD:10001 or the GCS address HEAD:6379 (restok submit --address takes the HTTP one)"
        )
    if int(cfg.cluster.num_workers) < 1:
        raise ConfigError(f"cluster.num_workers={cfg.cluster.num_workers} must be at least 1")
    for name in ("tokenizer_train", "generator_train"):
        train = cfg[name]
        for key in ("steps", "global_batch_size", "micro_batch_size", "log_every", "checkpoint_every"):
            if int(train[key]) < 1:
                raise ConfigError(f"{name}.{key}={train[key]} must be at least 1")
        if len(train.optim.betas) != 2:
            raise ConfigError(f"{name}.optim.betas={list(train.optim.betas)} must be two numbers (AdamW's)")
        per_step = train.micro_batch_size * cfg.cluster.num_workers
        if train.global_batch_size % per_step:
            raise ConfigError(
                f"{name}.global_batch_size={train.global_batch_size} must be a multiple of "
                f"micro_batch_size x cluster.num_workers = {per_step}"
            )
        if train.precision == "bf16" and int(train.zero_stage) == 0:
            # DeepSpeed's stage-0 bf16 optimizer keeps its fp32 masters where neither the export
            # (the module's bf16 weights) nor the EMA reads them; ZeRO 1-3 keep them readable.
            raise ConfigError(
                f"{name}.precision=bf16 needs {name}.zero_stage 1-3 (at 0 the exported and EMA "
                "weights would be the bf16 copies, not the fp32 masters)"
            )
    if int(cfg.data.image_size) != int(cfg.tokenizer.image_size):
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} must equal "
            f"tokenizer.image_size={cfg.tokenizer.image_size}"
        )
    if cfg.data.source == "synthetic" and int(cfg.data.synthetic.num_classes) != int(
        cfg.generator.num_classes
    ):
        raise ConfigError(
            f"data.synthetic.num_classes={cfg.data.synthetic.num_classes} must equal "
            f"generator.num_classes={cfg.generator.num_classes}"
        )
    most_codes = int(torch.iinfo(getattr(torch, cfg.extract.code_dtype)).max) + 1
    if int(cfg.tokenizer.codebook_size) > most_codes:
        raise ConfigError(
            f"tokenizer.codebook_size={cfg.tokenizer.codebook_size} does not fit "
            f"extract.code_dtype={cfg.extract.code_dtype} (at most {most_codes}); use int32"
        )
    try:
        parse_policy(str(cfg.tokenizer_train.loss.disc_diffaug))
    except ValueError as exc:
        raise ConfigError(f"tokenizer_train.loss.disc_diffaug: {exc}") from None
    if cfg.tokenizer_train.compile != "off" and int(cfg.tokenizer_train.zero_stage) == 3:
        # ZeRO-3 all-gathers parameters in per-module hooks, inside what would be compiled: untested.
        raise ConfigError(
            f"tokenizer_train.compile={cfg.tokenizer_train.compile} needs zero_stage 0-2 "
            "(tokenizer_train.zero_stage=3 gathers parameters in module hooks; not supported compiled)"
        )


def check_models_build(cfg: Any) -> None:
    """Build both models on the meta device, weights not initialised (no memory, milliseconds): a
    config that cannot be built fails here with one line, not inside Ray Train workers after the
    cluster started."""
    for section, build in (("tokenizer", ResTok), ("generator", GPT)):
        try:
            with torch.device("meta"), _ShapesOnly():
                build(OmegaConf.to_object(cfg[section]))
        except Exception as exc:  # any constructor error is a config error here
            raise ConfigError(
                f"{section}.*: the model cannot be built from this config: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
    if int(cfg.generator.vocab_size) != int(cfg.tokenizer.codebook_size):
        raise ConfigError(
            f"generator.vocab_size={cfg.generator.vocab_size} must equal "
            f"tokenizer.codebook_size={cfg.tokenizer.codebook_size}"
        )
    if list(cfg.generator.levels) != list(cfg.tokenizer.levels):
        raise ConfigError(
            f"generator.levels={list(cfg.generator.levels)} must equal "
            f"tokenizer.levels={list(cfg.tokenizer.levels)}"
        )


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


def split_preset_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[PRESET] [key=value ...]`: the first item is a preset when it has no '='."""
    items = list(items)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def sampler_kwargs(sampling: Any) -> dict[str, Any]:
    """configs.schema.SamplingConfig (a config node) -> models.generator.sample keyword arguments:
    the fields of the model's SamplingConfig, which the schema's extends."""
    return {f.name: getattr(sampling, f.name) for f in dataclasses.fields(SamplerConfig)}
