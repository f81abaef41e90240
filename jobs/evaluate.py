"""The evaluate stage: reconstruction and generation metrics on Ray actor pools (SPEC "Evaluation protocol").

Reconstruction (`evaluate_recon`): the val shards are dealt to `eval.num_actors` actors (shard i ->
actor i % n, each image exactly once; the driver checks the union of keys). Each actor holds the
tokenizer and the feature network, reconstructs (optionally also at kept-token lengths, paper
Fig. 5), clamps and rounds to uint8 (SPEC "rFID") and returns mergeable statistics: features of the
originals and of each reconstruction, PSNR / SSIM / LPIPS sums, the code histogram (usage, entropy
in bits, eps 1e-8) and a few images for the grid.

Generation (`evaluate_gen`): jobs.sample writes the class-interleaved sample set (PNG shards + ADM
npz); feature actors turn its shards into activations (pool, spatial; kept in sample order) and
jobs.metrics.adm computes ADM's gFID, sFID (state-dict Inception only), IS, precision and recall
over all rows against the reference (`eval.reference_stats`: ADM's VIRTUAL_imagenet256_labeled.npz
or `restok eval make-ref` output). The reference activations are computed once by the actor pool
and cached (<evaluate dir>/reference-cache/<fingerprint of the file's sha256 and the feature
config>.npz), so every later evaluation and CFG-search point reads them. rFID and gFID use
different references and are not comparable (SPEC note).

Feature networks (`eval.feature_net`): `inception` gives the real metrics (rfid, gfid, sfid,
inception_score, precision, recall); `probe` is the built-in dataset's stand-in (jobs.metrics.probe)
and its numbers are named fd_probe_*, probe_* only, never FID / IS.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from jobs.metrics.fid import (
    FeatureStats,
    ReferenceStats,
    load_reference_stats,
    save_reference_stats,
)
from jobs.sample import image_batches, pick_device, resolve_shards, split_shards
from models.losses.pretrained_weights import RANDOM_UNTRAINED
from pipeline import paths, storage, tracking

STAGE = "evaluate"
PSNR_CAP_DB = 100.0  # identical images give +inf; capped so means stay finite


# ---- feature accumulation --------------------------------------------------------------------------
class FeatureSet:
    """What one feature network saw of one image set: mergeable pool/spatial statistics, class
    probabilities (IS, class consistency) and the requested labels."""

    def __init__(self, dims: dict[str, int], keep_max: int = 0):
        self.pool = FeatureStats(dims["pool"], keep_max=keep_max)
        self.spatial = FeatureStats(dims["spatial"]) if "spatial" in dims else None
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.pool.update(out["pool"].double().cpu().numpy())
        if self.spatial is not None and "spatial" in out:
            self.spatial.update(out["spatial"].double().cpu().numpy())
        self.probs.append(out["probs"].float().cpu().numpy())
        self.labels.append(labels.cpu().numpy())

    def merge(self, other: FeatureSet) -> FeatureSet:
        self.pool.merge(other.pool)
        if self.spatial is not None and other.spatial is not None:
            self.spatial.merge(other.spatial)
        self.probs += other.probs
        self.labels += other.labels
        return self

    def probs_array(self) -> np.ndarray:
        return np.concatenate(self.probs) if self.probs else np.zeros((0, 1))

    def labels_array(self) -> np.ndarray:
        return np.concatenate(self.labels) if self.labels else np.zeros((0,), np.int64)


def feature_spec(cfg: Any, probe_path: str = "") -> dict:
    return {"kind": str(cfg.eval.feature_net), "weights": str(cfg.eval.inception_weights), "probe_path": probe_path,
            "resize": str(cfg.eval.inception_resize)}


def load_features(spec: dict, device: str):
    from jobs.metrics.inception import load_feature_net

    return load_feature_net(spec["kind"], spec.get("weights", ""), device, spec.get("probe_path") or None,
                            resize=spec.get("resize", "tf1"))


FEATURE_VERSION = 2  # bump when feature extraction changes (invalidates cached activations)
_SHA_MEMO: dict[tuple, str] = {}


def file_sha256(url: str) -> str:
    """sha256 of a file, memoised per (url, size, mtime) so a CFG search hashes a reference once."""
    fs, path = storage.filesystem(url)
    info = fs.info(path)
    key = (url, info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("created"))
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = storage.sha256_url(url)
    return _SHA_MEMO[key]


def feature_fingerprint(spec: dict) -> str:
    """What made a set of activations: network kind, its weights' hash, the resize."""
    from pipeline.manifest import fingerprint

    weights = spec.get("probe_path") if spec["kind"] == "probe" else spec.get("weights")
    # A seeded random network (tests) is named, not hashed.
    digest = weights if weights == RANDOM_UNTRAINED else file_sha256(weights) if weights else ""
    return fingerprint({"kind": spec["kind"], "weights_sha256": digest,
                        "resize": spec.get("resize", "tf1") if spec["kind"] == "inception" else "",
                        "version": FEATURE_VERSION})


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
        from jobs.checkpoints import load_tokenizer

        return self._get(("tokenizer", url), lambda: load_tokenizer(url, device=self.device))

    def generator(self, url: str):
        from jobs.checkpoints import load_generator

        return self._get(("generator", url), lambda: load_generator(url, device=self.device))

    def feature_net(self, spec: dict):
        return self._get(("features", tuple(sorted(spec.items()))), lambda: load_features(spec, self.device))

    def lpips(self, vgg_weights: str):
        from models.losses.perceptual import LPIPS

        return self._get(("lpips", vgg_weights), lambda: LPIPS("pretrained", vgg_weights_path=vgg_weights or None).to(self.device))

    def features(self, shard_urls: list[str], spec: dict, image_size: int, batch_size: int, keep_max: int) -> dict:
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
        out = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, dims.get(k, 0)), np.float32)
               for k in ("pool", "spatial", "probs") if k in dims}
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
        from jobs.metrics.fid import read_npz_rows

        net, parts = self.feature_net(spec), []
        for s in range(start, end, batch_size):
            images = torch.from_numpy(read_npz_rows(npz_url, s, min(s + batch_size, end)).copy()).permute(0, 3, 1, 2)
            parts.append(self._batch(net, images, torch.full((len(images),), -1)))
        return {"start": start, **self._rows(parts, net.dims)}

    def logits_weight(self, spec: dict) -> np.ndarray | None:
        """The feature net's bias-free [2048, 1008] logits weight (Inception), else None."""
        net = self.feature_net(spec)
        return net.logits_weight().numpy() if hasattr(net, "logits_weight") else None

    @torch.inference_mode()
    def recon(self, shard_urls: list[str], tokenizer_url: str, spec: dict, image_size: int, batch_size: int,
              keep_lengths: list[int], lpips_weights: str, lpips_status: str, grid_images: int) -> dict:
        """Reconstruct each image of the shards once; mergeable statistics (module doc)."""
        from jobs.metrics.image_quality import psnr, ssim, to_uint8
        from models.losses.codebook_stats import CodebookStats

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
        return {"keys": keys, "real": real, "recon": recon, "sums": sums, "codes_hist": codes_hist.hist.numpy(),
                "grid": grid, "lpips_status": lpips_status, "num_tokens": full, "seconds": time.time() - t0}

    def sample(self, shards: list[tuple[int, int, int]], labels: np.ndarray, tokenizer_url: str,
               generator_url: str, seed: int, sampler: dict, batch_size: int, out_url: str, fp: str) -> dict:
        from jobs.sample import sample_shards

        return sample_shards(self.tokenizer(tokenizer_url), self.generator(generator_url), self.device, shards,
                             labels, seed, sampler, batch_size, out_url, fp)


