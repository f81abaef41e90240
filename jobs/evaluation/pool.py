"""The evaluation's Ray actor pool: `eval.num_actors` EvalWorker actors that load the tokenizer,
generator, feature and LPIPS networks once and keep them across the recon pass, the reference
statistics, sampling and the feature passes of one evaluation (and every point of a CFG search)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from configs.schema import RestokConfig
from infra.image_shards import image_batches
from infra.node_loss import actor_node, lost_with_its_node, start_actor
from infra.ray_connect import connect_ray, worker_runtime_env
from jobs.evaluation.features import FeatureSet, load_features
from jobs.evaluation.sampling import pick_device, sample_shards
from jobs.metrics.fid import read_npz_rows
from jobs.metrics.image_quality import psnr, ssim, to_uint8
from jobs.training.checkpoints import load_generator, load_tokenizer
from models.losses.codebook_stats import CodebookStats
from models.losses.perceptual import (
    LPIPS,
    VGG16_FILE,
    download_vgg16_state_dict,
    torchvision_vgg16_cache_path,
)

PSNR_CAP_DB = 100.0  # identical images give +inf; capped so means stay finite


def _set_threads() -> None:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


class EvalWorker:
    """One actor of the evaluation pool. Networks are loaded on first use and kept, keyed by what
    they were loaded from, so the recon pass, reference statistics, sampling and the feature passes
    of one evaluation (and every point of a CFG search) reuse the same processes and weights."""

    def __init__(self, device: str = "cpu"):
        _set_threads()
        self.device = device
        self._cache: dict = {}

    def _get(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def tokenizer(self, url: str):

        return self._get(("tokenizer", url), lambda: load_tokenizer(url, device=self.device))

    def generator(self, url: str):

        return self._get(("generator", url), lambda: load_generator(url, device=self.device))

    def feature_net(self, spec: dict):
        return self._get(("features", tuple(sorted(spec.items()))), lambda: load_features(spec, self.device))

    def lpips(self, vgg_weights: str):

        return self._get(
            ("lpips", vgg_weights),
            lambda: LPIPS("pretrained", vgg_weights_path=vgg_weights or None).to(self.device),
        )

    def features(
        self, shard_urls: list[str], spec: dict, image_size: int, batch_size: int, keep_max: int
    ) -> dict:
        """Features of image shards (samples, reference sets)."""
        net = self.feature_net(spec)
        fs = FeatureSet(net.dims, keep_max)
        keys, t0 = [], time.time()
        for batch_keys, images, labels in image_batches(shard_urls, image_size, batch_size):
            fs.update(net(images), labels)
            keys += batch_keys
        return {"features": fs, "keys": keys, "seconds": time.time() - t0}

    @staticmethod
    def _rows(parts: list[dict], dims: dict) -> dict:
        out = {
            k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, dims.get(k, 0)), np.float32)
            for k in ("pool", "spatial", "probs")
            if k in dims
        }
        out["labels"] = np.concatenate([p["labels"] for p in parts]) if parts else np.zeros(0, np.int64)
        return out

    def _batch(self, net, images: torch.Tensor, labels: torch.Tensor) -> dict:
        out = net(images)
        row = {k: out[k].float().cpu().numpy() for k in ("pool", "spatial", "probs") if k in out}
        row["labels"] = labels.cpu().numpy()
        return row

    def activations(self, shard_urls: list[str], spec: dict, image_size: int, batch_size: int) -> list[dict]:
        """Per shard, in the order given: keys, labels and float32 rows of pool, spatial (Inception
        state dict) and probs, in the shard's sample order (IS splits depend on it)."""
        net, out = self.feature_net(spec), []
        for url in shard_urls:
            keys, parts = [], []
            for batch_keys, images, labels in image_batches([url], image_size, batch_size):
                parts.append(self._batch(net, images, labels))
                keys += batch_keys
            out.append({"url": url, "keys": keys, **self._rows(parts, net.dims)})
        return out

    def array_activations(self, npz_url: str, start: int, end: int, spec: dict, batch_size: int) -> dict:
        """Activations of images [start, end) of an npz's arr_0 (uint8 NHWC, ADM's format)."""

        net, parts = self.feature_net(spec), []
        for s in range(start, end, batch_size):
            images = torch.from_numpy(read_npz_rows(npz_url, s, min(s + batch_size, end)).copy()).permute(
                0, 3, 1, 2
            )
            parts.append(self._batch(net, images, torch.full((len(images),), -1)))
        return {"start": start, **self._rows(parts, net.dims)}

    def logits_weight(self, spec: dict) -> np.ndarray | None:
        """The feature net's bias-free [2048, 1008] logits weight (Inception), else None."""
        net = self.feature_net(spec)
        return net.logits_weight().numpy() if hasattr(net, "logits_weight") else None

    @torch.inference_mode()
    def recon(
        self,
        shard_urls: list[str],
        tokenizer_url: str,
        spec: dict,
        image_size: int,
        batch_size: int,
        keep_lengths: list[int],
        lpips_weights: str,
        lpips_status: str,
        grid_images: int,
    ) -> dict:
        """Reconstruct each image of the shards once; mergeable statistics (module doc)."""

        tokenizer, net = self.tokenizer(tokenizer_url), self.feature_net(spec)
        image_size = int(getattr(tokenizer.cfg, "image_size", image_size))  # the tokenizer's own resolution
        lpips = self.lpips(lpips_weights) if lpips_status == "computed" else None
        full = tokenizer.num_tokens
        lengths = [int(k) for k in keep_lengths if 1 <= int(k) < full]
        real = FeatureSet(net.dims)
        recon = {k: FeatureSet(net.dims) for k in [full] + lengths}
        codes_hist = CodebookStats(tokenizer.codebook_size)
        sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
        keys, grid, t0 = [], {}, time.time()

        def add_to_grid(name, images):
            row = grid.setdefault(name, [])
            row.extend(images[: grid_images - len(row)].cpu().numpy())

        for batch_keys, images, labels in image_batches(shard_urls, image_size, batch_size):
            x = images.to(self.device).float() / 255.0
            zq, info = tokenizer.encode(x)
            codes_hist.update(info["codes"])
            real.update(net(images), labels)
            add_to_grid("real", images)
            for k in recon:
                out = to_uint8(tokenizer.decode(zq, keep=None if k == full else k))
                recon[k].update(net(out), labels)
                add_to_grid(k, out)
                if k == full:  # PSNR/SSIM/LPIPS of the stored (uint8) reconstruction
                    y = out.float() / 255.0
                    sums["psnr"] += float(psnr(x, y).clamp(max=PSNR_CAP_DB).sum())
                    sums["ssim"] += float(ssim(x, y).sum())
                    if lpips is not None:
                        sums["lpips"] += float(lpips(x, y).sum())
            keys += batch_keys
        return {
            "keys": keys,
            "real": real,
            "recon": recon,
            "sums": sums,
            "codes_hist": codes_hist.hist.numpy(),
            "grid": grid,
            "lpips_status": lpips_status,
            "num_tokens": full,
            "seconds": time.time() - t0,
        }

    def sample(
        self,
        shards: list[tuple[int, int, int]],
        labels: np.ndarray,
        tokenizer_url: str,
        generator_url: str,
        seed: int,
        sampler: dict,
        batch_size: int,
        out_url: str,
        fp: str,
    ) -> dict:

        return sample_shards(
            self.tokenizer(tokenizer_url),
            self.generator(generator_url),
            self.device,
            shards,
            labels,
            seed,
            sampler,
            batch_size,
            out_url,
            fp,
        )


