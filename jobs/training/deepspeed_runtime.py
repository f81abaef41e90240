"""DeepSpeed machinery shared by the training stages: config, optimizer groups, schedule, EMA, RNG.

This is the one place distribution is applied to a model (DEVELOPERS.md "Rules"); models/ never
imports DeepSpeed. The same code runs on CPU (gloo, 2 workers in tests) and GPU (nccl).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Iterable
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn


def prepare_deepspeed(use_gpu: bool) -> None:
    """Before building an engine: on CPU skip the shm comm op (it compiles C++ for a minute,
    DEVELOPERS.md "Known traps") and reuse the process group Ray Train initialised."""
    deepspeed = import_deepspeed_without_mlflow()
    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import_deepspeed_muon_uncompiled()
    import torch.distributed as dist

    if dist.is_initialized():
        # Ray Train already created the group (gloo on CPU, nccl on GPU); DeepSpeed wraps it.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    else:  # single process (e.g. a unit test without Ray)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)


def grad_accumulation(global_batch: int, micro_batch: int, world: int) -> int:
    """global = micro x workers x accumulation (configs.loading.validate checks divisibility)."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ValueError(
            f"global_batch_size={global_batch} is not a multiple of micro_batch_size x workers = {per_step}"
        )
    return global_batch // per_step