def actor_gpus(cfg: Any) -> float:
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

    def __init__(self, cfg: Any, num_actors: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from jobs.node_loss import actor_node
        from jobs.ray_training import ensure_ray

        ensure_ray(cfg)
        use_gpu = bool(cfg.cluster.use_gpu)
        gpus = actor_gpus(cfg)
        self.group = placement_group([{"CPU": 1, **({"GPU": gpus} if gpus else {})}] * num_actors, strategy="PACK")
        ray.get(self.group.ready())
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(EvalWorker)

        def make_actor(i: int) -> Any:
            return remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=i)).remote(pick_device(use_gpu))

        self._make_actor = make_actor
        self.actors = [make_actor(i) for i in range(num_actors)]
        self.nodes = [actor_node(a) for a in self.actors]
        self.node_id = ray.get_runtime_context().get_node_id()

    @property
    def size(self) -> int:
        return len(self.actors)

    def alive(self) -> bool:
        import ray

        return bool(self.actors) and ray.is_initialized() and ray.get_runtime_context().get_node_id() == self.node_id

    def call(self, method: str, per_actor: list[tuple], *common: Any) -> list:
        """actor a runs method(*per_actor[a], *common); results in actor order."""
        import ray

        from jobs.node_loss import lost_with_its_node, start_actor

        refs = [getattr(actor, method).remote(*args, *common) for actor, args in zip(self.actors, per_actor)]
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
                    print(f"[evaluate] actor {a} lost with node {self.nodes[a][:12]}; its share is "
                          "redone by a replacement", flush=True)
                    self.actors[a], self.nodes[a] = start_actor(lambda a=a: self._make_actor(a))
                    ref = getattr(self.actors[a], method).remote(*per_actor[a], *common)
        return results

    def map_shards(self, method: str, shards: list[str], *common: Any) -> list:
        """Shard i -> actor i % n; each shard (so each image) goes to exactly one actor."""
        return self.call(method, [(shards[a::self.size],) for a in range(self.size)], *common)

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for actor in self.actors:
                ray.kill(actor)
            remove_placement_group(self.group)
        self.actors = []


_POOL: EvalPool | None = None


def get_pool(cfg: Any) -> EvalPool:
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
    """"computed" when the LPIPS VGG16 trunk can be had (local file, hub cache, or the download,
    which then fills the cache for the actors), else "omitted: <one line why>". Checked once in the
    driver so that offline actors do not each build a VGG16 only to fail."""
    from models.losses.perceptual import VGG16_FILE, torchvision_vgg16_cache_path

    if vgg_weights:
        path = os.path.expanduser(vgg_weights)
        return "computed" if os.path.isfile(path) else f"omitted: LPIPS VGG16 trunk weights not found at {path}"
    cached = torchvision_vgg16_cache_path()
    if os.path.isfile(cached):
        return "computed"
    try:
        from torchvision.models import VGG16_Weights

        VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        return "computed"
    except Exception as error:
        return (f"omitted: LPIPS VGG16 trunk weights ({VGG16_FILE}) not found at {cached} and the download "
                f"failed ({type(error).__name__}); set eval.lpips_vgg_weights")


