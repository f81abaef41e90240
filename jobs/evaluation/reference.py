"""Reference statistics for generation metrics: `restok eval make-ref`, and the activations of a
reference file computed once on the actor pool and cached by (file sha256, feature config)."""

from __future__ import annotations

import numpy as np

from configs.schema import RestokConfig
from data_prep.loaders import resolve_shards
from infra import paths, storage
from infra.image_shards import glob_shards
from infra.manifest import fingerprint
from jobs.evaluation import STAGE
from jobs.evaluation.features import (
    feature_fingerprint,
    feature_net_tag,
    file_sha256,
    inception_suffix,
    resolved_feature_spec,
)
from jobs.evaluation.pool import check_each_once, get_pool
from jobs.metrics.adm import mean_cov
from jobs.metrics.fid import ReferenceStats, load_reference_stats, save_reference_stats
from models.losses.pretrained_weights import RANDOM_UNTRAINED

REFERENCE_PASSES = 0  # reference activation passes of the actor pool in this process (tests count them)


_REFERENCE_MEMO: dict[tuple, dict] = {}


def _count_reference_pass(what: str) -> None:
    global REFERENCE_PASSES
    REFERENCE_PASSES += 1
    print(
        f"[evaluate] reference features: computing {what} on the actor pool (pass {REFERENCE_PASSES})",
        flush=True,
    )


def feature_config(cfg: RestokConfig, spec: dict) -> str:
    """Fingerprint of everything that shapes a reference's activations besides its images."""
    return fingerprint({"features": feature_fingerprint(spec), "image_size": int(cfg.data.image_size)})


def shard_activations(cfg: RestokConfig, shards: list[str], spec: dict, what: str) -> dict:
    """Activations of image shards on the pool, concatenated in shard order (each image once)."""
    results = get_pool(cfg).map_shards(
        "activations", shards, spec, int(cfg.data.image_size), int(cfg.eval.batch_size)
    )
    by_url = {part["url"]: part for parts in results for part in parts}
    parts = [by_url[u] for u in shards]
    count = check_each_once([p["keys"] for p in parts], what)
    out = {
        k: np.concatenate([p[k] for p in parts])
        for k in ("pool", "spatial", "probs", "labels")
        if k in parts[0]
    }
    out["count"], out["num_actors"] = count, len(results)
    return out


def array_activations(cfg: RestokConfig, npz_url: str, count: int, spec: dict) -> dict:
    """Activations of an ADM batch's arr_0 rows, split into one contiguous range per actor."""
    pool = get_pool(cfg)
    bounds = np.linspace(0, count, pool.size + 1).round().astype(int)
    results = pool.call(
        "array_activations",
        [(npz_url, int(bounds[a]), int(bounds[a + 1])) for a in range(pool.size)],
        spec,
        int(cfg.eval.batch_size),
    )
    results.sort(key=lambda r: r["start"])
    return {k: np.concatenate([r[k] for r in results]) for k in ("pool", "spatial") if k in results[0]}


def compute_reference(cfg: RestokConfig, shards: list[str], spec: dict) -> ReferenceStats:
    """Reference statistics and all pool rows of image shards (ADM: precision/recall use every row)."""
    _count_reference_pass(f"{len(shards)} shards")
    acts = shard_activations(cfg, shards, spec, "reference statistics")
    mu, sigma = mean_cov(acts["pool"])
    ref = ReferenceStats(
        mu=mu,
        sigma=sigma,
        feature_net=feature_net_tag(spec),
        num_images=acts["count"],
        features=acts["pool"],
        feature_config=feature_config(cfg, spec),
    )
    if "spatial" in acts:
        ref.mu_s, ref.sigma_s = mean_cov(acts["spatial"])
    return ref


def default_reference_url(cfg: RestokConfig, spec: dict, probe: dict) -> str:
    tag = feature_net_tag(spec) if spec["kind"] == "inception" else f"probe-{probe.get('key', 'unknown')}"
    return storage.join(paths.stage_dir(cfg, STAGE), f"reference-{tag}-{cfg.eval.reference_split}.npz")


def make_reference(
    cfg: RestokConfig, out_url: str = "", spec: dict | None = None, probe: dict | None = None
) -> str:
    """`restok eval make-ref`: mu, sigma (+ spatial), all pool rows and the feature config of any image
    shards."""
    if spec is None:
        spec, probe = resolved_feature_spec(cfg)
    shards = (
        glob_shards(str(cfg.eval.reference_shards))
        if cfg.eval.reference_shards
        else resolve_shards(paths.input_manifest(cfg, "prep"), str(cfg.eval.reference_split))[0]
    )
    out_url = out_url or str(cfg.eval.reference_out) or default_reference_url(cfg, spec, probe or {})
    ref = compute_reference(cfg, shards, spec)
    save_reference_stats(out_url, ref)
    print(
        f"[evaluate] reference statistics of {ref.num_images} images ({spec['kind']}) -> {out_url}",
        flush=True,
    )
    return out_url


def reference_for_gen(cfg: RestokConfig, spec: dict, probe: dict) -> tuple[dict, str]:
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
    same = (
        ref.feature_net == expected
        if expected != "inception"
        else ref.feature_net not in ("probe", "inception-" + RANDOM_UNTRAINED)
    )
    if ref.mu is not None and not same:
        raise ValueError(
            f"{url}: reference made with feature net {ref.feature_net!r}, evaluation uses {expected!r}"
        )
    if ref.feature_config and ref.feature_config != want:
        raise ValueError(
            f"{url}: reference made with feature config {ref.feature_config}, this evaluation's is "
            f"{want} (other weights, resize or image size); remake it with `restok eval make-ref`"
        )
    stats = {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s}
    out = {"pool": ref.features, "spatial": None, "stats": stats, "num_images": ref.num_images}
    if ref.features is None and ref.has_images:
        out.update(_cached_array_activations(cfg, url, ref.num_images, spec, want))
    _REFERENCE_MEMO[memo_key] = out
    return out, url


def _cached_array_activations(cfg: RestokConfig, url: str, count: int, spec: dict, want: str) -> dict:
    import io

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
