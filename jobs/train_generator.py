"""Stage `train_generator`: the HAR (or vanilla AR) GPT on extracted codes, DeepSpeed on Ray Train.

SPEC "HAR generator / recipe": AdamW lr 1e-4 betas (0.9, 0.95) wd 0.05, cosine with warm-up and
floor, clip 1.0, bf16, class dropout (in the model, GeneratorConfig.class_dropout), EMA.
One augmented view of each sample's codes is drawn per visit (SPEC "codes").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from configs.loading import sampler_kwargs
from configs.schema import RestokConfig
from infra import code_shards, paths
from infra.image_grid import image_grid
from jobs.training.checkpoints import generator_config, load_tokenizer
from jobs.training.deepspeed_runtime import (
    build_engine,
)
from jobs.training.ray_training import LoopSpec, WorkerSession, run_loop
from jobs.training.stage import TrainingStage, run_training_stage
from jobs.training.throughput import forward_flops
from models.generator import GPT, sample

STAGE = "train_generator"
ENGINE = "generator"
GRID_SAMPLES = 16


def check_against_codes(cfg: RestokConfig, codes_manifest: dict) -> None:
    """The generator's vocabulary, levels and classes must match the extracted codes."""
    want = {
        "generator.vocab_size": codes_manifest["codebook_size"],
        "generator.levels": list(codes_manifest["levels"]),
        "generator.num_classes": codes_manifest["num_classes"],
    }
    have = {
        "generator.vocab_size": int(cfg.generator.vocab_size),
        "generator.levels": list(cfg.generator.levels),
        "generator.num_classes": int(cfg.generator.num_classes),
    }
    wrong = [f"{k}={want[k]}" for k in want if want[k] != have[k]]
    if wrong:
        raise ValueError(f"generator config does not match the extracted codes; set {' '.join(wrong)}")


def _zero3_gathered(engine: Any):
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def generator_loop(config: dict) -> None:
    """Ray Train worker: one DeepSpeed engine for the GPT."""
    session = WorkerSession.start(config)  # identical initial weights on every rank
    cfg, train, device = session.cfg, session.train, session.device
    gen_cfg = generator_config(cfg)
    model = GPT(gen_cfg)
    labels1 = torch.zeros(1, dtype=torch.long)
    flops = 3 * forward_flops(lambda: model(labels1, torch.zeros(1, gen_cfg.block_size, dtype=torch.long)))
    engine = build_engine(model.to(device), train, session.world, int(train.steps))
    ema = session.ema_of(engine)
    session.seed_rank()  # per-rank dropout streams

    codes, classes = code_shards.load_split(paths.stage_dir(cfg, "extract_codes"), "train")
    loader = code_shards.CodeBatches(
        codes,
        classes,
        int(train.micro_batch_size),
        session.rank,
        session.world,
        int(train.seed),
        global_batch=int(train.global_batch_size),
    )

    def train_step(step: int, micro: list) -> dict[str, float]:
        engine.train()
        total = 0.0
        for codes_b, labels_b in micro:
            codes_b, labels_b = codes_b.to(device), labels_b.to(device)
            logits = engine(labels_b, codes_b)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes_b.reshape(-1))
            engine.backward(loss)
            engine.step()
            total += float(loss.detach())
        return {"loss": total / len(micro)}

    tokenizer_dir = paths.stage_dir(cfg, "train_tokenizer")
    tokenizer = None
    try:
        # the weights the codes were extracted with (extract.use_ema): their codebook and decoder
        codes_ema = bool(cfg.extract.use_ema)
        tokenizer = load_tokenizer(tokenizer_dir, ema=codes_ema, device=device) if session.is_logger else None
    except FileNotFoundError:
        print(f"[{STAGE}] no tokenizer export in {tokenizer_dir}: sample grids are not logged")

    def log_images(step: int) -> None:
        # Every rank joins the ZeRO-3 gather; rank 0 samples and decodes with the trained tokenizer.
        with _zero3_gathered(engine):
            if tokenizer is None:
                return
            labels = torch.arange(GRID_SAMPLES, device=device) % gen_cfg.num_classes
            gen = torch.Generator(device=device).manual_seed(0)
            # The configured sampler, all of it (min_cfg_scale and release_cfg_floor included).
            result = sample(engine.module, labels, generator=gen, **sampler_kwargs(cfg.sampling))
            with torch.no_grad():
                images = tokenizer.decode_codes(result.codes.to(device))
            session.log_image(image_grid(images), f"samples/step_{step + 1:07d}.png")

    run_loop(
        session,
        LoopSpec(
            engines={ENGINE: engine},
            ema=ema,
            # cut per global batch: the same samples per step under any split, no salt needed
            micro_batches=lambda start, salt: loader.iterate(start),
            train_step=train_step,
            sample_unit="sequences",
            tokens_per_sample=gen_cfg.block_size,
            flops_per_sample=flops,
            log_images=log_images,
        ),
    )


SPEC = TrainingStage(STAGE, upstream="extract_codes", loop=generator_loop, check_inputs=check_against_codes)


def run(cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """The stage contract (infra.stages.StageRun): the GPT on extracted codes, exported when done."""
    return run_training_stage(SPEC, cfg, run_id, parent_run_id)
