"""WebDataset loaders over prep's shards, for training and for evaluation.

Both take the rank and world size as arguments (never from the environment or a global
process group), so they work the same in a Ray Train worker, a Ray actor or a plain process.
Shards are read from any fsspec URL (data_prep.fsspec_gopen registers the schemes).

train_batches: resampled shards (each rank and DataLoader worker draws shards with its own RNG
  seeded by (seed, rank, worker, epoch)), a shuffle buffer, the paper's random crop + flip,
  and a per-epoch sample budget: each rank yields budget // (world_size * batch_size) full
  batches of (float images [B,3,S,S] in [0,1], int64 labels [B]).
eval_batches: each sample exactly once across ranks, in a deterministic order. Shard i goes to
  rank i % world_size (the explicit nodesplitter) and, within a rank, to DataLoader workers
  round-robin. With fewer shards than ranks, every rank reads all shards and keeps sample p of
  each shard when p % world_size == rank. Yields (float images, labels, keys); the last batch
  of each worker may be short.

`shards` may be a prep manifest (dict), the URL of a prep stage directory or of its
manifest.json, a list of shard URLs, or a brace pattern such as ".../train-{000000..000009}.tar".
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from data_prep import fsspec_gopen  # noqa: F401  (registers fsspec URL schemes with webdataset)
from data_prep.tar_samples import tar_samples
from data_prep.transforms import (
    EvalTransform,
    TrainTransform,
    to_chw_uint8,
    to_unit_float,
)
from infra import storage
from infra.manifest import MANIFEST_NAME

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def resolve_shards(shards: Any, split: str) -> tuple[list[str], list[int] | None]:
    """(shard URLs in order, per-shard sample counts or None when only URLs were given)."""
    if isinstance(shards, (list, tuple)):
        return [str(u) for u in shards], None
    if isinstance(shards, str) and ".tar" in shards and not shards.endswith(".json"):
        return list(wds.shardlists.expand_urls(shards)), None
    manifest = shards
    if isinstance(shards, str):
        url = shards if shards.endswith(".json") else storage.join(shards, MANIFEST_NAME)
        manifest = storage.read_json(url)
        if manifest is None:
            raise FileNotFoundError(f"{url}: no prep manifest; run `restok prep` first")
    splits = manifest.get("splits", {})
    if split not in splits:
        raise KeyError(f"prep manifest has no split {split!r}; valid: {sorted(splits)}")
    entries = splits[split]["shards"]
    return [storage.join(manifest["shards_url"], e["shard"]) for e in entries], [
        int(e["count"]) for e in entries
    ]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _label(sample: dict) -> int:
    return int(sample["cls"].decode() if isinstance(sample["cls"], bytes) else sample["cls"])


def _image_bytes(sample: dict) -> bytes:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    raise KeyError(
        f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_KEYS)})"
    )


class ResampledShardSource:
    """Infinite shard stream for one (rank, worker, epoch): no node split needed, every rank
    draws independently from its own seed."""

    def __init__(self, urls: list[str], seed: int | str, rank: int, epoch: int):
        self.urls, self.seed, self.rank, self.epoch = urls, seed, rank, epoch

    def __call__(self) -> Iterator[dict]:
        worker, _ = _worker()
        rng = random.Random(f"shards-{self.seed}-{self.rank}-{worker}-{self.epoch}")
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class SplitByRank:
    """Explicit nodesplitter: shard i to rank i % world_size."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Any) -> Iterator[dict]:
        yield from islice(src, self.rank, None, self.world_size)


def split_by_worker(src: Any) -> Iterator[dict]:
    worker, num_workers = _worker()
    yield from islice(src, worker, None, num_workers)


