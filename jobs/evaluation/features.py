"""Feature networks of the evaluation and what they saw: mergeable feature sets, the feature spec the
actors load, its fingerprint, and the names numbers are logged under (real Inception -> rfid/gfid;
random-untrained Inception -> *_random_untrained; the probe stand-in -> fd_probe_*, never FID)."""

from __future__ import annotations

import numpy as np
import torch

from configs.schema import RestokConfig
from data_prep.loaders import resolve_shards
from infra import paths, storage
from infra.image_shards import image_batches
from infra.manifest import fingerprint
from jobs.evaluation import STAGE
from jobs.metrics.fid import FeatureStats
from jobs.metrics.inception import load_feature_net, resolve_weights
from jobs.metrics.probe import ensure_probe
from models.losses.pretrained_weights import RANDOM_UNTRAINED


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


def feature_spec(cfg: RestokConfig, probe_path: str = "") -> dict:
    return {
        "kind": str(cfg.eval.feature_net),
        "weights": str(cfg.eval.inception_weights),
        "probe_path": probe_path,
        "resize": str(cfg.eval.inception_resize),
    }


def load_features(spec: dict, device: str):

    return load_feature_net(
        spec["kind"],
        spec.get("weights", ""),
        device,
        spec.get("probe_path") or None,
        resize=spec.get("resize", "tf1"),
    )


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
    weights = spec.get("probe_path") if spec["kind"] == "probe" else spec.get("weights")
    # A seeded random network (tests) is named, not hashed.
    digest = weights if weights == RANDOM_UNTRAINED else file_sha256(weights) if weights else ""
    return fingerprint(
        {
            "kind": spec["kind"],
            "weights_sha256": digest,
            "resize": spec.get("resize", "tf1") if spec["kind"] == "inception" else "",
            "version": FEATURE_VERSION,
        }
    )


def inception_suffix(kind: str, weights: str = "") -> str:
    """'_random_untrained' on every number of a random-untrained Inception (never plain FID/IS)."""
    return "_random_untrained" if kind == "inception" and weights == RANDOM_UNTRAINED else ""


def feature_net_tag(spec: dict) -> str:
    """What made a set of features: inception | inception-random-untrained | probe."""
    return spec["kind"] + (
        "-" + RANDOM_UNTRAINED if inception_suffix(spec["kind"], spec.get("weights", "")) else ""
    )


def distance_name(kind: str, which: str, weights: str = "") -> str:
    """rfid / gfid with Inception (rfid_random_untrained / gfid_random_untrained with random
    weights); fd_probe_recon / fd_probe_gen with the probe (never *fid)."""
    if kind == "inception":
        return {"recon": "rfid", "gen": "gfid"}[which] + inception_suffix(kind, weights)
    return f"fd_probe_{which}"


def load_split_arrays(cfg: RestokConfig, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    shards, _ = resolve_shards(paths.input_manifest(cfg, "prep"), split)
    for _, x, y in image_batches(shards, int(cfg.data.image_size), 256):
        images.append(x.permute(0, 2, 3, 1).numpy())
        labels.append(y.numpy())
        if sum(len(a) for a in images) >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def ensure_probe_for(cfg: RestokConfig) -> dict:
    """Train (or reuse) the probe on the prep train split; cached in <evaluate dir>/probe."""
    x, y = load_split_arrays(cfg, "train", int(cfg.eval.probe_max_train_images))
    xv, yv = load_split_arrays(cfg, "val", int(cfg.eval.probe_max_train_images))
    prep = paths.input_manifest(cfg, "prep")
    num_classes = int(prep.get("num_classes") or max(y.max(), yv.max()) + 1)
    cache = str(cfg.eval.probe_cache) or storage.join(paths.stage_dir(cfg, STAGE), "probe")
    manifest = ensure_probe(
        cache,
        x,
        y,
        num_classes,
        int(cfg.data.image_size),
        xv,
        yv,
        steps=int(cfg.eval.probe_steps),
        seed=int(cfg.seed),
    )
    print(
        f"[evaluate] probe {manifest['key']} ({'cached' if manifest['cached'] else 'trained'}): "
        f"val accuracy {manifest.get('val_accuracy', float('nan')):.3f}",
        flush=True,
    )
    return manifest


def resolved_feature_spec(cfg: RestokConfig) -> tuple[dict, dict]:
    """(feature spec for the actors, probe manifest or {})."""
    if str(cfg.eval.feature_net) == "probe":
        probe = ensure_probe_for(cfg)
        return feature_spec(cfg, probe["path"]), probe
    if str(cfg.eval.feature_net) != "inception":
        raise ValueError(f"eval.feature_net={cfg.eval.feature_net!r}; valid: ['inception', 'probe']")

    if str(cfg.eval.inception_weights) == RANDOM_UNTRAINED:
        print(
            f"[evaluate] WARNING: eval.inception_weights={RANDOM_UNTRAINED} (test mode): Inception "
            "numbers are logged with a _random_untrained suffix, not as FID/IS",
            flush=True,
        )
        return feature_spec(cfg), {}
    # Resolved (and downloaded when online) once in the driver: a missing file is one line here,
    # not a traceback from every actor.
    return {**feature_spec(cfg), "weights": resolve_weights(str(cfg.eval.inception_weights))}, {}
