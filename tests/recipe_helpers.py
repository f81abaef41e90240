"""Shared helpers of the small-scale recipe tests: a fake ImageNet written in both layouts the
recipe reads (data_prep/sources.py), and the override list that shrinks `imagenet256-restok-l`
(and the ablation-* presets built on it) to CPU size while leaving every switch as the preset sets it.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A smooth random colour field (JPEG-friendly, unlike white noise) of size (w, h)."""
    coarse = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_imagenet_folder(
    root: Path, train_per_class: int = 8, val_per_class: int = 2, seed: int = 0
) -> Path:
    """`imagenet_folder` layout: root/train/<wnid>/<wnid>_<i>.JPEG, a flat root/val/ of
    ILSVRC2012_val_<n>.JPEG labelled by root/LOC_val_solution.csv. Image sizes vary (the recipe
    keeps original bytes and crops at load time)."""
    rng = np.random.default_rng(seed)
    rows = ["ImageId,PredictionString"]
    (root / "val").mkdir(parents=True, exist_ok=True)
    n = 0
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            size = (int(rng.integers(72, 96)), int(rng.integers(64, 88)))
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rng, size))
        for _ in range(val_per_class):
            n += 1
            key = f"ILSVRC2012_val_{n:08d}"
            (root / "val" / f"{key}.JPEG").write_bytes(_jpeg(rng, (80, 70)))
            rows.append(f"{key},{wnid} 1 2 40 30 {wnid} 3 4 20 20")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def write_imagenet_tars(tree: Path, out: Path, wnids=None) -> Path:
    """`imagenet_tar` layout from a folder tree: out/ILSVRC2012_img_train.tar (a tar of <wnid>.tar,
    in `wnids` order, default sorted), out/ILSVRC2012_img_val.tar (flat) and out/LOC_val_solution.csv."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in wnids if wnids is not None else sorted(os.listdir(tree / "train")):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted((tree / "train" / wnid).iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    with tarfile.open(out / "ILSVRC2012_img_val.tar", "w") as val:
        for f in sorted((tree / "val").iterdir()):
            val.add(f, arcname=f.name)
    (out / "LOC_val_solution.csv").write_bytes((tree / "LOC_val_solution.csv").read_bytes())
    return out


RECIPE_STEPS = 24
GAN_START = 12  # mid-run, as the recipe's 20k of 1M (SPEC "loss": GAN from step 20k)

# Only sizes, step counts, batch sizes, worker counts and the image size differ from the preset:
# bf16, ZeRO-2, EMA, LeCam, DiffAugment, nested dropout, VF both, ten-crop, CFG/top-p stay as set.
# A backbone shrunk to a tiny random network is named `random-untrained` (its metrics say so).
SHRINK_SIZES = [
    # data: 64 px, few shards, no loader processes
    "data.image_size=64",
    "data.samples_per_shard=16",
    "data.prep_tasks=2",
    "data.loader_workers=0",
    # ResTok: tiny encoder (depth 4 holds S = 4 merges), nano decoder, 8x8 grid, 16 tokens
    "tokenizer.encoder_size=tiny",
    "tokenizer.decoder_size=nano",
    "tokenizer.image_size=64",
    "tokenizer.pixel_channels=16",
    "tokenizer.channel_mult=[1,1,2,2]",
    "tokenizer.num_res_blocks=1",
    "tokenizer.z_channels=32",
    "tokenizer.cnn_norm_groups=8",
    "tokenizer.levels=[1,1,2,4,8]",
    "tokenizer.codebook_size=256",
    "tokenizer.vf_feature_dim=192",
    # frozen networks shrunk to tiny random ViTs / a random VGG (named random-untrained)
    "tokenizer_train.loss.lpips_backbone=random-untrained",
    "tokenizer_train.loss.vf_teacher=vit_tiny_patch16_224",
    "tokenizer_train.loss.vf_teacher_backbone=random-untrained",
    "tokenizer_train.loss.vf_teacher_resolution=64",
    "tokenizer_train.loss.vf_teacher_kwargs={depth: 1}",
    "tokenizer_train.loss.disc_backbone_name=vit_tiny_patch16_224",
    "tokenizer_train.loss.disc_backbone=random-untrained",
    "tokenizer_train.loss.disc_resolution=64",
    "tokenizer_train.loss.disc_feature_blocks=[0,1]",
    "tokenizer_train.loss.disc_backbone_kwargs={depth: 2}",
    # tokenizer schedule: a few dozen steps, GAN from mid-run
    f"tokenizer_train.steps={RECIPE_STEPS}",
    f"tokenizer_train.loss.gan_start_step={GAN_START}",
    "tokenizer_train.global_batch_size=4",
    "tokenizer_train.micro_batch_size=2",
    "tokenizer_train.optim.warmup_steps=4",
    "tokenizer_train.log_every=1",
    f"tokenizer_train.image_log_every={RECIPE_STEPS}",
    f"tokenizer_train.checkpoint_every={RECIPE_STEPS}",
    # HAR: tiny GPT on the 16-token codes of 4 classes
    "generator.size=tiny",
    "generator.vocab_size=256",
    "generator.levels=[1,1,2,4,8]",
    f"generator.num_classes={len(WNIDS)}",
    f"generator_train.steps={RECIPE_STEPS}",
    "generator_train.global_batch_size=4",
    "generator_train.micro_batch_size=2",
    "generator_train.optim.warmup_steps=4",
    "generator_train.log_every=1",
    f"generator_train.checkpoint_every={RECIPE_STEPS}",
    # extraction, sampling, evaluation: small batches, 2 actors, 2 samples per class
    "extract.batch_size=8",
    "extract.num_actors=2",
    "sampling.batch_size=8",
    "eval.num_samples_per_class=2",
    "eval.num_actors=2",
    "eval.batch_size=8",
    "eval.inception_weights=random-untrained",
    # one local 2-worker CPU cluster
    "cluster.address=local",
    "cluster.num_workers=2",
    "cluster.use_gpu=false",
    "cluster.cpus_per_worker=1",
]


# Per-preset size exceptions: S = 5 image scales need at least 5 encoder blocks (merging blocks at
# int(i*N/S) - 1); the registry's smallest size that deep is "small" (512 wide: 30 s of a CPU test),
# so the in-process test registers TINY_DEEP, the tiny ViT 6 blocks deep, for the run.
TINY_DEEP = "tiny-6-blocks"
PRESET_SIZES = {"ablation-scales-5": [f"tokenizer.encoder_size={TINY_DEEP}"]}


def shrink_sizes(preset: str) -> list[str]:
    return SHRINK_SIZES + PRESET_SIZES.get(preset, [])


def site_paths(work_dir: Path, data_root: Path, source: str) -> list[str]:
    """Site paths the preset takes from the environment: absolute, under the test's tmp dir.
    eval.reference_stats is empty: ADM's Inception reference cannot be compared with features of
    a random-untrained Inception, so the reference is made from the prep train split."""
    return [
        f"work_dir={work_dir}",
        f"data.source={source}",
        f"data.root={data_root}",
        "tracking.tracking_uri=''",
        "cluster.storage_path=''",
        "eval.reference_stats=''",
    ]
