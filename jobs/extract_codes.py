"""Stage `extract_codes`: image shards -> code shards with a Ray actor pool (one tokenizer per actor).

SPEC "codes" (LlamaGen's extraction): every image becomes A views, encoded together:
  none     1 view: shorter side to S, centre crop S (the evaluation transform)
  flip     2 views: that crop and its horizontal flip
  tencrop  10 views: centre crop at 1.1 S, then the 4 corner + centre S crops and their flips
Code shard i is written from image shard i (same name) atomically, then a small `.json` receipt
naming what produced it: the stage fingerprint (extract config + upstream fingerprints), the
tokenizer weights' sha256 (a retrained tokenizer keeps its config's fingerprint) and the image
shard's sha256. A rerun keeps only shards whose receipt names the current producer, so a killed
extraction resumes where it stopped and a changed one never reuses stale codes (issue 19). The
codes are deterministic (eval mode, fixed batches per shard).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from configs.schema import RestokConfig
from data_prep.loaders import IMAGE_KEYS, resolve_shards
from data_prep.transforms import adm_center_crop, decode, to_chw_uint8
from infra import node_loss, paths, storage, tracking
from infra.code_shards import encode_shard
from infra.console import progress
from infra.manifest import (
    is_complete,
    read_manifest,
    remove_manifest,
    write_manifest,
)
from infra.ray_connect import connect_ray, worker_runtime_env
from infra.shards import read_samples
from infra.stages import discarded_line, stage_fingerprint
from jobs.training.checkpoints import CONFIG_NAME, load_tokenizer, weights_name

STAGE = "extract_codes"
NUM_VIEWS = {"none": 1, "flip": 2, "tencrop": 10}
TENCROP_SCALE = 1.1  # LlamaGen: centre crop at 1.1x the resolution before the ten crops
# Test-only fault injection (name says so): an actor exits after writing this many shards.
TEST_EXIT_ENV = "RESTOK_TEST_EXTRACT_EXIT_AFTER_SHARDS"
# Test-only pacing (name says so): seconds an actor sleeps at the start of each shard, so a test
# that removes an actor's node lands in a call however fast the machine is.
TEST_SHARD_SLEEP_ENV = "RESTOK_TEST_EXTRACT_SLEEP_S"


def five_crop(image: Any, size: int) -> list[Any]:
    """torchvision's five_crop of a PIL image: the four corners, then the centre at rounded
    offsets (torchvision is not imported by stage modules: tests/test_layering.py)."""
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    boxes = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), (left, top)]
    return [image.crop((x, y, x + size, y + size)) for x, y in boxes]


def views(image: Any, size: int, augment: str) -> list[Any]:
    """The augmented PIL views of one image, in a fixed order."""
    from PIL import Image

    if augment not in NUM_VIEWS:
        raise ValueError(f"extract.augment={augment!r}; choose one of {sorted(NUM_VIEWS)}")
    if augment == "tencrop":
        # The release (LlamaGen's extract_codes_c2i): ADM centre crop at int(size x 1.1), then
        # torchvision's TenCrop: five crops of the image, then five of its mirror image.
        big = adm_center_crop(image, int(size * TENCROP_SCALE))
        return five_crop(big, size) + five_crop(big.transpose(Image.FLIP_LEFT_RIGHT), size)
    crop = adm_center_crop(image, size)
    return [crop] if augment == "none" else [crop, crop.transpose(Image.FLIP_LEFT_RIGHT)]


def receipt_url(out_url: str) -> str:
    return out_url[: -len(".tar")] + ".json"


# Why a receipt is not reused, by the first identity field that differs (logged as counts).
STALE_REASONS = {
    "fingerprint": "made under another config",
    "tokenizer_sha256": "made by other tokenizer weights",
    "input_sha256": "made from another image shard",
    "shard": "code shard missing or truncated",
}
SHARD_FILE = re.compile(r"^.+-\d{6}\.(tar|json)$")  # prep's `{split}-NNNNNN.tar` names and receipts


def stale_reason(receipt: dict | None, out_url: str, identity: dict[str, str]) -> str | None:
    """None when the receipt names this producer and its shard is on storage, else why not."""
    if receipt is None:
        return "missing"
    for key, value in identity.items():
        if receipt.get(key) != value:
            return key
    fs, path = storage.filesystem(out_url)
    if not fs.exists(path) or fs.size(path) != receipt.get("bytes"):
        return "shard"
    return None


def discard_stale(stage_dir: str, jobs: list[tuple]) -> tuple[list[tuple], dict[str, int]]:
    """Delete code shards and receipts not made by the current producer (or outside the plan);
    returns the jobs left to do and the discard counts by reason."""
    fs, root = storage.filesystem(stage_dir)
    todo, discarded = [], Counter()
    for job in jobs:
        out_url, identity = job[3], job[4]
        reason = stale_reason(storage.read_json(receipt_url(out_url)), out_url, identity)
        if reason is None:
            continue
        todo.append(job)
        if reason != "missing":
            discarded[reason] += 1
        storage.remove(receipt_url(out_url))  # receipt first: never a receipt without its shard
        storage.remove(out_url)
    planned = {j[1] for j in jobs} | {receipt_url(j[1]) for j in jobs}
    for path in fs.ls(root, detail=False) if fs.exists(root) else []:  # an object store has no empty dirs
        name = os.path.basename(path)
        if SHARD_FILE.match(name) and name not in planned:
            fs.rm(path)
            discarded["outside the plan"] += name.endswith(".tar")
    return todo, {k: v for k, v in discarded.items() if v}


class CodeExtractor:
    """Ray actor: holds one tokenizer; turns one image shard into one code shard per call."""

    def __init__(
        self,
        tokenizer_dir: str,
        use_ema: bool,
        image_size: int,
        augment: str,
        code_dtype: str,
        batch_size: int,
        use_gpu: bool,
        exit_after: int = 0,
        pace_s: float = 0.0,
    ):

        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.model = load_tokenizer(tokenizer_dir, ema=use_ema, device=self.device)
        self.image_size, self.augment = image_size, augment
        self.dtype = np.dtype(code_dtype)
        if self.model.codebook_size > np.iinfo(self.dtype).max + 1:
            raise ValueError(
                f"extract.code_dtype={code_dtype} cannot hold codebook size "
                f"{self.model.codebook_size}; use int32"
            )
        self.batch_size = batch_size
        self.exit_after, self.written, self.pace_s = exit_after, 0, pace_s

    @torch.no_grad()
    def encode_views(self, images: list[Any]) -> np.ndarray:
        """PIL images -> codes [len(images), A, N] in the shard dtype."""

        per = NUM_VIEWS[self.augment]
        stacked = torch.stack(
            [to_chw_uint8(v) for im in images for v in views(im, self.image_size, self.augment)]
        )
        out = []
        for i in range(0, stacked.shape[0], self.batch_size):
            batch = stacked[i : i + self.batch_size].to(self.device).float() / 255.0
            _, info = self.model.encode(batch)
            out.append(info["codes"].reshape(batch.shape[0], -1).cpu())
        codes = torch.cat(out).numpy().astype(self.dtype)
        return codes.reshape(len(images), per, -1)

    def extract(self, in_url: str, out_url: str, identity: dict[str, str]) -> dict:
        if self.pace_s:
            time.sleep(self.pace_s)  # test-only (TEST_SHARD_SLEEP_ENV)
        keys, labels, images = [], [], []
        for parts in read_samples(in_url):
            key = parts["__key__"]
            ext = next((e for e in IMAGE_KEYS if e in parts), None)
            if ext is None or "cls" not in parts:
                raise ValueError(f"{in_url}: sample {key!r} lacks an image or cls (has {sorted(parts)})")
            keys.append(key)
            labels.append(int(parts["cls"]))
            images.append(decode(parts[ext]))
        codes = (
            self.encode_views(images)
            if images
            else np.zeros((0, NUM_VIEWS[self.augment], self.model.num_tokens), self.dtype)
        )
        data = encode_shard(list(zip(keys, codes, labels, strict=False)))
        storage.write_bytes_atomic(out_url, data)
        receipt = {
            **identity,
            "count": len(keys),
            "sha256": storage.sha256_bytes(data),
            "bytes": len(data),
            "code_shape": list(codes.shape[1:]),
            "classes": sorted(set(labels)),
        }
        storage.write_json_atomic(receipt_url(out_url), receipt)
        self.written += 1
        if self.exit_after and self.written >= self.exit_after:
            os._exit(1)  # test-only: a killed extraction (see TEST_EXIT_ENV)
        return receipt


def run(cfg: RestokConfig, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    import ray

    stage_dir = paths.stage_dir(cfg, STAGE)
    fp = stage_fingerprint(cfg, STAGE)
    tok_dir = paths.stage_dir(cfg, "train_tokenizer")
    weights = weights_name("tokenizer", bool(cfg.extract.use_ema))
    weights_url = storage.join(tok_dir, weights)
    if is_complete(stage_dir, fp):
        done = read_manifest(stage_dir)
        # Same config, but the tokenizer may have been retrained since (its fingerprint is its config).
        if not storage.exists(weights_url) or done.get("tokenizer_sha256") == storage.sha256_url(weights_url):
            return done
    prep = paths.input_manifest(cfg, "prep")
    tok_manifest = paths.input_manifest(cfg, "train_tokenizer")
    tokenizer_sha = storage.sha256_url(weights_url)
    storage.makedirs(stage_dir)
    # An old manifest must not outlive the shards it lists while they are redone.
    remove_manifest(stage_dir)
    storage.remove_stale_temporaries(stage_dir)

    jobs, expected = [], {}
    for split in cfg.extract.splits:
        urls, counts = resolve_shards(prep, split)
        expected[split] = sum(counts)
        input_sha = {e["shard"]: e.get("sha256") for e in prep["splits"][split]["shards"]}
        for url in urls:
            name = url.rsplit("/", 1)[-1]
            identity = {"fingerprint": fp, "tokenizer_sha256": tokenizer_sha, "input_sha256": input_sha[name]}
            jobs.append((split, name, url, storage.join(stage_dir, name), identity))
    todo, discarded = discard_stale(stage_dir, jobs)
    if discarded:
        line = discarded_line(f"[{STAGE}]", discarded, len(jobs), "code shards", STALE_REASONS)
        print(f"{line} (now fingerprint {fp}, tokenizer sha256 {tokenizer_sha[:12]})", flush=True)
    print(
        f"[{STAGE}] {len(jobs)} shards, {len(jobs) - len(todo)} already done; tokenizer "
        f"{weights} sha256 {tokenizer_sha[:12]}",
        flush=True,
    )

    with tracking.stage_run(cfg, STAGE, run_id, parent_run_id) as rid:
        if todo:
            connect_ray(cfg)
            use_gpu = bool(cfg.cluster.use_gpu)
            actor_cls = ray.remote(
                num_cpus=1, num_gpus=1 if use_gpu else 0, runtime_env=worker_runtime_env(cfg)
            )(CodeExtractor)
            exit_after = int(os.environ.get(TEST_EXIT_ENV, "0") or 0)
            pace_s = float(os.environ.get(TEST_SHARD_SLEEP_ENV, "0") or 0)

            def make_actor():
                return actor_cls.remote(
                    tok_dir,
                    bool(cfg.extract.use_ema),
                    int(cfg.data.image_size),
                    str(cfg.extract.augment),
                    str(cfg.extract.code_dtype),
                    int(cfg.extract.batch_size),
                    use_gpu,
                    exit_after,
                    pace_s,
                )

            # A shard whose actor is lost with its node is redone by a replacement (infra.node_loss).
            results = node_loss.map_unordered(
                make_actor,
                int(cfg.extract.num_actors),
                todo,
                lambda a, job: a.extract.remote(job[2], job[3], job[4]),
                STAGE,
            )
            for _ in progress(iterable=results, total=len(todo), desc=STAGE, unit="shard"):
                pass
            storage.remove_stale_temporaries(stage_dir)  # writes cut short by a lost node

        shards, counts, shape = [], {s: 0 for s in expected}, None
        for split, name, _, out_url, identity in jobs:
            receipt = storage.read_json(receipt_url(out_url))
            reason = stale_reason(receipt, out_url, identity)
            if reason is not None:  # another writer in the same directory
                raise RuntimeError(f"{receipt_url(out_url)}: not made by this extraction ({reason})")
            shards.append(
                {"name": name, "split": split, "count": receipt["count"], "sha256": receipt["sha256"]}
            )
            counts[split] += receipt["count"]
            shape = shape or (receipt["code_shape"] if receipt["count"] else None)
        if counts != expected:
            raise RuntimeError(f"{stage_dir}: code counts {counts} differ from the image manifest {expected}")
        tracking.log_metrics(
            paths.tracking_uri(cfg), rid, {f"codes_{s}": float(n) for s, n in counts.items()}, 0
        )
        return write_manifest(
            stage_dir,
            STAGE,
            fp,
            complete=True,
            shards=shards,
            counts=counts,
            code_shape=shape,
            dtype=str(cfg.extract.code_dtype),
            augment=str(cfg.extract.augment),
            num_views=NUM_VIEWS[str(cfg.extract.augment)],
            tokenizer_weights=weights,
            tokenizer_sha256=tokenizer_sha,
            tokenizer_config=storage.join(tok_dir, CONFIG_NAME),
            codebook_size=int(tok_manifest["codebook_size"]),
            levels=list(tok_manifest["levels"]),
            num_classes=int(prep["num_classes"]),
            mlflow_run_id=rid,
        )
