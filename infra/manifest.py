"""Stage manifests: what a stage produced, from what, with which config.

Each stage writes `<stage dir>/manifest.json` last (atomically). The next stage reads it; the stage
graph skips a stage whose manifest is complete and whose fingerprint (the stage's own config
subtree + the fingerprints of its inputs) matches. Manifests carry counts, shapes and hashes,
never facts encoded in path strings.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from omegaconf import OmegaConf

from infra import storage

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_subtree(cfg: Any, keys: list[str]) -> dict[str, Any]:
    """Plain dict of the named top-level config sections (what a stage's output depends on)."""
    out = {}
    for key in keys:
        node = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return out


def fingerprint(config: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    payload = canonical_json({"config": config, "inputs": inputs or {}})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def manifest_url(stage_dir: str) -> str:
    return storage.join(stage_dir, MANIFEST_NAME)


def read_manifest(stage_dir: str) -> dict[str, Any] | None:
    return storage.read_json(manifest_url(stage_dir))


def write_manifest(stage_dir: str, stage: str, fp: str, complete: bool, **fields: Any) -> dict[str, Any]:
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": stage,
        "fingerprint": fp,
        "complete": complete,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }
    storage.write_json_atomic(manifest_url(stage_dir), manifest)
    return manifest


def remove_manifest(stage_dir: str) -> None:
    """Delete a stage's manifest (before its outputs are redone under another fingerprint)."""
    storage.remove(manifest_url(stage_dir))


def is_complete(stage_dir: str, fp: str) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest and manifest.get("complete") and manifest.get("fingerprint") == fp)


class ManifestError(RuntimeError):
    pass


def require_complete(stage_dir: str, stage: str, expected_fp: str | None = None) -> dict[str, Any]:
    """The upstream manifest, or a one-line error saying which stage to run first. With
    `expected_fp` (the stage's fingerprint under the caller's config) an output made under another
    config is refused too: a stage run alone must not stamp its output with this config while
    computing it from another config's tokenizer, codes or images."""
    manifest = read_manifest(stage_dir)
    command = f"`restok {stage.replace('_', '-')}`"
    if not manifest or not manifest.get("complete"):
        raise ManifestError(f"{manifest_url(stage_dir)}: no complete '{stage}' manifest; run {command} first")
    if expected_fp is not None and manifest.get("fingerprint") != expected_fp:
        raise ManifestError(
            f"{manifest_url(stage_dir)}: the '{stage}' output there was made under another config "
            f"(fingerprint {manifest.get('fingerprint')}, this config's is {expected_fp}); run {command} "
            "first, or `restok run`, which redoes what the change affects"
        )
    return manifest