class KeepSampleModulo:
    """Sample-level split (fewer shards than ranks): keep position p of each shard iff p % world == rank."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Any) -> Iterator[dict]:
        url, pos = None, 0
        for sample in src:
            if sample.get("__url__") != url:
                url, pos = sample.get("__url__"), 0
            if pos % self.world_size == self.rank:
                yield sample
            pos += 1


class Shuffle:
    def __init__(self, bufsize: int, seed: int | str, rank: int, epoch: int):
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, epoch

    def __call__(self, src: Any) -> Iterator[dict]:
        if self.bufsize <= 1:  # data.shuffle_buffer 0 or 1: no sample shuffle (shards still are)
            yield from src
            return
        worker, _ = _worker()
        rng = random.Random(f"shuffle-{self.seed}-{self.rank}-{worker}-{self.epoch}")
        buf: list = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class DecodeBatch:
    """Decode + transform samples and stack them: (uint8 [B,3,S,S], int64 [B], keys).

    `batches_per_worker`: (rank's batch count, drop short batches) for training; None = all
    samples with a short last batch (evaluation)."""

    def __init__(
        self,
        transform: Any,
        batch_size: int,
        seed: int | str,
        rank: int,
        epoch: int,
        rank_batches: int | None = None,
    ):
        self.transform, self.batch_size = transform, batch_size
        self.seed, self.rank, self.epoch, self.rank_batches = seed, rank, epoch, rank_batches

    def _limit(self) -> int | None:
        if self.rank_batches is None:
            return None
        worker, num_workers = _worker()
        return self.rank_batches // num_workers + (1 if worker < self.rank_batches % num_workers else 0)

    def __call__(self, src: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        worker, _ = _worker()
        rng = random.Random(f"augment-{self.seed}-{self.rank}-{worker}-{self.epoch}")
        limit = self._limit()
        if limit == 0:
            return
        done = 0
        images, labels, keys = [], [], []
        for sample in src:
            image = self.transform(self.transform.decode(_image_bytes(sample)), rng)
            images.append(to_chw_uint8(image))
            labels.append(_label(sample))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys
                images, labels, keys = [], [], []
                done += 1
                if limit is not None and done >= limit:
                    return
        if images and limit is None:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys


class Batches:
    """An epoch of batches through a DataLoader; `len()` is the batch count when known."""

    def __init__(
        self,
        pipeline: wds.DataPipeline,
        num_workers: int,
        num_batches: int | None,
        with_keys: bool,
        urls: list[str],
    ):
        self.pipeline, self.num_workers, self.num_batches, self.with_keys = (
            pipeline,
            num_workers,
            num_batches,
            with_keys,
        )
        self.urls = urls

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("batch count unknown (shards given without a manifest)")
        return self.num_batches

    def __iter__(self) -> Iterator[tuple]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            # memory:// exists only in this process: workers must be forked copies of it.
            if any(u.startswith("memory://") for u in self.urls):
                kwargs["multiprocessing_context"] = "fork"
            kwargs["prefetch_factor"] = 4
        # The pipeline's stages are seeded explicitly (seed, rank, epoch). A generator of its own
        # keeps the DataLoader from drawing its workers' base seed from torch's global RNG: a resume
        # mid-epoch creates this iterator at another step than the uninterrupted run did, and that
        # draw would shift every later nested-dropout / augmentation draw of the training loop.
        loader = DataLoader(
            self.pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        for images, labels, keys in loader:
            yield (to_unit_float(images), labels, keys) if self.with_keys else (to_unit_float(images), labels)


def train_batches(
    shards: Any,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: int,
    seed: int | str,
    *,
    samples_per_epoch: int | None = None,
    epoch: int = 0,
    num_workers: int = 2,
    crop_scale_min: float = 0.8,
    hflip: bool = True,
    shuffle_buffer: int = 1000,
) -> Batches:
    """One epoch of training batches for `rank`: (images float [B,3,S,S] in [0,1], labels int64 [B]).

    `samples_per_epoch` (all ranks together) defaults to the split's sample count in the manifest.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    urls, counts = resolve_shards(shards, split)
    if not urls:
        raise ValueError(
            f"no {split} shards in {shards if isinstance(shards, str) else 'the given manifest'}"
        )
    if samples_per_epoch is None:
        if counts is None:
            raise ValueError("samples_per_epoch is required when shards are given as URLs")
        samples_per_epoch = sum(counts)
    rank_batches = samples_per_epoch // (world_size * batch_size)
    pipeline = wds.DataPipeline(
        ResampledShardSource(urls, seed, rank, epoch),
        tar_samples,
        Shuffle(shuffle_buffer, seed, rank, epoch),
        DecodeBatch(
            TrainTransform(image_size, crop_scale_min, hflip), batch_size, seed, rank, epoch, rank_batches
        ),
    )
    return Batches(pipeline, num_workers, rank_batches, with_keys=False, urls=urls)


def eval_batches(
    shards: Any,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: int,
    *,
    num_workers: int = 2,
    draft: bool = False,
) -> Batches:
    """Every sample of `split` exactly once across ranks: (images float [B,3,S,S], labels, keys)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    urls, counts = resolve_shards(shards, split)
    by_shard = len(urls) >= world_size
    stages: list[Any] = [wds.SimpleShardList(urls)]
    stages += [SplitByRank(rank, world_size)] if by_shard else []
    stages += [split_by_worker, tar_samples]
    stages += [] if by_shard else [KeepSampleModulo(rank, world_size)]
    stages += [DecodeBatch(EvalTransform(image_size, draft), batch_size, 0, rank, 0, None)]
    num_batches = None
    if counts is not None:
        num_batches = _eval_batch_count(counts, rank, world_size, num_workers, batch_size, by_shard)
    return Batches(wds.DataPipeline(*stages), num_workers, num_batches, with_keys=True, urls=urls)


def _eval_batch_count(
    counts: Sequence[int], rank: int, world: int, workers: int, batch: int, by_shard: bool
) -> int:
    if by_shard:
        mine = list(counts[rank::world])
    else:
        mine = [len(range(rank, c, world)) for c in counts]
    per_worker = [sum(mine[w :: max(workers, 1)]) for w in range(max(workers, 1))]
    return sum(-(-n // batch) for n in per_worker)