def actor_gpus(cfg: RestokConfig) -> float:
    """GPUs each eval actor reserves: eval.gpus_per_actor (1) with cluster.use_gpu, else 0."""
    gpus = float(cfg.eval.gpus_per_actor) if bool(cfg.cluster.use_gpu) else 0.0
    if bool(cfg.cluster.use_gpu) and not 0 < gpus <= 1 and gpus != int(gpus):
        raise ValueError(f"eval.gpus_per_actor={gpus}: a fraction in (0, 1] or a whole number of GPUs")
    return gpus


class EvalPool:
    """`num_actors` EvalWorker actors (1 CPU each; with cluster.use_gpu eval.gpus_per_actor GPUs each,
    one by default, a fraction only when configured), reserved
    together in one placement group: all or nothing, so two pools (e.g. two sweep chains) never
    each hold half of a small cluster and wait on each other."""

    def __init__(self, cfg: RestokConfig, num_actors: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        connect_ray(cfg)
        use_gpu = bool(cfg.cluster.use_gpu)
        gpus = actor_gpus(cfg)
        self.group = placement_group(
            [{"CPU": 1, **({"GPU": gpus} if gpus else {})}] * num_actors, strategy="PACK"
        )
        ray.get(self.group.ready())
        remote = ray.remote(num_cpus=1, num_gpus=gpus, runtime_env=worker_runtime_env(cfg))(EvalWorker)

        def make_actor(i: int) -> Any:
            return remote.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i
                )
            ).remote(pick_device(use_gpu))

        self._make_actor = make_actor
        self.actors = [make_actor(i) for i in range(num_actors)]
        self.nodes = [actor_node(a) for a in self.actors]
        self.node_id = ray.get_runtime_context().get_node_id()

    @property
    def size(self) -> int:
        return len(self.actors)

    def alive(self) -> bool:
        import ray

        return (
            bool(self.actors)
            and ray.is_initialized()
            and ray.get_runtime_context().get_node_id() == self.node_id
        )

    def call(self, method: str, per_actor: list[tuple], *common: Any) -> list:
        """actor a runs method(*per_actor[a], *common); results in actor order."""
        import ray

        refs = [
            getattr(actor, method).remote(*args, *common)
            for actor, args in zip(self.actors, per_actor, strict=False)
        ]
        results = []
        for a, ref in enumerate(refs):
            while True:
                try:
                    results.append(ray.get(ref))
                    break
                except Exception as error:
                    # Lost with its node: a replacement in the same bundle (Ray re-places the bundle
                    # on a live node) redoes the whole share, so every image is still counted once.
                    if not lost_with_its_node(error, self.nodes[a]):
                        raise
                    print(
                        f"[evaluate] actor {a} lost with node {self.nodes[a][:12]}; its share is "
                        "redone by a replacement",
                        flush=True,
                    )
                    self.actors[a], self.nodes[a] = start_actor(lambda a=a: self._make_actor(a))
                    ref = getattr(self.actors[a], method).remote(*per_actor[a], *common)
        return results

    def map_shards(self, method: str, shards: list[str], *common: Any) -> list:
        """Shard i -> actor i % n; each shard (so each image) goes to exactly one actor."""
        return self.call(method, [(shards[a :: self.size],) for a in range(self.size)], *common)

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for actor in self.actors:
                ray.kill(actor)
            remove_placement_group(self.group)
        self.actors = []


