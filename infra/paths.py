"""Where each stage puts its outputs under the work directory (one place, so no stage guesses), and
the manifest found there when a stage reads another's output."""

from __future__ import annotations

import hashlib
import os
import re

from configs.schema import RestokConfig
from infra import storage
from infra.manifest import require_complete
from infra.stages import stage_fingerprint


def work_url(cfg: RestokConfig) -> str:
    """The work directory as a URL or absolute local path."""
    wd = str(cfg.work_dir)
    return wd if "://" in wd else os.path.abspath(wd)


def stage_dir(cfg: RestokConfig, stage: str) -> str:
    return storage.join(work_url(cfg), stage)


def input_manifest(cfg: RestokConfig, stage: str) -> dict:
    """`stage`'s complete manifest made under this config (its fingerprint), else a one-line
    ManifestError naming the command to run first."""
    return require_complete(stage_dir(cfg, stage), stage, stage_fingerprint(cfg, stage))


def shards_url(cfg: RestokConfig) -> str:
    """Image shards: <work_dir>/prep, or under a shared data.shards_url <data.shards_url>/prep-<prep
    fingerprint>, to which prep appends -<sample list hash> (data_prep.prepare.plan_id): one
    directory per data config and sample list, so no prep deletes another's shards. Readers take
    the directory from prep's manifest (`shards_url`)."""
    if not str(cfg.data.shards_url):
        return stage_dir(cfg, "prep")
    return storage.join(str(cfg.data.shards_url), f"prep-{stage_fingerprint(cfg, 'prep')}")


def tracking_uri(cfg: RestokConfig) -> str:
    """MLflow store: tracking.tracking_uri, or a sqlite file under a local work dir."""
    if cfg.tracking.tracking_uri:
        return str(cfg.tracking.tracking_uri)
    wd = work_url(cfg)
    if "://" in wd:
        raise ValueError("tracking.tracking_uri must be set when work_dir is a remote URL")
    return f"sqlite:///{os.path.join(wd, 'mlflow.db')}"


def ray_storage_path(cfg: RestokConfig) -> str:
    """Ray Train checkpoints: <work_dir>/ray, or <cluster.storage_path>/<work dir name>-<hash of the
    work dir>. A site-wide storage path (RUNBOOK: one RESTOK_STORAGE_PATH for every run) is shared
    by work dirs whose stage fingerprints can be equal: each work dir's runs get their own folder
    there, so no run resumes, tidies or clears another's checkpoints."""
    root = str(cfg.cluster.storage_path)
    work = work_url(cfg).rstrip("/")
    if not root:
        return storage.join(work, "ray")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", work.rsplit("/", 1)[-1]).strip("-") or "work"
    return storage.join(root, f"{name}-{hashlib.sha256(work.encode()).hexdigest()[:8]}")