def check_each_once(keys_per_actor: list[list[str]], what: str) -> int:
    """The union of the actors' keys has no repeats; returns the count."""
    all_keys = [k for keys in keys_per_actor for k in keys]
    if len(set(all_keys)) != len(all_keys):
        raise RuntimeError(f"{what}: {len(all_keys) - len(set(all_keys))} images were evaluated twice")
    return len(all_keys)


# ---- metric naming ---------------------------------------------------------------------------------
def inception_suffix(kind: str, weights: str = "") -> str:
    """'_random_untrained' on every number of a random-untrained Inception (never plain FID/IS)."""
    return "_random_untrained" if kind == "inception" and weights == RANDOM_UNTRAINED else ""


def feature_net_tag(spec: dict) -> str:
    """What made a set of features: inception | inception-random-untrained | probe."""
    return spec["kind"] + ("-" + RANDOM_UNTRAINED if inception_suffix(spec["kind"], spec.get("weights", "")) else "")


def distance_name(kind: str, which: str, weights: str = "") -> str:
    """rfid / gfid with Inception (rfid_random_untrained / gfid_random_untrained with random
    weights); fd_probe_recon / fd_probe_gen with the probe (never *fid)."""
    if kind == "inception":
        return {"recon": "rfid", "gen": "gfid"}[which] + inception_suffix(kind, weights)
    return f"fd_probe_{which}"


