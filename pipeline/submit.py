"""Ray Jobs submission: `restok submit | status | logs | stop`.

`restok submit [PRESET] [overrides] --address http://HEAD:8265` ships this project directory as the
job's working_dir and runs `python -m pipeline.cli run PRESET overrides cluster.address=auto` as the
job's driver on the cluster (so the stage graph, its skipping and its MLflow runs are the same as a
local `restok run`). `--stage S` submits one stage alone (`stages=[S]`).

The submission id is deterministic: `restok-<preset>-<12 hex>` from the preset, the overrides, the
stage and the code (git commit plus any uncommitted changes). Submitting the same thing again
reports the existing job while it is pending, running or succeeded; after a failure or a stop the
new attempt gets a `-rN` suffix, since Ray never reuses a submission id.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import OmegaConf

from configs.loading import (
    absolute_paths,
    load_config,
    path_keys,
    split_preset_and_overrides,
)
from configs.schema import RestokConfig
from infra.stages import STAGE_ORDER

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Never uploaded with the working_dir (gitignore syntax, relative to the project root): work
# directories, environments, VCS data, build leftovers. Ray caps a working_dir upload at ~500 MiB.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "restok_work",
    "work",
    "mlruns",
    "build",
    ".whl",
    ".gl",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    "*.pt",
    "*.ckpt",
]

# Environment variables forwarded to the job when set here (the presets may read them through
# `${oc.env:...}`, see configs/presets/imagenet256-restok-l.yaml and infra/RUNBOOK.md).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "RESTOK_WORK_DIR",
    "RESTOK_DATA_ROOT",
    "RESTOK_STORAGE_PATH",
    "AWS_DEFAULT_REGION",
    # An S3-compatible store's endpoint (MinIO, Ceph, R2; infra/RUNBOOK.md section 3). Credentials
    # are not forwarded: a job's runtime env is shown in the Ray dashboard.
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "HF_HUB_OFFLINE",
)

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
REUSABLE = {"PENDING", "RUNNING", "SUCCEEDED"}


class SubmitError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- what to submit


def pinned_requirements(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """[project].dependencies of pyproject.toml plus its `cloud` extra (s3fs: a cluster's work dir,
    shards and checkpoints are usually on s3://): the runtime env's pip list."""
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("cloud", [])]