def deepspeed_config(train: Any, world: int, zero_stage: int | None = None) -> dict:
    """The DeepSpeed JSON config for a TrainConfig section (client optimizer + client schedule)."""
    stage = int(train.zero_stage if zero_stage is None else zero_stage)
    config: dict = {
        "train_micro_batch_size_per_gpu": int(train.micro_batch_size),
        "gradient_accumulation_steps": grad_accumulation(
            int(train.global_batch_size), int(train.micro_batch_size), world
        ),
        "gradient_clipping": float(train.optim.grad_clip),
        "zero_optimization": {"stage": stage},
        # The client optimizer is torch AdamW (no fused/cpu_adam build on CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        # Gather small params eagerly: the tiny presets would otherwise thrash the prefetcher.
        config["zero_optimization"].update(
            {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False}
        )
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision != "fp32":
        raise ValueError(f"precision={train.precision!r}: choose bf16 or fp32 (no fp16 on CPU)")
    return config


def no_decay(name: str, param: nn.Parameter) -> bool:
    """SPEC "recipe": no weight decay on norms, biases and embeddings (any <=1-D tensor, any
    embedding table, learned tokens and positional/level embeddings)."""
    lname = name.lower()
    return (
        param.ndim <= 1 or "embed" in lname or "token" in lname or "norm" in lname or lname.endswith(".bias")
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float) -> float:
    """Linear warm-up to `base`, then cosine to `floor` at `total` (SPEC "recipe": 5k warm-up,
    floor 1e-5)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, optim: Any, lr: float | None = None) -> torch.optim.Optimizer:
    lr = float(optim.lr if lr is None else lr)
    return torch.optim.AdamW(
        param_groups(model, float(optim.weight_decay)),
        lr=lr,
        betas=tuple(float(b) for b in optim.betas),
        eps=1e-8,
    )


def make_schedule(
    optimizer: torch.optim.Optimizer, optim: Any, total_steps: int, base_lr: float | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    base = float(optim.lr if base_lr is None else base_lr)
    floor = float(optim.min_lr) * base / float(optim.lr)  # the floor scales with a different base lr

    def factor(step: int) -> float:
        return cosine_lr(step, total_steps, base, int(optim.warmup_steps), floor) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def import_deepspeed_without_mlflow():
    """DeepSpeed, imported without importing MLflow: its autotuner (unused here) imports MLflow at
    module level when it can (~1 CPU-s), and only rank 0 logs to MLflow (ray_training.WorkerSession),
    importing it itself. A process that has MLflow already keeps it."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError meanwhile: has_mlflow = False
    try:
        import deepspeed
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def import_deepspeed_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with its kernels left eager. ZeRO imports it whatever the
    optimizer (the engine's optimizer check, ZeRO-2's gradient averaging), and its kernels are
    wrapped in torch.compile at import, which imports Inductor: ~1.2 CPU-seconds in every worker of
    every training stage. Our optimizer is torch AdamW, so the kernels never run (eagerly if ever)."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    with mock.patch.object(compiler, "compile", lambda: lambda fn: fn):
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401


def build_engine(
    model: nn.Module,
    train: Any,
    world: int,
    total_steps: int,
    *,
    lr: float | None = None,
    zero_stage: int | None = None,
):
    """A DeepSpeed engine with AdamW param groups and the cosine schedule (stepped by DeepSpeed at
    each accumulation boundary)."""
    import deepspeed

    optimizer = make_optimizer(model, train.optim, lr)
    schedule = make_schedule(optimizer, train.optim, total_steps, lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(train, world, zero_stage),
    )
    return engine


# ---- parameters under ZeRO-3 ---------------------------------------------------------------------
def is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def local_tensor(p: nn.Parameter) -> torch.Tensor:
    """What this rank holds of `p`: its ZeRO-3 flat shard, or the whole tensor."""
    return p.ds_tensor if is_partitioned(p) else p.data


def master_fragment(p: nn.Parameter) -> torch.Tensor | None:
    """The fp32 master weights this rank's ZeRO 1-2 (or bf16) optimizer holds of `p`: a flat range
    of the flattened parameter (None when the range is another rank's). Looked up at each call:
    DeepSpeed relinks the mappings when it loads a checkpoint."""
    mapping = getattr(p, "_hp_mapping", None)
    return None if mapping is None else mapping.get_hp_fragment()


class EMA:
    """Exponential moving average of the fp32 weights (SPEC "recipe": EMA 0.9999), kept where the
    weights live, so nothing is gathered per step. Three layouts (`layout`):

    - "zero3": every rank averages the fp32 master of its own flat shard (rank r holds elements
      [r*s, (r+1)*s) of the flattened, padded parameter); `consolidate_shards` rebuilds them.
    - "fragments" (ZeRO 1-2, and DeepSpeed's bf16 optimizer): every rank averages the ranges of the
      flattened parameters its optimizer holds as fp32 masters (`master_fragment`); under bf16 the
      module's own weights are bf16 copies, which an average of would carry their rounding.
      `consolidate_fragments` rebuilds them from each file's `ema_fragments` metadata.
    - "whole" (ZeRO-0 in fp32): the parameters are the fp32 weights, whole on every rank; rank 0
      keeps the average.
    """

    def __init__(self, model: nn.Module, decay: float, rank: int, warmup: bool = False):
        self.decay, self.warmup = float(decay), bool(warmup)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if any(is_partitioned(p) for _, p in trainable):
            self.layout = "zero3"
        elif any(hasattr(p, "_hp_mapping") for _, p in trainable):
            self.layout = "fragments"
        else:
            self.layout = "whole"
        self.active = self.layout != "whole" or rank == 0  # every rank holds a part, or rank 0 all
        if self.layout == "fragments":
            self.params = [(n, p) for n, p in trainable if master_fragment(p) is not None]
            # where each kept range starts in the flattened parameter
            self.starts = {n: int(p._hp_mapping.lp_fragment_address.start) for n, p in self.params}
        else:
            self.params = trainable if self.active else []
            self.starts = {}
        self.shadow = {n: self._current(p).detach().float().clone() for n, p in self.params}
        # Full shapes, so the parts can be put back together (rank 0 writes them).
        self.shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in trainable}

    def _current(self, p: nn.Parameter) -> torch.Tensor:
        if self.layout == "fragments":
            return master_fragment(p)
        if self.layout == "zero3" and hasattr(p, "_z3_optimizer"):
            # the fp32 master of this rank's shard (ds_tensor is its bf16 copy under bf16)
            return p._z3_optimizer.get_local_fp32_param(p)
        return local_tensor(p)

    def decay_at(self, step: int | None) -> float:
        """Decay of the update after optimizer step `step` (0-based). With warm-up (release
        ema_model.py, diffusers' EMAModel without use_ema_warmup): 0 at step 0 (a copy), then
        min(decay, (1 + t) / (10 + t)); without it the constant decay."""
        if not self.warmup or step is None:
            return self.decay
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        weight = 1.0 - self.decay_at(step)
        for n, p in self.params:
            self.shadow[n].lerp_(self._current(p).detach().float(), weight)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.contiguous() for n, t in self.shadow.items()}

    def file_metadata(self) -> dict[str, str] | None:
        """What a saved part needs to be put back (safetensors metadata, strings only)."""
        return {"ema_fragments": json.dumps(self.starts)} if self.layout == "fragments" else None

    def part_of(self, full: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
        """This rank's part of full tensors (a resume on another world size)."""
        if self.layout == "fragments":
            return {
                n: full[n].reshape(-1)[self.starts[n] : self.starts[n] + t.numel()]
                for n, t in self.shadow.items()
            }
        if self.layout == "zero3":
            return {n: reshard(full[n], t, rank, world) for n, t in self.shadow.items()}
        return {n: full[n] for n in self.shadow}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA checkpoint lacks {sorted(missing)[:5]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


def reshard(full: torch.Tensor, like: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's ZeRO-3 flat shard of `full` (elements [r*s, (r+1)*s) of it flattened and
    zero-padded to world*s, s = like.numel(); see EMA)."""
    size = like.numel()
    flat = torch.zeros(size * world, dtype=like.dtype)
    flat[: full.numel()] = full.reshape(-1).to(like.dtype)
    return flat[rank * size : (rank + 1) * size].reshape(like.shape).clone()


def consolidate_shards(shards: list[dict[str, torch.Tensor]], shapes: dict[str, list[int]]) -> dict:
    """Full tensors from ZeRO-3 flat shards in rank order (see EMA)."""
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([s[name].reshape(-1) for s in shards])
        out[name] = flat[: math.prod(shape)].reshape(shape).clone()
    return out


def consolidate_fragments(parts: list[tuple[dict[str, torch.Tensor], dict[str, int]]], shapes: dict) -> dict:
    """Full tensors from ZeRO 1-2 fragments: (tensors, start of each in its flattened parameter)
    per rank (see EMA). Every element must come from exactly one fragment."""
    out = {}
    for name, shape in shapes.items():
        flat = torch.zeros(math.prod(shape))
        filled = 0
        for tensors, starts in parts:
            if name in tensors:
                t = tensors[name].reshape(-1)
                flat[starts[name] : starts[name] + t.numel()] = t
                filled += t.numel()
        if filled != flat.numel():
            raise ValueError(f"EMA fragments of {name!r} cover {filled} of {flat.numel()} elements")
        out[name] = flat.reshape(shape)
    return out


# ---- RNG state (part of every checkpoint, so resume is exact) ------------------------------------
def rng_state() -> dict:
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", np.asarray(state["numpy"], dtype=np.uint32), int(state["numpy_pos"]), 0, 0.0)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fresh_rng_state(seed: int, rank: int, step: int) -> dict:
    """An RNG state (rng_state's form) of streams seeded from (seed, rank, step), each triple its
    own; the process's current streams are left as they were."""
    current = rng_state()
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little") >> 1)  # torch takes < 2**63
    fresh = rng_state()
    set_rng_state(current)
    return fresh


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)