# ---- probe stand-in --------------------------------------------------------------------------------
def load_split_arrays(cfg: Any, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for _, x, y in image_batches(split_shards(paths.shards_url(cfg), split), int(cfg.data.image_size), 256):
        images.append(x.permute(0, 2, 3, 1).numpy())
        labels.append(y.numpy())
        if sum(len(a) for a in images) >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def ensure_probe_for(cfg: Any) -> dict:
    """Train (or reuse) the probe on the prep train split; cached in <evaluate dir>/probe."""
    from jobs.metrics.probe import ensure_probe

    x, y = load_split_arrays(cfg, "train", int(cfg.eval.probe_max_train_images))
    xv, yv = load_split_arrays(cfg, "val", int(cfg.eval.probe_max_train_images))
    prep = storage.read_json(storage.join(paths.shards_url(cfg), "manifest.json")) or {}
    num_classes = int(prep.get("num_classes") or max(y.max(), yv.max()) + 1)
    cache = str(cfg.eval.probe_cache) or storage.join(paths.stage_dir(cfg, STAGE), "probe")
    manifest = ensure_probe(cache, x, y, num_classes,
                            int(cfg.data.image_size), xv, yv, steps=int(cfg.eval.probe_steps), seed=int(cfg.seed))
    print(f"[evaluate] probe {manifest['key']} ({'cached' if manifest['cached'] else 'trained'}): "
          f"val accuracy {manifest.get('val_accuracy', float('nan')):.3f}", flush=True)
    return manifest


def resolved_feature_spec(cfg: Any) -> tuple[dict, dict]:
    """(feature spec for the actors, probe manifest or {})."""
    if str(cfg.eval.feature_net) == "probe":
        probe = ensure_probe_for(cfg)
        return feature_spec(cfg, probe["path"]), probe
    if str(cfg.eval.feature_net) != "inception":
        raise ValueError(f"eval.feature_net={cfg.eval.feature_net!r}; valid: ['inception', 'probe']")
    from jobs.metrics.inception import resolve_weights

    if str(cfg.eval.inception_weights) == RANDOM_UNTRAINED:
        print(f"[evaluate] WARNING: eval.inception_weights={RANDOM_UNTRAINED} (test mode): Inception "
              "numbers are logged with a _random_untrained suffix, not as FID/IS", flush=True)
        return feature_spec(cfg), {}
    # Resolved (and downloaded when online) once in the driver: a missing file is one line here,
    # not a traceback from every actor.
    return {**feature_spec(cfg), "weights": resolve_weights(str(cfg.eval.inception_weights))}, {}


# ---- reconstruction --------------------------------------------------------------------------------
def split_count(cfg: Any, split: str) -> int | None:
    """Images of `split` according to the prep manifest (None when it does not say)."""
    manifest = storage.read_json(storage.join(paths.shards_url(cfg), "manifest.json")) or {}
    entries = manifest.get("splits", {}).get(split, {}).get("shards")
    return sum(int(e["count"]) for e in entries) if entries else None


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """uint8 CHW images, one list per row -> one HWC uint8 grid with 2 px gaps."""
    rows = [r for r in rows if r]
    _, h, w = rows[0][0].shape
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[i * (h + 2): i * (h + 2) + h, j * (w + 2): j * (w + 2) + w] = np.transpose(img, (1, 2, 0))
    return out


def evaluate_recon(cfg: Any, run_id: str | None, tokenizer_url: str | None = None,
                   spec: dict | None = None, probe: dict | None = None) -> dict:
    """Reconstruction metrics of the val split; logs them (and a grid, and the Fig. 5 curve) to run_id."""
    from jobs.metrics.inception_score import inception_score
    from models.losses.codebook_stats import codebook_entropy_bits, codebook_usage

    tokenizer_url = tokenizer_url or paths.stage_dir(cfg, "train_tokenizer")
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    shards = split_shards(paths.shards_url(cfg), "val")
    t0 = time.time()
    lpips_status = lpips_availability(str(cfg.eval.lpips_vgg_weights))
    results = get_pool(cfg).map_shards("recon", shards, tokenizer_url, spec, int(cfg.data.image_size),
                                       int(cfg.eval.batch_size), list(cfg.eval.keep_lengths),
                                       str(cfg.eval.lpips_vgg_weights), lpips_status, int(cfg.eval.grid_images))
    seconds = time.time() - t0
    count = check_each_once([r["keys"] for r in results], "reconstruction evaluation")
    expected = split_count(cfg, "val")
    if expected is not None and count != expected:  # prep already dropped corrupt images
        print(f"[evaluate] WARNING: reconstructed {count} val images, the prep manifest lists {expected}", flush=True)
    real, recon = results[0]["real"], results[0]["recon"]
    hist = results[0]["codes_hist"].copy()
    sums = dict(results[0]["sums"])
    for r in results[1:]:
        real.merge(r["real"])
        for k in recon:
            recon[k].merge(r["recon"][k])
        hist += r["codes_hist"]
        for k in sums:
            sums[k] += r["sums"][k]
    kind, full = spec["kind"], results[0]["num_tokens"]
    name = distance_name(kind, "recon", spec.get("weights", ""))
    sfx = inception_suffix(kind, spec.get("weights", ""))
    mu, sigma = real.pool.mean_cov()
    metrics = {name: recon[full].pool.distance_to(mu, sigma),
               "psnr": sums["psnr"] / count, "ssim": sums["ssim"] / count,
               "codebook_usage": codebook_usage(torch.from_numpy(hist)),
               "codebook_entropy_bits": codebook_entropy_bits(torch.from_numpy(hist)),
               "recon_images_per_second": count / max(seconds, 1e-9)}
    if lpips_status == "computed":
        metrics["lpips"] = sums["lpips"] / count
    curve = {}
    for k in sorted(recon):
        curve[k] = recon[k].pool.distance_to(mu, sigma)
        if k != full:
            metrics[f"{name}_keep{k}"] = curve[k]
    if kind == "inception":
        metrics["recon_inception_score" + sfx] = inception_score(recon[full].probs_array())[0]
    else:
        probs, labels = recon[full].probs_array(), recon[full].labels_array()
        metrics["probe_recon_class_consistency"] = float((probs.argmax(1) == labels).mean())
        metrics["probe_val_accuracy"] = float(probe.get("val_accuracy", float("nan")))
    grid_rows = [results[0]["grid"].get("real", [])] + [results[0]["grid"].get(k, []) for k in sorted(recon, reverse=True)]
    report = {"metrics": metrics, "num_images": count, "expected_images": expected,
              "num_actors": len(results), "num_shards": len(shards),
              "images_per_actor": [len(r["keys"]) for r in results], "lpips": lpips_status,
              "feature_net": kind, "curve": {str(k): v for k, v in curve.items()}, "seconds": round(seconds, 2),
              "probe": {k: probe[k] for k in ("key", "val_accuracy", "path") if k in probe} if probe else None}
    if run_id:
        uri = paths.tracking_uri(cfg)
        tracking.log_metrics(uri, run_id, metrics)
        for k, v in curve.items():  # paper Fig. 5: distance vs kept tokens, one step per length
            tracking.log_metrics(uri, run_id, {f"{name}_by_kept_tokens": v}, step=k)
        tracking.log_image(uri, run_id, _grid(grid_rows), "recon_grid.png")
        tracking.log_dict(uri, run_id, report, "recon_eval.json")
        client = tracking.client_for(uri)
        client.set_tag(run_id, "restok.lpips", lpips_status[:5000])
        if len(curve) > 1:
            tracking.log_figure(uri, run_id, _curve_figure(curve, name), "recon_vs_kept_tokens.png")
    print(f"[evaluate] recon: {count} images on {len(results)} actors in {seconds:.1f}s: "
          + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f"; LPIPS {lpips_status.split(';')[0]}", flush=True)
    return report


def _curve_figure(curve: dict, name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ks = sorted(curve)
    ax.plot(ks, [curve[k] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("kept tokens")
    ax.set_ylabel(name)
    fig.tight_layout()
    return fig


# ---- references ------------------------------------------------------------------------------------
REFERENCE_PASSES = 0  # reference activation passes of the actor pool in this process (tests count them)
_REFERENCE_MEMO: dict[tuple, dict] = {}


def _count_reference_pass(what: str) -> None:
    global REFERENCE_PASSES
    REFERENCE_PASSES += 1
    print(f"[evaluate] reference features: computing {what} on the actor pool (pass {REFERENCE_PASSES})", flush=True)


def feature_config(cfg: Any, spec: dict) -> str:
    """Fingerprint of everything that shapes a reference's activations besides its images."""
    from pipeline.manifest import fingerprint

    return fingerprint({"features": feature_fingerprint(spec), "image_size": int(cfg.data.image_size)})


def shard_activations(cfg: Any, shards: list[str], spec: dict, what: str) -> dict:
    """Activations of image shards on the pool, concatenated in shard order (each image once)."""
    results = get_pool(cfg).map_shards("activations", shards, spec, int(cfg.data.image_size), int(cfg.eval.batch_size))
    by_url = {part["url"]: part for parts in results for part in parts}
    parts = [by_url[u] for u in shards]
    count = check_each_once([p["keys"] for p in parts], what)
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("pool", "spatial", "probs", "labels") if k in parts[0]}
    out["count"], out["num_actors"] = count, len(results)
    return out


def array_activations(cfg: Any, npz_url: str, count: int, spec: dict) -> dict:
    """Activations of an ADM batch's arr_0 rows, split into one contiguous range per actor."""
    pool = get_pool(cfg)
    bounds = np.linspace(0, count, pool.size + 1).round().astype(int)
    results = pool.call("array_activations", [(npz_url, int(bounds[a]), int(bounds[a + 1])) for a in range(pool.size)],
                        spec, int(cfg.eval.batch_size))
    results.sort(key=lambda r: r["start"])
    return {k: np.concatenate([r[k] for r in results]) for k in ("pool", "spatial") if k in results[0]}


def compute_reference(cfg: Any, shards: list[str], spec: dict) -> ReferenceStats:
    """Reference statistics and all pool rows of image shards (ADM: precision/recall use every row)."""
    from jobs.metrics.adm import mean_cov

    _count_reference_pass(f"{len(shards)} shards")
    acts = shard_activations(cfg, shards, spec, "reference statistics")
    mu, sigma = mean_cov(acts["pool"])
    ref = ReferenceStats(mu=mu, sigma=sigma, feature_net=feature_net_tag(spec), num_images=acts["count"],
                         features=acts["pool"], feature_config=feature_config(cfg, spec))
    if "spatial" in acts:
        ref.mu_s, ref.sigma_s = mean_cov(acts["spatial"])
    return ref


def default_reference_url(cfg: Any, spec: dict, probe: dict) -> str:
    tag = feature_net_tag(spec) if spec["kind"] == "inception" else f"probe-{probe.get('key', 'unknown')}"
    return storage.join(paths.stage_dir(cfg, STAGE), f"reference-{tag}-{cfg.eval.reference_split}.npz")


def make_reference(cfg: Any, out_url: str = "", spec: dict | None = None, probe: dict | None = None) -> str:
    """`restok eval make-ref`: mu, sigma (+ spatial), all pool rows and the feature config of any image shards."""
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    shards = (resolve_shards(str(cfg.eval.reference_shards)) if cfg.eval.reference_shards
              else split_shards(paths.shards_url(cfg), str(cfg.eval.reference_split)))
    out_url = out_url or str(cfg.eval.reference_out) or default_reference_url(cfg, spec, probe or {})
    ref = compute_reference(cfg, shards, spec)
    save_reference_stats(out_url, ref)
    print(f"[evaluate] reference statistics of {ref.num_images} images ({spec['kind']}) -> {out_url}", flush=True)
    return out_url


def reference_for_gen(cfg: Any, spec: dict, probe: dict) -> tuple[dict, str]:
    """The reference for generation metrics: ({pool, spatial, stats, num_images}, url).

    eval.reference_stats, or with the probe and none configured the prep split's (made once, remade
    when its feature config differs). Our make-ref files carry their pool rows; an ADM batch's
    images are turned into activations by the actor pool once per (file sha256, feature config) and
    cached under <evaluate dir>/reference-cache; in-process memo for the points of a CFG search."""
    url = str(cfg.eval.reference_stats)
    want = feature_config(cfg, spec)
    random_inception = bool(inception_suffix(spec["kind"], spec.get("weights", "")))
    if not url and (spec["kind"] == "probe" or random_inception):
        # No published reference exists for these networks: the prep train split's (cached).
        url = default_reference_url(cfg, spec, probe)
        if not storage.exists(url) or load_reference_stats(url).feature_config != want:
            make_reference(cfg, url, spec, probe)
    memo_key = (file_sha256(url) if url and storage.exists(url) else url, want)
    if memo_key in _REFERENCE_MEMO:
        return _REFERENCE_MEMO[memo_key], url
    ref = load_reference_stats(url)
    expected = feature_net_tag(spec)
    # Real Inception references (ours: "inception", ADM's: "inception-adm") are interchangeable.
    same = (ref.feature_net == expected if expected != "inception"
            else ref.feature_net not in ("probe", "inception-" + RANDOM_UNTRAINED))
    if ref.mu is not None and not same:
        raise ValueError(f"{url}: reference made with feature net {ref.feature_net!r}, evaluation uses {expected!r}")
    if ref.feature_config and ref.feature_config != want:
        raise ValueError(f"{url}: reference made with feature config {ref.feature_config}, this evaluation's is "
                         f"{want} (other weights, resize or image size); remake it with `restok eval make-ref`")
    stats = {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s}
    out = {"pool": ref.features, "spatial": None, "stats": stats, "num_images": ref.num_images}
    if ref.features is None and ref.has_images:
        out.update(_cached_array_activations(cfg, url, ref.num_images, spec, want))
    _REFERENCE_MEMO[memo_key] = out
    return out, url


def _cached_array_activations(cfg: Any, url: str, count: int, spec: dict, want: str) -> dict:
    import io

    from pipeline.manifest import fingerprint

    key = fingerprint({"reference_sha256": file_sha256(url), "feature_config": want})
    cache = storage.join(paths.stage_dir(cfg, STAGE), "reference-cache", f"{key}.npz")
    if storage.exists(cache):
        fs, path = storage.filesystem(cache)
        with fs.open(path, "rb") as fh:
            data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
            if str(data["fingerprint"]) == key:
                return {"pool": data["pool"], "spatial": data["spatial"] if "spatial" in data.files else None}
    _count_reference_pass(f"{count} images of {url}")
    acts = array_activations(cfg, url, count, spec)
    buf = io.BytesIO()
    np.savez(buf, fingerprint=np.array(key), **acts)
    storage.makedirs(storage.join(paths.stage_dir(cfg, STAGE), "reference-cache"))
    storage.write_bytes_atomic(cache, buf.getvalue())
    return {"pool": acts["pool"], "spatial": acts.get("spatial")}


# ---- generation ------------------------------------------------------------------------------------
def gen_metrics(cfg: Any, spec: dict, ref: dict, acts: dict, probe: dict | None) -> tuple[dict, dict]:
    """(metrics, notes) from sample activations and the reference via jobs.metrics.adm."""
    from jobs.metrics.adm import frechet_distance, inception_score, mean_cov, scores

    kind, notes = spec["kind"], {}
    device = pick_device(bool(cfg.cluster.use_gpu))
    name = distance_name(kind, "gen", spec.get("weights", ""))
    sfx = inception_suffix(kind, spec.get("weights", ""))  # never a random network's number as IS
    weight = get_pool(cfg).call("logits_weight", [(spec,)])[0] if kind == "inception" else None
    if ref["pool"] is None:  # statistics-only file: no precision/recall
        s = {"fid": frechet_distance(*mean_cov(acts["pool"]), ref["stats"]["mu"], ref["stats"]["sigma"])}
        if "spatial" in acts and ref["stats"].get("mu_s") is not None:
            s["sfid"] = frechet_distance(*mean_cov(acts["spatial"]), ref["stats"]["mu_s"], ref["stats"]["sigma_s"])
        if weight is not None:
            s["inception_score"] = inception_score(acts["pool"], weight)
        notes["precision_recall"] = "not computed: the reference file has neither feature rows nor images"
    elif kind == "inception":
        s = scores(ref["pool"], ref["spatial"], acts["pool"], acts.get("spatial"), weight,
                   ref_stats=ref["stats"], device=device)
    else:
        s = scores(ref["pool"], None, acts["pool"], None, None, ref_stats=ref["stats"], device=device)
        s["probe_precision"], s["probe_recall"] = s.pop("precision"), s.pop("recall")
    metrics = {name: s.pop("fid")}
    if kind == "inception":
        metrics.update({k + sfx: v for k, v in s.items()})
        if "sfid" not in s:
            notes["sfid"] = ("not computed: " + ("the TorchScript Inception exposes no mixed_6/conv features"
                                                 if "spatial" not in acts else "the reference has no mu_s/sigma_s"))
    else:
        metrics.update({k: v for k, v in s.items() if k.startswith("probe_")})
        metrics["probe_class_consistency"] = float((acts["probs"].argmax(1) == acts["labels"]).mean())
        metrics["probe_val_accuracy"] = float((probe or {}).get("val_accuracy", float("nan")))
    return metrics, notes


def evaluate_gen(cfg: Any, run_id: str | None, tokenizer_url: str | None = None,
                 generator_url: str | None = None, sampling: Any | None = None, spec: dict | None = None,
                 probe: dict | None = None, step: int | None = None, log_prefix: str = "") -> dict:
    """Sample (jobs.sample), then generation metrics against the reference; logged to run_id."""
    from jobs.sample import generate_samples, samples_url

    tokenizer_url = tokenizer_url or paths.stage_dir(cfg, "train_tokenizer")
    generator_url = generator_url or paths.stage_dir(cfg, "train_generator")
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    ref, ref_url = reference_for_gen(cfg, spec, probe or {})
    default_models = (generator_url == paths.stage_dir(cfg, "train_generator")
                      and tokenizer_url == paths.stage_dir(cfg, "train_tokenizer"))
    out_url = samples_url(cfg, sampling) if default_models else _samples_url_for(cfg, tokenizer_url, generator_url, sampling)
    samples = generate_samples(cfg, out_url, tokenizer_url, generator_url, sampling)
    shards = [storage.join(out_url, n) for n in samples["shards"]]
    t0 = time.time()
    acts = shard_activations(cfg, shards, spec, "generation evaluation")
    metrics, notes = gen_metrics(cfg, spec, ref, acts, probe)
    metrics["sample_images_per_second"] = samples["images_per_second"]
    kind = spec["kind"]
    seconds = time.time() - t0
    report = {"metrics": metrics, "num_samples": acts["count"], "num_actors": acts["num_actors"], "reference": ref_url,
              "samples": out_url, "notes": notes, "feature_net": kind, "seconds": round(seconds, 2)}
    if run_id:
        uri = paths.tracking_uri(cfg)
        tracking.log_metrics(uri, run_id, {f"{log_prefix}{k}": v for k, v in metrics.items()}, step=step)
        if step is None:
            tracking.log_dict(uri, run_id, report, "gen_eval.json")
            tracking.log_image(uri, run_id, _sample_grid(shards, cfg), "sample_grid.png")
            for k, v in notes.items():
                tracking.client_for(uri).set_tag(run_id, f"restok.{k}", v[:5000])
    print(f"[evaluate] gen: {acts['count']} samples on {acts['num_actors']} actors: "
          + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
          + "".join(f"; {k} {v}" for k, v in notes.items()), flush=True)
    return report


def _samples_url_for(cfg: Any, tokenizer_url: str, generator_url: str, sampling: Any) -> str:
    """Sample sets of explicitly named checkpoints live under a hash of what produced them."""
    from omegaconf import OmegaConf

    from jobs.sample import SAMPLING_PROTOCOL
    from pipeline.manifest import fingerprint

    sampling = sampling if sampling is not None else cfg.sampling
    key = fingerprint({"tokenizer": tokenizer_url, "generator": generator_url,
                       "sampling": OmegaConf.to_container(sampling) if OmegaConf.is_config(sampling) else sampling,
                       "per_class": int(cfg.eval.num_samples_per_class),
                       "samples_per_shard": int(cfg.eval.samples_per_shard), "protocol": SAMPLING_PROTOCOL})
    return storage.join(paths.stage_dir(cfg, STAGE), "samples", key)


def _sample_grid(shards: list[str], cfg: Any) -> np.ndarray:
    n = int(cfg.eval.grid_images)
    rows: list[list[np.ndarray]] = [[]]
    for _, images, _ in image_batches(shards[:1], int(cfg.data.image_size), n * n):
        imgs = list(images.numpy())
        rows = [imgs[i:i + n] for i in range(0, len(imgs), n)]
        break
    return _grid(rows)


# ---- CFG search ------------------------------------------------------------------------------------
def cfg_search(cfg: Any, run_id: str | None, tokenizer_url: str | None = None,
               generator_url: str | None = None, spec: dict | None = None, probe: dict | None = None) -> dict:
    """Sweep eval.cfg_search_scales x eval.cfg_search_start_ratios (paper App. A.3: the best CFG
    schedule per checkpoint); each point is a child run and a metric step of `run_id`; keeps the best."""
    from omegaconf import OmegaConf

    scales = list(cfg.eval.cfg_search_scales) or [float(cfg.sampling.cfg_scale)]
    ratios = list(cfg.eval.cfg_search_start_ratios) or [float(cfg.sampling.cfg_start_ratio)]
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    name = distance_name(spec["kind"], "gen", spec.get("weights", ""))
    points = []
    for i, (scale, ratio) in enumerate((s, r) for s in scales for r in ratios):
        sampling = OmegaConf.merge(cfg.sampling, {"cfg_scale": float(scale), "cfg_start_ratio": float(ratio)})
        child = tracking.start_run(cfg, STAGE, parent_run_id=run_id, extra_tags={
            "restok.cfg_search": "point", "mlflow.runName": f"cfg s={scale} start={ratio}"}) if run_id else None
        try:
            report = evaluate_gen(cfg, child, tokenizer_url, generator_url, sampling, spec, probe)
        except BaseException:
            if child:
                tracking.end_run(cfg, child, "FAILED")
            raise
        if child:
            tracking.end_run(cfg, child)
            tracking.log_metrics(paths.tracking_uri(cfg), run_id, {
                "cfg_search_scale": scale, "cfg_search_start_ratio": ratio,
                f"cfg_search_{name}": report["metrics"][name]}, step=i)
        points.append({"cfg_scale": float(scale), "cfg_start_ratio": float(ratio), **report["metrics"],
                       "child_run_id": child})
    best = min(points, key=lambda p: p[name])
    if run_id:
        tracking.log_metrics(paths.tracking_uri(cfg), run_id, {
            f"best_{name}": best[name], "best_cfg_scale": best["cfg_scale"],
            "best_cfg_start_ratio": best["cfg_start_ratio"]})
        tracking.log_dict(paths.tracking_uri(cfg), run_id, {"points": points, "best": best}, "cfg_search.json")
    print(f"[evaluate] cfg search: best {name}={best[name]:.4g} at scale {best['cfg_scale']}, "
          f"start {best['cfg_start_ratio']} ({len(points)} points)", flush=True)
    return {"points": points, "best": best, "metric": name}


# ---- stage entry points ----------------------------------------------------------------------------
def run(cfg: Any, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """The evaluate stage: recon and/or gen per cfg.eval (+ CFG search when its lists are set)."""
    from pipeline.manifest import (
        is_complete,
        read_manifest,
        require_complete,
        write_manifest,
    )
    from pipeline.stages import stage_fingerprint

    stage_dir = paths.stage_dir(cfg, STAGE)
    fp = stage_fingerprint(cfg, STAGE)
    if is_complete(stage_dir, fp):
        print(f"[evaluate] complete with fingerprint {fp}: skipped", flush=True)
        return read_manifest(stage_dir)
    require_complete(paths.stage_dir(cfg, "prep"), "prep")
    require_complete(paths.stage_dir(cfg, "train_tokenizer"), "train_tokenizer")
    if cfg.eval.gen:
        require_complete(paths.stage_dir(cfg, "train_generator"), "train_generator")
    storage.makedirs(stage_dir)
    storage.remove_stale_temporaries(stage_dir)
    fields: dict[str, Any] = {}
    try:
        fields = _run_evaluations(cfg, run_id, parent_run_id, stage_dir)
    finally:
        close_pool()
    metrics = {**fields.get("recon", {}).get("metrics", {}), **fields.get("gen", {}).get("metrics", {})}
    return write_manifest(stage_dir, STAGE, fp, complete=True, metrics=metrics, **fields)


def _run_evaluations(cfg: Any, run_id: str | None, parent_run_id: str | None, stage_dir: str) -> dict:
    fields: dict[str, Any] = {}
    with tracking.stage_run(cfg, STAGE, run_id, parent_run_id) as rid:
        spec, probe = resolved_feature_spec(cfg)
        if probe:
            fields["probe"] = {k: probe[k] for k in ("key", "val_accuracy", "num_train_images") if k in probe}
            fields["probe"]["path"] = os.path.relpath(probe["path"], stage_dir) if "://" not in probe["path"] else probe["path"]
        if cfg.eval.recon:
            fields["recon"] = evaluate_recon(cfg, rid, spec=spec, probe=probe)
        if cfg.eval.gen:
            if list(cfg.eval.cfg_search_scales) or list(cfg.eval.cfg_search_start_ratios):
                fields["cfg_search"] = cfg_search(cfg, rid, spec=spec, probe=probe)
            fields["gen"] = evaluate_gen(cfg, rid, spec=spec, probe=probe)
        fields["run_id"] = rid
    return fields


def score_files(cfg: Any, ref_url: str, samples_url: str) -> dict:
    """`restok eval score REF.npz SAMPLES.npz`: ADM's evaluator (evaluations/evaluator.py) in our
    environment. Inputs in its format: arr_0 uint8 NHWC images; the reference's mu, sigma, mu_s,
    sigma_s are used when present. Always the Inception network (eval.inception_weights,
    eval.inception_resize). Prints ADM's five lines and logs them to an `evaluate` MLflow run."""
    from jobs.metrics.fid import npz_array_shape
    from jobs.metrics.inception import resolve_weights

    for url in (ref_url, samples_url):
        if not storage.exists(url):
            raise FileNotFoundError(f"restok eval score: no such file {url}")
    shape = npz_array_shape(samples_url)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{samples_url}: needs arr_0 uint8 images [N, H, W, 3] (ADM's sample batch format), got {shape}")
    spec = {**feature_spec(cfg), "kind": "inception", "weights": resolve_weights(str(cfg.eval.inception_weights))}
    cfg.eval.reference_stats = ref_url
    t0 = time.time()
    ref, _ = reference_for_gen(cfg, spec, {})
    acts = array_activations(cfg, samples_url, shape[0], spec)
    metrics, notes = gen_metrics(cfg, spec, ref, acts, None)
    from pipeline.console import say

    for label, key in (("Inception Score", "inception_score"), ("FID", "gfid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")):  # ADM's lines, on the terminal
        say(f"{label}: {metrics[key]}" if key in metrics else f"{label}: {notes.get(key, 'not computed')}")
    with tracking.stage_run(cfg, STAGE) as rid:
        uri = paths.tracking_uri(cfg)
        tracking.log_metrics(uri, rid, metrics)
        client = tracking.client_for(uri)
        client.set_tag(rid, "restok.eval_score.reference", ref_url)
        client.set_tag(rid, "restok.eval_score.samples", samples_url)
    return {"metrics": metrics, "notes": notes, "num_samples": shape[0], "seconds": round(time.time() - t0, 2),
            "run_id": rid}


def cli(action: str, cfg: Any, files: list[str] | None = None) -> int:
    """`restok eval recon|gen|all|make-ref|cfg-search`, `restok eval score REF.npz SAMPLES.npz`."""
    actions = ("recon", "gen", "all", "make-ref", "cfg-search", "score")
    if action not in actions:
        raise ValueError(f"unknown eval action {action!r}; valid: {list(actions)}")
    if action == "score":
        if not files or len(files) != 2:
            raise ValueError("usage: restok eval score REF.npz SAMPLES.npz [preset] [key=value ...]")
        try:
            score_files(cfg, *files)
        finally:
            close_pool()
        return 0
    if action == "all":
        run(cfg)
        return 0
    try:
        if action == "make-ref":
            make_reference(cfg)
            return 0
        with tracking.stage_run(cfg, STAGE) as rid:
            {"recon": evaluate_recon, "gen": evaluate_gen, "cfg-search": cfg_search}[action](cfg, rid)
    finally:
        close_pool()
    return 0