def code_version(root: Path = PROJECT_ROOT) -> str:
    """git commit, plus a digest of uncommitted changes when the tree is dirty ('' outside git).

    RESTOK_CODE_VERSION, when set, replaces it (a CI build label, or a pinned id while editing).
    """
    if os.environ.get("RESTOK_CODE_VERSION"):
        return os.environ["RESTOK_CODE_VERSION"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    if not commit:
        return ""
    dirty = git("status", "--porcelain", "--untracked-files=no") and git("diff", "HEAD")
    return commit + (f"+{hashlib.sha256(dirty.encode()).hexdigest()[:12]}" if dirty else "")


def submission_id(
    preset: str, overrides: Sequence[str], stage: str = "", code: str = "", config: str = ""
) -> str:
    """Deterministic per (preset, overrides, stage, code, resolved config): the same submission is
    not run twice, and any change that reaches the config (an edited preset file, a site variable
    such as RESTOK_WORK_DIR read through ${oc.env:...}) is a new job."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(preset).stem.lower()).strip("-") or "default"
    payload = "\n".join([preset, *overrides, f"stage={stage}", f"code={code}", config])
    return f"restok-{slug}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def entrypoint(python: str, preset: str, overrides: Sequence[str], stage: str = "") -> str:
    """The job's driver command: the stage graph, with Ray joined to the job's own cluster."""
    args = [python, "-m", "pipeline.cli", "run", preset, *overrides, "cluster.address=auto"]
    if stage:
        args.append(f"stages=[{stage}]")
    return shlex.join(args)


def runtime_env(use_pip: bool, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(PROJECT_ROOT),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})},
    }
    if use_pip:
        env["pip"] = pinned_requirements()
    return env


def normalise_stage(stage: str) -> str:

    name = stage.replace("-", "_")
    if name == "eval":
        name = "evaluate"
    if name not in STAGE_ORDER:
        raise SubmitError(f"--stage {stage!r} is not a stage; valid: {', '.join(STAGE_ORDER)}")
    return name


# ---------------------------------------------------------------------------------- Ray Jobs ops


def job_client(address: str):
    """Ray's JobSubmissionClient for the cluster's dashboard address (what `restok submit`, `status`,
    `logs` and `stop` talk to)."""
    from ray.job_submission import JobSubmissionClient

    if is_loopback(address) and "RAY_AUTH_MODE" not in os.environ:
        # Ray 2.60 heads started here enable token auth when ~/.ray/auth_token exists; like
        # `ray.init("auto")`, send that token to a cluster on this machine. Remote clusters need
        # RAY_AUTH_MODE=token and the cluster's token set explicitly (infra/RUNBOOK.md).
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return JobSubmissionClient(address)


def _status(client: Any, job_id: str) -> str | None:
    """Job status name, or None when the cluster has no such job."""
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise


def free_job_id(client: Any, base: str) -> tuple[str, str | None]:
    """(id to use, existing status): the base id while reusable, else the first free `-rN`."""
    candidate, n = base, 1
    while True:
        status = _status(client, candidate)
        if status is None or status in REUSABLE:
            return candidate, status
        n += 1
        candidate = f"{base}-r{n}"


def _follow(client: Any, job_id: str, poll_s: float = 2.0) -> str:
    """Stream the job's logs until it ends; returns the final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as exc:  # websocket trouble: fall back to polling
        print(f"[restok] log stream ended ({type(exc).__name__}: {exc}); polling status", flush=True)
    while (status := _status(client, job_id)) not in TERMINAL:
        time.sleep(poll_s)
    return str(status)


def relative_paths(cfg: RestokConfig) -> list[tuple[str, str]]:
    """(key, value) of every path field whose value is a relative local path."""
    out = []
    for key in path_keys():
        value = str(OmegaConf.select(cfg, key) or "")
        if absolute_paths(key, value, "/a") != absolute_paths(key, value, "/b"):
            out.append((key, value))
    return out


def config_text(cfg: RestokConfig) -> str:
    """The resolved config as the job id hashes it (site variables read through ${oc.env:...}
    resolved from this shell, whose values submit forwards)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def job_preset(preset: str) -> str:
    """The preset as the job names it: the job runs in an unpacked copy of the project
    (runtime_env working_dir), so a preset file must lie inside the project and is named relative
    to its root; a file elsewhere would not be there."""
    if not preset.endswith((".yaml", ".yml")):
        return preset
    path = Path(preset).resolve()
    try:
        return str(path.relative_to(PROJECT_ROOT.resolve()))
    except ValueError:
        raise SubmitError(
            f"{preset}: a preset file outside {PROJECT_ROOT} is not in the job's working_dir; put it "
            "under configs/presets/ (and name it), or pass its keys as key=value"
        ) from None


def submit(args: Any) -> int:

    preset, overrides = split_preset_and_overrides(args.items)
    preset = preset or "default"
    overrides = list(overrides)
    # Fail here, not on the cluster, on a bad key; paths stay as written (the job resolves them).
    preset = job_preset(preset)
    cfg = load_config(preset, overrides, resolve_relative_paths=False)
    stage = normalise_stage(args.stage) if args.stage else ""
    address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    local = is_loopback(address)
    use_pip = (not local) if args.runtime_pip is None else bool(args.runtime_pip)
    python = args.python or (sys.executable if local else "python")
    base_id = submission_id(preset, overrides, stage, code_version(), config_text(cfg))

    job_overrides = list(overrides)
    for key, value in relative_paths(cfg):
        if local:
            # The job runs inside an unpacked copy of working_dir; keep paths where `restok run` would.
            job_overrides.append(f"{key}={absolute_paths(key, value, os.getcwd())}")
        else:
            print(
                f"[restok] warning: {key}={value!r} is relative: on the cluster it lands inside the "
                "job's temporary working_dir; use a shared path or an s3:// URL (infra/RUNBOOK.md)",
                file=sys.stderr,
            )

    client = job_client(address)
    job_id, existing = free_job_id(client, base_id)
    if existing is not None:
        print(f"[restok] job {job_id} already {existing} on {address}; not submitting it again")
    else:
        env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        client.submit_job(
            entrypoint=entrypoint(python, preset, job_overrides, stage),
            submission_id=job_id,
            runtime_env=runtime_env(use_pip, env_vars),
            metadata={
                "restok.preset": preset,
                "restok.stage": stage or "all",
                "restok.code": code_version()[:40],
            },
        )
        print(
            f"[restok] submitted {job_id} to {address}"
            f" (runtime pip: {'pinned requirements' if use_pip else 'off, cluster image has the stack'})"
        )
    flag = f" --address {address}"
    print(
        f"[restok] follow with: restok status {job_id}{flag} | restok logs {job_id}{flag} | "
        f"restok stop {job_id}{flag}",
        flush=True,
    )
    if args.no_wait or existing == "SUCCEEDED":
        return 0
    status = _follow(client, job_id)
    print(f"[restok] job {job_id}: {status}", flush=True)
    if status != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip()
        print(
            f"restok submit: job {job_id} {status}: {message.splitlines()[-1] if message else ''}",
            file=sys.stderr,
            flush=True,
        )
    return 0 if status == "SUCCEEDED" else 1


def cli(args: Any) -> int:
    """Dispatch `restok submit|status|logs|stop` (argparse namespace from pipeline.cli)."""
    try:
        if args.action == "submit":
            return submit(args)
        address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        client = job_client(address)
        if args.action == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status.value if hasattr(info.status, 'value') else info.status}")
            print(f"  message:    {info.message or ''}")
            print(f"  entrypoint: {info.entrypoint}")
            for name in ("start_time", "end_time"):
                ms = getattr(info, name)
                if ms:
                    print(
                        f"  {name[:-5]}:{' ' * (7 - len(name[:-5]))}"
                        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ms / 1000))}"
                    )
            return 0
        if args.action == "logs":
            print(client.get_job_logs(args.job_id), end="")
            return 0
        if args.action == "stop":
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
            return 0
        raise SubmitError(f"unknown action {args.action!r}")
    except (SubmitError, ConnectionError) as exc:
        print(f"restok {args.action}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "AuthenticationError" and not isinstance(exc, RuntimeError):
            raise
        # The Jobs SDK reports HTTP failures, unknown jobs and missing tokens this way.
        print(f"restok {args.action}: {str(exc).splitlines()[0] if str(exc) else exc}", file=sys.stderr)
        return 2