_POOL: EvalPool | None = None


def get_pool(cfg: RestokConfig) -> EvalPool:
    """The driver's evaluation pool (created on first use, reused until close_pool)."""
    global _POOL
    n = max(1, int(cfg.eval.num_actors))
    if _POOL is None or not _POOL.alive() or _POOL.size != n:
        if _POOL is not None:
            _POOL.close()
        _POOL = EvalPool(cfg, n)
    return _POOL


_POOL_HOLDS = 0  # > 0 while a caller (e.g. a sweep) keeps the pool across several evaluations


def close_pool(force: bool = False) -> None:
    """End the pool's actors, unless held by `shared_pool()` (then the holder closes it)."""
    global _POOL
    if _POOL is not None and (force or _POOL_HOLDS == 0):
        _POOL.close()
        _POOL = None


@contextmanager
def shared_pool() -> Iterator[None]:
    """Keep one pool (its processes and loaded networks) across the evaluations inside."""
    global _POOL_HOLDS
    _POOL_HOLDS += 1
    try:
        yield
    finally:
        _POOL_HOLDS -= 1
        if _POOL_HOLDS == 0:
            close_pool()


def lpips_availability(vgg_weights: str) -> str:
    """ "computed" when the LPIPS VGG16 trunk can be had (local file, hub cache, or the download,
    which then fills the cache for the actors), else "omitted: <one line why>". Checked once in the
    driver so that offline actors do not each build a VGG16 only to fail."""

    if vgg_weights:
        path = os.path.expanduser(vgg_weights)
        return (
            "computed" if os.path.isfile(path) else f"omitted: LPIPS VGG16 trunk weights not found at {path}"
        )
    cached = torchvision_vgg16_cache_path()
    if os.path.isfile(cached):
        return "computed"
    try:
        download_vgg16_state_dict()
        return "computed"
    except Exception as error:
        return (
            f"omitted: LPIPS VGG16 trunk weights ({VGG16_FILE}) not found at {cached} and the download "
            f"failed ({type(error).__name__}); set eval.lpips_vgg_weights"
        )


def check_each_once(keys_per_actor: list[list[str]], what: str) -> int:
    """The union of the actors' keys has no repeats; returns the count."""
    all_keys = [k for keys in keys_per_actor for k in keys]
    if len(set(all_keys)) != len(all_keys):
        raise RuntimeError(f"{what}: {len(all_keys) - len(set(all_keys))} images were evaluated twice")
    return len(all_keys)


def require_all_read(read: int, expected: int, where: str, what: str, remedy: str) -> None:
    """Metrics over a short set are wrong numbers under the right names: the readers skip an
    undecodable image, so a set damaged after it was written must stop the evaluation, named."""
    if read != expected:
        raise ValueError(f"{where}: {read} of the {expected} {what} could be read (damaged shards); {remedy}")
