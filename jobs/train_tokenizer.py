"""Stage `train_tokenizer`: ResTok with DeepSpeed on Ray Train, reading prep's image shards.

SPEC "loss"/"recipe": MSE + LPIPS + VQ + VF (+ 0.5 GAN from `gan_start_step`), AdamW lr 1e-4
betas (0.9, 0.95) wd 1e-4 without decay on norms/biases/embeddings, cosine with warm-up and floor,
clip 10, EMA. Two engines: the tokenizer and, once the GAN starts, the discriminator heads
(their own optimizer, lr `disc_lr`). The discriminator engine uses ZeRO <= 2: its ~7.4M trainable
parameters gain nothing from ZeRO-3 partitioning, and the generator step backpropagates through
it (with its heads frozen), which ZeRO-3's gather hooks would turn into extra collectives.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
from omegaconf import OmegaConf

from configs.schema import RestokConfig
from data_prep.loaders import train_batches
from infra import paths
from infra.image_grid import image_grid
from jobs.training.checkpoints import tokenizer_config
from jobs.training.deepspeed_runtime import (
    build_engine,
)
from jobs.training.ray_training import (
    LoopSpec,
    WorkerSession,
    all_reduce_sum_,
    run_loop,
)
from jobs.training.stage import TrainingStage, run_training_stage
from jobs.training.throughput import forward_flops
from models.losses.codebook_stats import CodebookStats
from models.losses.tokenizer_loss import TokenizerLoss
from models.tokenizer import ResTok

STAGE = "train_tokenizer"
ENGINE = "tokenizer"
DISC_ENGINE = "discriminator"
GRID_IMAGES = 8


def image_batches(
    cfg: RestokConfig,
    prep_manifest: dict,
    rank: int,
    world: int,
    micro_batch: int,
    seed: int | str,
    start: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """prep's training batches for `rank` from global micro-batch index `start` on, forever.

    data_prep.loaders.train_batches is deterministic per (seed, rank, epoch), so the data position
    is the micro-batch index: its epoch is start // batches per epoch, and the batches before
    it in that epoch are skipped."""

    def epoch_batches(epoch: int):
        return train_batches(
            prep_manifest,
            "train",
            rank,
            world,
            micro_batch,
            int(cfg.data.image_size),
            seed,
            epoch=epoch,
            num_workers=int(cfg.data.loader_workers),
            crop_scale_min=float(cfg.data.crop_scale_min),
            hflip=bool(cfg.data.hflip),
            shuffle_buffer=int(cfg.data.shuffle_buffer),
        )

    per_epoch = len(epoch_batches(0))
    if per_epoch == 0:
        raise ValueError(
            f"prep split 'train' has fewer samples than micro_batch_size x workers = {micro_batch * world}"
        )
    epoch, offset = divmod(start, per_epoch)
    while True:
        for i, (images, labels) in enumerate(epoch_batches(epoch)):
            if i >= offset:
                yield images, labels
        epoch, offset = epoch + 1, 0


def reconstruction_grid(images: torch.Tensor, recon: torch.Tensor):
    """Originals on the top row, reconstructions below (uint8 HxWx3)."""
    n = min(GRID_IMAGES, images.shape[0])
    return image_grid(torch.cat([images[:n].float(), recon[:n].float()]), nrow=n)


def tokenizer_loop(config: dict) -> None:
    """Ray Train worker: tokenizer engine (+ discriminator engine from the GAN start)."""
    session = WorkerSession.start(config)  # identical initial weights on every rank
    cfg, train, device = session.cfg, session.train, session.device
    tok_cfg = tokenizer_config(cfg)
    model = ResTok(tok_cfg)
    loss_cfg = train.loss
    if tok_cfg.vf_align == "none" and float(loss_cfg.vf_weight) > 0:
        # No VF head, so no VF term (ablation-vf-none, the official presets): the teacher (a
        # DINOv3 ViT) would be loaded, and its weights required, for nothing.
        loss_cfg = OmegaConf.merge(loss_cfg, {"vf_weight": 0.0})
    loss_fn = TokenizerLoss(loss_cfg)
    size = int(tok_cfg.image_size)
    flops = 3 * forward_flops(lambda: model(torch.zeros(1, 3, size, size)))
    if train.compile != "off":  # after the FLOP count, which runs the model eagerly
        model.compile_pixel_cnns(train.compile)
    total_steps = int(train.steps)
    engine = build_engine(model.to(device), train, session.world, total_steps)
    engines = {ENGINE: engine}
    disc_engine = None
    if loss_fn.discriminator is not None:
        # Built up front (it is checkpointed from the start); stepped only once the GAN is on, so
        # its schedule spans the steps after that (the release: max_train_steps - discriminator_start).
        disc_engine = build_engine(
            loss_fn.discriminator,
            train,
            session.world,
            max(total_steps - int(loss_fn.config.gan_start_step), 1),
            lr=float(train.disc_lr),
            zero_stage=min(int(train.zero_stage), 2),
        )
        engines[DISC_ENGINE] = disc_engine
    loss_fn.to(device)
    ema = session.ema_of(engine)
    session.seed_rank()  # per-rank nested-dropout streams
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
    stats = CodebookStats(tok_cfg.codebook_size, device=device)

    prep_manifest = paths.input_manifest(cfg, "prep")
    fixed: dict[str, torch.Tensor] = {}

    def micro_batches(start: int, salt: str):
        return image_batches(
            cfg,
            prep_manifest,
            session.rank,
            session.world,
            int(train.micro_batch_size),
            f"{int(train.seed)}{salt}",  # the streams' seed string (ray_training.data_stream_salt)
            start,
        )

    def train_step(step: int, micro: list) -> dict[str, float]:
        engine.train()
        gan = loss_fn.gan_active(step)
        sums: dict[str, float] = defaultdict(float)
        for images, _labels in micro:
            images = images.to(device)
            fixed.setdefault("images", images[:GRID_IMAGES].clone())
            recon, aux = engine(images.to(dtype))
            recon = recon.float()
            loss, logs = loss_fn.generator_loss(images, recon, aux, step)
            engine.backward(loss)
            engine.step()
            stats.update(aux["codes"])
            if gan:
                d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step)
                disc_engine.backward(d_loss)
                disc_engine.step()
                logs.update(d_logs)
            logs["loss"] = logs.pop("total", float(loss.detach()))
            for k, v in logs.items():
                sums[k] += v / len(micro)
        # Same keys on every step and rank (all-reduced for logging): GAN terms are 0 before it starts.
        if loss_fn.discriminator is not None:
            sums.setdefault("gan_active", float(gan))
        if train.compile != "off":  # graphs compiled so far: growth after the first steps = recompiles
            # torch._dynamo through torch's lazy attribute: loaded by the compile, not on the driver
            sums["compiled_graphs"] = float(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return dict(sums)

    def interval_metrics() -> dict[str, float]:
        all_reduce_sum_(stats.hist)
        out = {k: v for k, v in stats.summary().items() if k in ("codebook_usage", "codebook_entropy_bits")}
        stats.reset()
        return out

    def log_images(step: int) -> None:
        if "images" not in fixed:
            return
        engine.eval()
        with torch.no_grad():
            recon, _ = engine(fixed["images"].to(dtype))  # collective under ZeRO-3: every rank runs it
        engine.train()
        session.log_image(
            reconstruction_grid(fixed["images"], recon.clamp(0, 1)),
            f"reconstructions/step_{step + 1:07d}.png",
        )

    def extra_state() -> dict:
        return {"lecam": dict(loss_fn.lecam.state_dict())} if loss_fn.lecam is not None else {}

    def set_extra_state(state: dict) -> None:
        if loss_fn.lecam is not None and "lecam" in state:
            loss_fn.lecam.load_state_dict(state["lecam"])

    run_loop(
        session,
        LoopSpec(
            engines=engines,
            ema=ema,
            micro_batches=micro_batches,
            train_step=train_step,
            sample_unit="images",
            tokens_per_sample=tok_cfg.num_tokens,
            flops_per_sample=flops,
            log_images=log_images,
            get_extra_state=extra_state,
            set_extra_state=set_extra_state,
            interval_metrics=interval_metrics,
        ),
    )


SPEC = TrainingStage(STAGE, upstream="prep", loop=tokenizer_loop)


def run(cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """The stage contract (infra.stages.StageRun): ResTok on prep's shards, exported when done."""
    return run_training_stage(SPEC, cfg, run_id, parent_run_id)
