"""Code shards: the extract_codes stage's output and the generator's training data.

Format (WebDataset tar, one per image shard, same base name): per sample `<key>.codes.npy`, an
int16/int32 array [A, N] (A augmented views: 1 none, 2 original + flip, 10 ten-crop; N tokens)
and `<key>.cls` (ASCII class index). SPEC "codes": one view is drawn per sample at training time.

The loader holds all codes of a split in memory (ImageNet, 128 tokens, int16: 0.33 GB per view)
and walks a per-epoch permutation keyed on (seed, epoch), so its position is one integer (the
micro-batch index) and resuming at any step is exact and O(1).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from infra import storage
from infra.manifest import require_complete
from infra.shards import read_samples, tar_bytes


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_shard(samples: list[tuple[str, np.ndarray, int]]) -> bytes:
    """A code-shard tar from (key, codes [A, N], class) triples (byte-identical for identical codes)."""
    return tar_bytes(
        {"__key__": key, "codes.npy": _npy(codes), "cls": str(int(cls)).encode()}
        for key, codes, cls in samples
    )


def read_code_shard(url: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, codes [M, A, N], classes [M]) of one code shard."""
    keys, codes, classes = [], [], []
    for parts in read_samples(url):
        key = parts["__key__"]
        if "codes.npy" not in parts or "cls" not in parts:
            raise ValueError(f"{url}: sample {key!r} lacks codes.npy or cls (has {sorted(parts)})")
        keys.append(key)
        codes.append(np.load(io.BytesIO(parts["codes.npy"]), allow_pickle=False))
        classes.append(int(parts["cls"]))
    if not codes:
        return keys, np.zeros((0, 0, 0), np.int16), np.zeros((0,), np.int64)
    return keys, np.stack(codes), np.asarray(classes, dtype=np.int64)


def load_split(stage_dir: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """All codes [M, A, N] and classes [M] of a split, in manifest order; checks the counts."""
    manifest = require_complete(stage_dir, "extract_codes")
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise ValueError(f"{stage_dir}: no code shards for split {split!r}")
    codes, classes = [], []
    for shard in shards:
        _, c, y = read_code_shard(storage.join(stage_dir, shard["name"]))
        if len(y) != shard["count"]:
            raise ValueError(f"{shard['name']}: {len(y)} samples, manifest says {shard['count']}")
        if len(y):  # a shard of only skipped images holds nothing (and no code shape to stack)
            codes.append(c)
            classes.append(y)
    if not codes:
        raise ValueError(f"{stage_dir}: the {split!r} code shards hold no samples")
    return np.concatenate(codes), np.concatenate(classes)


class CodeBatches:
    """Deterministic, resumable micro-batches of (codes [B, N] int64, classes [B]) for one rank.

    Epoch e visits a permutation of all samples keyed on (seed, e), cut into global batches
    (the tail short of one is dropped); optimizer step s takes the s-th, rank r every world-th
    sample of it, in `global_batch / (micro_batch x world)` micro-batches. Each sample's
    augmented view is drawn from the same key. So the samples of a step depend on the step only:
    a resume on another world size or micro-batch size (output-neutral keys) goes on with the same
    global batches.
    """

    def __init__(
        self,
        codes: np.ndarray,
        classes: np.ndarray,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        global_batch: int | None = None,
    ):
        self.codes, self.classes = codes, classes
        self.micro_batch, self.rank, self.world, self.seed = micro_batch, rank, world, seed
        self.global_batch = global_batch or micro_batch * world
        if self.global_batch % (micro_batch * world):
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of micro_batch x workers "
                f"= {micro_batch * world}"
            )
        self.accumulation = self.global_batch // (micro_batch * world)
        self.steps_per_epoch = len(classes) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(classes)} code samples are fewer than the global batch {self.global_batch}"
            )

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.classes))
        views = rng.integers(0, self.codes.shape[1], size=len(self.classes))
        return order, views

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches from this rank's micro-batch index `start` (step x accumulation) on, forever."""
        step, first = divmod(start, self.accumulation)
        epoch, step = divmod(step, self.steps_per_epoch)
        while True:
            order, views = self._epoch(epoch)
            for s in range(step, self.steps_per_epoch):
                mine = order[s * self.global_batch : (s + 1) * self.global_batch][self.rank :: self.world]
                for j in range(first, self.accumulation):
                    i = mine[j * self.micro_batch : (j + 1) * self.micro_batch]
                    yield (
                        torch.from_numpy(self.codes[i, views[i]].astype(np.int64)),
                        torch.from_numpy(self.classes[i].copy()),
                    )
                first = 0
            epoch, step = epoch + 1, 0


def manifest_summary(manifest: dict[str, Any]) -> str:
    return (
        f"{sum(manifest['counts'].values())} samples, code shape {manifest['code_shape']} "
        f"{manifest['dtype']}, tokenizer sha256 {manifest['tokenizer_sha256'][:12]}"
    )
