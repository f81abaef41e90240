"""Ray Train plumbing shared by the two training stages: the driver side (TorchTrainer, storage,
failure policy, resume) and the worker side (checkpoint save/restore, rank-0 MLflow logging).

Checkpoint directory layout (one Ray Train checkpoint, merged from all workers' directories):
  <engine>/            DeepSpeed `save_checkpoint` output per engine (tag "state")
  rank<r>.pt           per-rank RNG states, data position, extra state (tensors/lists only:
                       loaded with torch.load(weights_only=True))
  ema_rank<r>.safetensors  per-rank EMA (deepspeed_runtime.EMA: the fp32 masters' ranges every rank
                       holds under ZeRO 1-2, ZeRO-3 shards, or whole tensors on rank 0)
  meta.json            step, world size, ZeRO stage, EMA shapes (rank 0)
  config.yaml          the resolved config of the run (rank 0)
  COMPLETE.json        our completeness marker, written by rank 0 last: after every rank's report
                       returned (Ray uploads synchronously) and a barrier, by atomic rename

Directories are named checkpoint_<step, 8 digits>. Resume is ours, not Ray's snapshot: a killed
driver can leave a complete checkpoint Ray never registered (or a half-uploaded one), so every
start resumes from the newest checkpoint with COMPLETE.json on storage, deletes the others beyond
keep_checkpoints and every incomplete one, and drops Ray's snapshot (see `prepare_resume`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from configs.loading import from_yaml_text, to_yaml
from infra import paths, storage, tracking
from infra.console import one_line, unwrap
from infra.manifest import fingerprint
from infra.ray_connect import connect_ray, starts_local_ray, worker_runtime_env
from infra.stages import stage_fingerprint
from jobs.training.deepspeed_runtime import (
    EMA,
    consolidate_fragments,
    consolidate_shards,
    fresh_rng_state,
    grad_accumulation,
    prepare_deepspeed,
    rng_state,
    seed_everything,
    set_rng_state,
)
from jobs.training.preemption import PREEMPTED, preemptible_torch_config
from jobs.training.throughput import Throughput, measured_matmul_peak, peak_memory_bytes

STATE_TAG = "state"
META_NAME = "meta.json"
CONFIG_NAME = "config.yaml"
COMPLETE_NAME = "COMPLETE.json"
CHECKPOINT_PREFIX = "checkpoint_"
# Ray Train's record of registered checkpoints in the experiment dir (ray.train.v2 constants).
RAY_SNAPSHOT_NAME = "checkpoint_manager_snapshot.json"
# Test-only fault injection (name says so): rank 1 calls os._exit(1) once when it reaches this step.
TEST_CRASH_ENV = "RESTOK_TEST_CRASH_RANK1_AT_STEP"
# Test-only pacing (name says so): seconds every rank sleeps per step, so a test can act between
# two checkpoints however fast the machine is.
TEST_STEP_SLEEP_ENV = "RESTOK_TEST_STEP_SLEEP_S"
# Stage name -> its TrainConfig section.
TRAIN_SECTION = {"train_tokenizer": "tokenizer_train", "train_generator": "generator_train"}
_FRESH_NAMES: dict[str, str] = {}


# ---- driver ---------------------------------------------------------------------------------------
def experiment_name(cfg: Any, stage: str) -> str:
    """`resume: auto` reuses the experiment directory of the same stage fingerprint (resuming
    from its newest complete checkpoint); `never` starts a fresh one."""
    name = f"{stage}-{stage_fingerprint(cfg, stage)}"
    if str(cfg[TRAIN_SECTION[stage]].resume) == "never":
        # Once per process: fit and the stage's export must name the same directory.
        name = _FRESH_NAMES.setdefault(name, name + time.strftime("-%Y%m%d-%H%M%S"))
    return name


def experiment_url(cfg: Any, stage: str) -> str:
    """The stage's Ray Train experiment directory (its checkpoints) on storage."""
    return storage.join(paths.ray_storage_path(cfg), experiment_name(cfg, stage))


# Beside a stage's checkpoints: the identity of the input they were trained on (inputs_identity).
INPUTS_NAME = "inputs.json"


def inputs_identity(upstream: dict) -> dict:
    """What a training stage's checkpoints were trained on: its input stage's fingerprint and the
    sha256 of every shard that manifest lists (prep's splits, extract_codes' shards and tokenizer
    weights). The config fingerprint alone misses inputs rebuilt under the same config (a retrained
    tokenizer, a re-extraction, `restok run --force`, new weights at a sweep's checkpoint path)."""
    content = {k: upstream.get(k) for k in ("splits", "shards", "tokenizer_sha256")}
    return {
        "stage": upstream.get("stage"),
        "fingerprint": upstream.get("fingerprint"),
        "content": fingerprint(content),
    }


def inputs_changed(cfg: Any, stage: str, upstream: dict) -> str:
    """Why the stage's kept checkpoints may not be resumed (its input was rebuilt since they were
    written), or ''. Checkpoints from before this record existed cannot tell: ''."""
    recorded = storage.read_json(storage.join(experiment_url(cfg, stage), INPUTS_NAME))
    if recorded is None or recorded == inputs_identity(upstream):
        return ""
    return f"input '{recorded.get('stage')}' was rebuilt since its checkpoints were written"


def record_inputs(cfg: Any, stage: str, upstream: dict) -> None:
    url = storage.join(experiment_url(cfg, stage), INPUTS_NAME)
    storage.write_json_atomic(url, inputs_identity(upstream))


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(root: str) -> tuple[list[tuple[int, str, dict]], list[str]]:
    """(complete checkpoints as (step, url, marker) oldest first, incomplete checkpoint urls)."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return [], []
    complete, incomplete = [], []
    for entry in fs.ls(path, detail=True):
        name = os.path.basename(str(entry["name"]).rstrip("/"))
        if entry["type"] != "directory" or not name.startswith(CHECKPOINT_PREFIX):
            continue
        url = storage.join(root, name)
        marker = storage.read_json(storage.join(url, COMPLETE_NAME))
        if marker is None:
            incomplete.append(url)
        else:
            complete.append((int(marker["step"]), url, marker))
    complete.sort(key=lambda c: c[0])
    return complete, incomplete


def latest_checkpoint(root: str) -> tuple[str, dict] | None:
    """(url, marker) of the newest complete checkpoint under `root`, or None."""
    complete, _ = list_checkpoints(root)
    return (complete[-1][1], complete[-1][2]) if complete else None


def tidy_checkpoints(root: str, keep: int) -> None:
    """Delete incomplete checkpoints and all but the `keep` newest complete ones (keep <= 0: all).
    Called only when no upload is in flight (before training, and by rank 0 right after a marker)."""
    complete, incomplete = list_checkpoints(root)
    drop = incomplete + ([url for _, url, _ in complete[:-keep]] if keep > 0 else [])
    for url in drop:
        fs, path = storage.filesystem(url)
        fs.rm(path, recursive=True)
    if incomplete:
        print(f"[restok] removed {len(incomplete)} incomplete checkpoint(s) under {root}", flush=True)


def write_complete_marker(url: str, marker: dict) -> None:
    storage.write_json_atomic(storage.join(url, COMPLETE_NAME), marker)


def prepare_resume(root: str, keep: int) -> tuple[str, dict] | None:
    """Driver, before a fit: adopt what Ray's snapshot registered, drop the snapshot, tidy.

    Ray registers a checkpoint only once every worker has uploaded its part, so one its snapshot
    lists but without our marker is complete (killed between the two): it gets the marker. The
    snapshot is then deleted: resume is the newest marked checkpoint, and a snapshot naming a
    checkpoint we pruned would stop Ray's controller from starting."""
    snapshot = storage.join(root, RAY_SNAPSHOT_NAME)
    try:
        registered = [
            r["checkpoint_dir_name"]
            for r in (storage.read_json(snapshot) or {}).get("checkpoint_results", [])
        ]
    except ValueError:  # half-written by a killed controller
        registered = []
    for name in registered:
        url = storage.join(root, name)
        meta = storage.read_json(storage.join(url, META_NAME))
        if meta is not None and not storage.exists(storage.join(url, COMPLETE_NAME)):
            write_complete_marker(
                url,
                {
                    "step": int(meta["step"]),
                    "world": int(meta["world"]),
                    "adopted": "registered in Ray Train's snapshot",
                },
            )
    if storage.exists(snapshot):
        fs, path = storage.filesystem(snapshot)
        fs.rm(path)
    tidy_checkpoints(root, keep)
    return latest_checkpoint(root)


def local_torch_trainer_class():
    """TorchTrainer without three helper actors a Ray instance this driver started has no use for,
    each a process importing Ray Train or Ray Data (~2-3 CPU-s): the detached PlacementGroupCleaner
    removes a dead controller's placement group from a cluster that outlives it (a local instance
    dies with its driver, and its placement groups with it); the DatasetManager serves Ray Datasets
    (none are passed: the loaders read WebDataset shards); and the scaling policy's detached
    AutoscalingCoordinator forwards resource requests to a cluster autoscaler (a single local node
    has none). The callbacks and policy are Ray Train v2's defaults (ray.train.v2
    DataParallelTrainer), pinned in pyproject.toml; tests/test_ray_trainer_callbacks.py checks them."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class LocalScalingPolicy(FixedScalingPolicy):
        """Ray's fixed-size policy, minus the resource requests to the AutoscalingCoordinator."""

        def _maybe_send_resource_request(self):
            pass

        def _send_resource_request(self):
            pass

        def _cancel_resource_request(self):
            pass

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            dropped = (PlacementGroupCleanerCallback, DatasetsCallback)
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, dropped)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LocalTorchTrainer


def fit(cfg: Any, stage: str, train_loop: Callable[[dict], None], run_id: str, extra: dict | None = None):
    """Run `train_loop` on cluster.num_workers Ray Train workers; returns the Ray Train Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    connect_ray(cfg)
    # Ray Train gives a worker group 60 s to start; importing torch + DeepSpeed on a loaded CPU
    # box (or pulling images on a cluster) can take longer, and that timeout fails the run.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    train = cfg[TRAIN_SECTION[stage]]
    resume = str(train.resume)
    if resume not in ("auto", "never"):
        check_checkpoint(resume)
    root = experiment_url(cfg, stage)
    keep = int(train.keep_checkpoints)
    loop_config = {
        "cfg_yaml": to_yaml(cfg),
        "stage": stage,
        "run_id": run_id,
        "tracking_uri": paths.tracking_uri(cfg),
        # An explicit checkpoint path is used only when storage has no complete checkpoint.
        "resume_from": None if resume in ("auto", "never") else resume,
        "crash_marker": storage.join(paths.ray_storage_path(cfg), experiment_name(cfg, stage) + ".crashed"),
        "checkpoint_root": root,
        "keep_checkpoints": keep,
        "fingerprint": stage_fingerprint(cfg, stage),
        **(extra or {}),
    }
    forwarded = {
        k: v for k, v in os.environ.items() if k in (TEST_CRASH_ENV, TEST_STEP_SLEEP_ENV, "OMP_NUM_THREADS")
    }
    runtime_env = worker_runtime_env(cfg, forwarded)

    def trainer() -> TorchTrainer:
        return (local_torch_trainer_class() if starts_local_ray(cfg) else TorchTrainer)(
            train_loop,
            train_loop_config=loop_config,
            torch_config=preemptible_torch_config(),
            scaling_config=ray.train.ScalingConfig(
                num_workers=int(cfg.cluster.num_workers),
                use_gpu=bool(cfg.cluster.use_gpu),
                resources_per_worker={
                    "CPU": float(cfg.cluster.cpus_per_worker),
                    **({"GPU": 1.0} if cfg.cluster.use_gpu else {}),
                },
            ),
            run_config=ray.train.RunConfig(
                name=experiment_name(cfg, stage),
                storage_path=paths.ray_storage_path(cfg),
                # Retries are ours (below): Ray would retry a deterministic error too.
                failure_config=ray.train.FailureConfig(max_failures=0),
                # Retention is ours (tidy_checkpoints, over everything on storage): Ray's counts only
                # what its snapshot registered, and deleting behind its back would break the snapshot.
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
                worker_runtime_env=runtime_env,
            ),
        )

    retries = int(train.max_failures)
    attempt = 0
    while True:
        # Every attempt resumes from the newest checkpoint complete on storage (our marker).
        latest = prepare_resume(root, keep)
        if latest is not None:
            print(f"[{stage}] newest complete checkpoint: {latest[0]} (step {latest[1]['step']})", flush=True)
        try:
            result = trainer().fit()
            tidy_checkpoints(root, keep)
            newest = latest_checkpoint(root)
            if newest is not None and newest[1].get("preempted"):
                print(
                    f"[{stage}] preempted ({newest[1]['preempted']}): checkpoint at step "
                    f"{newest[1]['step']} written, stage stopped; rerun to continue",
                    flush=True,
                )
            return result
        except ray.train.TrainingFailedError as exc:
            if not is_transient(exc):
                raise StageFailure(worker_error_line(exc)) from exc
            if retries >= 0 and attempt >= retries:
                raise StageFailure(
                    f"gave up after {attempt} retries (training.max_failures): {worker_error_line(exc)}"
                ) from exc
            attempt += 1
            print(
                f"[{stage}] worker lost ({worker_error_line(exc)}); retry {attempt} "
                "from the latest checkpoint",
                flush=True,
            )


class StageFailure(RuntimeError):
    """A training stage failed for a reason a retry cannot fix; the message is one line."""

    one_line_message = True


def _worker_failures(exc: BaseException) -> list[BaseException]:
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        return [failures[r] for r in sorted(failures)]
    controller = getattr(exc, "controller_failure", None)
    return [controller] if controller is not None else [exc]


def is_transient(exc: BaseException) -> bool:
    """A worker or node died (or a collective broke because a peer did): worth a retry. An
    exception raised by our code on a live worker (bad config, missing input, corrupt checkpoint)
    is deterministic and would fail the same way again."""
    from ray.exceptions import RayActorError

    if getattr(exc, "preemption_info", None) is not None:
        return True
    for failure in _worker_failures(exc):
        if type(failure).__name__.startswith("WorkerHealthCheck") or isinstance(
            unwrap(failure), RayActorError
        ):
            return True
        inner = unwrap(failure)
        if isinstance(inner, (ConnectionError, torch.distributed.DistBackendError)):
            return True
    return False


def worker_error_line(exc: BaseException) -> str:
    """`Type: first line` of the first worker's own exception."""
    return one_line(_worker_failures(exc)[0])


# ---- worker ---------------------------------------------------------------------------------------
@dataclass
class WorkerSession:
    """What a train loop needs to know about itself; built from the loop config on each worker."""

    cfg: Any
    stage: str
    run_id: str
    tracking_uri: str
    rank: int
    world: int
    device: torch.device
    resume_from: str | None
    crash_marker: str
    checkpoint_root: str
    keep_checkpoints: int
    fingerprint: str
    logged_steps: set = field(default_factory=set)

    @classmethod
    def from_loop_config(cls, config: dict) -> WorkerSession:
        import ray.train

        ctx = ray.train.get_context()
        cfg = from_yaml_text(config["cfg_yaml"])
        use_gpu = bool(cfg.cluster.use_gpu) and torch.cuda.is_available()
        device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
        return cls(
            cfg,
            config["stage"],
            config["run_id"],
            config["tracking_uri"],
            ctx.get_world_rank(),
            ctx.get_world_size(),
            device,
            config.get("resume_from"),
            config["crash_marker"],
            config["checkpoint_root"],
            int(config["keep_checkpoints"]),
            config["fingerprint"],
        )

    @classmethod
    def start(cls, config: dict) -> WorkerSession:
        """The start of every train loop: the session, DeepSpeed prepared for its device, and the
        initial-weights seed (identical on every rank; call `seed_rank` once the models are built)."""
        session = cls.from_loop_config(config)
        prepare_deepspeed(session.device.type == "cuda")
        seed_everything(int(session.train.seed))
        return session

    def seed_rank(self) -> None:
        """Per-rank random streams (dropout, nested dropout) from here on."""
        seed_everything(int(self.train.seed) + 1 + self.rank)

    def ema_of(self, engine: Any) -> EMA:
        return EMA(engine.module, float(self.train.ema_decay), self.rank, bool(self.train.ema_warmup))

    @property
    def train(self) -> Any:
        return self.cfg[TRAIN_SECTION[self.stage]]

    @property
    def is_logger(self) -> bool:
        return self.rank == 0

    # -- MLflow (rank 0 only, explicit run id; every step logged once even across restarts) --
    def load_logged_steps(self, metric: str) -> None:
        """Steps already in MLflow (a restarted run repeats the steps after its last checkpoint;
        resume is exact, so the values would be the same: they are not logged twice)."""
        if self.is_logger:
            client = tracking.client_for(self.tracking_uri)
            self.logged_steps = {m.step for m in client.get_metric_history(self.run_id, metric)}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.is_logger and step not in self.logged_steps:
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step)
            self.logged_steps.add(step)

    def tag_resume(self, step: int) -> None:
        """Append `step` to the run's `restok.resumed_at_steps` tag (one run across restarts)."""
        client = tracking.client_for(self.tracking_uri)
        before = client.get_run(self.run_id).data.tags.get("restok.resumed_at_steps", "")
        client.set_tag(self.run_id, "restok.resumed_at_steps", ",".join(filter(None, [before, str(step)])))

    def log_image(self, image: Any, name: str) -> None:
        if self.is_logger:
            tracking.log_image(self.tracking_uri, self.run_id, image, name)

    # -- fault injection for the fault-tolerance test ------------------------------------------------
    def maybe_crash(self, step: int) -> None:
        at = int(os.environ.get(TEST_CRASH_ENV, "0") or 0)
        if at and self.rank == 1 and step == at and not storage.exists(self.crash_marker):
            storage.write_bytes_atomic(self.crash_marker, b"crashed once\n")
            os._exit(1)

    # -- checkpoints -----------------------------------------------------------------------------
    def restore_dir(self):
        """A context manager yielding the directory to resume from, or None: the newest complete
        checkpoint on storage (not Ray's get_checkpoint(): its snapshot may lag behind storage)."""
        import contextlib

        import ray.train

        latest = latest_checkpoint(self.checkpoint_root)
        if latest is not None:
            return ray.train.Checkpoint(latest[0]).as_directory()
        if self.resume_from:  # a local path or a URL (s3://...): read through Ray's filesystem
            return ray.train.Checkpoint(self.resume_from).as_directory()
        return contextlib.nullcontext(None)

    def save(
        self,
        engines: dict[str, Any],
        step: int,
        rank_state: dict,
        ema: Any | None,
        metrics: dict[str, float],
        note: dict | None = None,
    ) -> None:
        """DeepSpeed checkpoints of every engine + this rank's state, reported to Ray Train."""
        import ray.train
        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix=f"restok-ckpt-r{self.rank}-")
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(os.path.join(tmp, name), tag=STATE_TAG)
            torch.save(rank_state, os.path.join(tmp, f"rank{self.rank}.pt"))
            if ema is not None and ema.active:
                save_file(
                    ema.state(),
                    os.path.join(tmp, f"ema_rank{self.rank}.safetensors"),
                    metadata=ema.file_metadata(),
                )
            if self.rank == 0:
                meta = {
                    "step": step,
                    "world": self.world,
                    "stage": self.stage,
                    "zero_stage": int(self.train.zero_stage),
                    "ema_layout": ema.layout if ema is not None else "whole",
                    "ema_shapes": ema.shapes if ema is not None else {},
                }
                with open(os.path.join(tmp, META_NAME), "w") as fh:
                    json.dump(meta, fh)
                # The resolved config, so any kept checkpoint exports alone (jobs.training.checkpoints).
                with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
                    fh.write(to_yaml(self.cfg))
            name = checkpoint_dir_name(step)
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Uploads are synchronous: once every rank has returned from report, every part is stored.
        barrier()
        if self.rank == 0:
            url = storage.join(self.checkpoint_root, name)
            write_complete_marker(
                url,
                {
                    "step": step,
                    "world": self.world,
                    "stage": self.stage,
                    "fingerprint": self.fingerprint,
                    "mlflow_run_id": self.run_id,
                    "metrics": metrics,
                    "written_at": time.time(),
                    **(note or {}),
                },
            )
            tidy_checkpoints(self.checkpoint_root, self.keep_checkpoints)

    def load(self, directory: str, engines: dict[str, Any], ema: Any | None) -> dict:
        """Restore engines, EMA and this rank's state; returns the rank state."""
        from safetensors.torch import load_file

        with open(os.path.join(directory, META_NAME)) as fh:
            meta = json.load(fh)
        if meta["world"] != self.world:
            return self._load_resized(directory, meta, engines, ema)
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(os.path.join(directory, name), tag=STATE_TAG)
            if path is None:
                raise FileNotFoundError(f"{directory}/{name}: no DeepSpeed checkpoint tag {STATE_TAG!r}")
        if ema is not None and ema.active:
            if ema_layout(meta) == ema.layout:
                ema.load(load_file(os.path.join(directory, f"ema_rank{self.rank}.safetensors")))
            else:  # written before the EMA kept the fp32 masters' ranges: through full tensors
                ema.load(ema.part_of(read_ema_parts(directory, meta), self.rank, self.world))
        return torch.load(os.path.join(directory, f"rank{self.rank}.pt"), weights_only=True)

    def _load_resized(self, directory: str, meta: dict, engines: dict[str, Any], ema: Any | None) -> dict:
        """A checkpoint of another world size (issue 17, Deliver 4): each engine through DeepSpeed's
        universal checkpoint (ds_to_universal, then load_universal), the EMA put back together and
        re-split, this rank's state from old rank (rank mod old world) but random streams of its own.
        The data position is the step; under the new split the data streams start afresh there
        (data_stream_salt), so no batch already trained is replayed, but the global batches from
        then on differ from an uninterrupted run's (the generator's code batches do not: they are
        cut per global batch, infra.code_shards)."""

        old = int(meta["world"])
        if self.is_logger:
            print(
                f"[{self.stage}] resuming a {old}-worker checkpoint on {self.world} workers through "
                "DeepSpeed's universal checkpoint",
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix=f"restok-universal-r{self.rank}-") as tmp:
            for name, engine in engines.items():
                load_universal(engine, os.path.join(directory, name), os.path.join(tmp, name))
        if ema is not None and ema.active:
            full = read_ema_parts(directory, meta)
            ema.load(ema.part_of(full, self.rank, self.world))
        state = torch.load(os.path.join(directory, f"rank{self.rank % old}.pt"), weights_only=True)
        # Old rank r's random streams would go to ranks r, r + old, ...: on a grown world those
        # would draw the same nested-dropout lengths, crops and dropout masks. Every rank starts
        # streams of its own from (seed, rank, step) instead.
        state["rng"] = fresh_rng_state(int(self.train.seed), self.rank, int(state["step"]))
        return state


def load_universal(engine: Any, saved: str, work: str) -> None:
    """Load the DeepSpeed checkpoint `saved/<STATE_TAG>` of any data-parallel size into `engine`:
    converted to DeepSpeed's universal format under `work` (deepspeed.checkpoint.ds_to_universal,
    serial: no worker processes inside a Train worker), then loaded with `load_universal`."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(
        argparse.Namespace(
            input_folder=os.path.join(saved, STATE_TAG),
            output_folder=os.path.join(work, STATE_TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # Our engines are plain data parallel (no tensor/pipeline slicing to describe): the
            # converter's default checkpoint info is all there is to say.
            inject_missing_state=True,
        )
    )
    # The engine was built for a same-size resume; this one load reads the universal layout.
    engine._config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(work, tag=STATE_TAG)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"{saved}: no DeepSpeed checkpoint tag {STATE_TAG!r}")


def ema_layout(meta: dict) -> str:
    """A checkpoint's deepspeed_runtime.EMA layout; those from before the layouts had `ema_sharded`."""
    return meta.get("ema_layout") or ("zero3" if meta.get("ema_sharded") else "whole")


def read_ema_parts(directory: str, meta: dict) -> dict[str, torch.Tensor]:
    """Full EMA tensors of a checkpoint from its ema_rank<r> files, in any deepspeed_runtime.EMA
    layout ({} when it has none)."""
    from safetensors import safe_open

    layout = ema_layout(meta)
    world = int(meta["world"])
    files = [
        os.path.join(directory, f"ema_rank{r}.safetensors") for r in range(world if layout != "whole" else 1)
    ]
    present = [f for f in files if os.path.exists(f)]
    if not present:
        return {}
    if len(present) != len(files):
        raise FileNotFoundError(f"{directory}: EMA parts missing: {sorted(set(files) - set(present))}")
    parts = []
    for path in files:
        with safe_open(path, "pt") as fh:
            starts = json.loads((fh.metadata() or {}).get("ema_fragments", "{}"))
            parts.append(({k: fh.get_tensor(k) for k in fh.keys()}, starts))
    if layout == "zero3":
        return consolidate_shards([tensors for tensors, _ in parts], meta["ema_shapes"])
    if layout == "fragments":
        return consolidate_fragments(parts, meta["ema_shapes"])
    return parts[0][0]


def check_checkpoint(directory: str) -> dict:
    """The meta of a checkpoint named by the user, read on the driver: a wrong or corrupt path
    fails in one line before any worker starts."""
    url = storage.join(directory, META_NAME)
    try:
        meta = storage.read_json(url)
    except (OSError, ValueError) as exc:
        meta = f"{type(exc).__name__}: {exc}"
    if not isinstance(meta, dict) or "step" not in meta:
        raise StageFailure(
            f"{directory}: not a restok checkpoint ({url}: {'missing' if meta is None else 'unreadable'})"
        )
    return meta


def checkpoint_meta(directory: str) -> dict:
    with open(os.path.join(directory, META_NAME)) as fh:
        return json.load(fh)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (one tiny all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (e.g. a CodebookStats histogram); no-op outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar logs over ranks (for logging only)."""
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=False))


# ---- the shared optimisation loop -----------------------------------------------------------------
@dataclass
class LoopSpec:
    """What differs between the tokenizer and generator stages; `run_loop` does the rest."""

    engines: dict[str, Any]  # every engine checkpointed; the first is the model being trained
    ema: Any
    # (start micro-batch index, stream salt) -> iterator, deterministic per (salt, split); the
    # salt is '' until a resume changes the data split (data_stream_salt)
    micro_batches: Callable[[int, str], Any]
    train_step: Callable[[int, list], dict[str, float]]  # one optimizer step over the micro-batches
    sample_unit: str  # "images" | "sequences"
    tokens_per_sample: int
    flops_per_sample: float  # forward + backward
    log_images: Callable[[int], None] | None = None  # called on every rank (may be collective)
    get_extra_state: Callable[[], dict] = dict
    set_extra_state: Callable[[dict], None] = lambda state: None
    # Called on every rank at each log step (may be collective), e.g. codebook usage since the last.
    interval_metrics: Callable[[], dict[str, float]] | None = None


def peak_flops_per_worker(session: WorkerSession) -> tuple[float, str]:
    """(FLOP/s, source): cluster.peak_tflops_per_worker when set, else a measured matmul peak."""
    configured = float(session.cfg.cluster.peak_tflops_per_worker)
    if configured > 0:
        return configured * 1e12, "configured"
    dtype = torch.bfloat16 if session.train.precision == "bf16" else torch.float32
    return measured_matmul_peak(
        session.device, dtype, n=2048 if session.device.type == "cuda" else 512
    ), "measured-matmul"


def data_split(session: WorkerSession) -> dict:
    """How a step's samples are dealt out: ranks, micro-batch size, loader processes per rank."""
    return {
        "world": session.world,
        "micro_batch": int(session.train.micro_batch_size),
        "loader_workers": int(session.cfg.data.loader_workers),
    }


def data_stream_salt(recorded: dict | None, split: dict, step: int) -> tuple[str, str]:
    """(salt, note) for the data streams of a resumed run. Under the split they were drawn with,
    a run's streams continue exactly (the recorded salt). Under another split (world size, micro-
    batch size, loader processes: all output-neutral keys) the per-rank streams would not deal the
    same global batches and a grown world would replay batches already trained, so the run goes
    on from this step with fresh streams (a new salt) and says so. A checkpoint from before this
    record: ''."""
    if not recorded:
        return "", ""
    if recorded.get("split") == split:
        return str(recorded.get("salt", "")), ""
    salt = f"{recorded.get('salt', '')}>{step}"
    before, now = recorded.get("split"), split
    return salt, f"data split changed ({before} -> {now}): fresh random data streams from step {step}"


def run_loop(session: WorkerSession, spec: LoopSpec) -> None:
    from tqdm import tqdm

    train = session.train
    pace_s = float(os.environ.get(TEST_STEP_SLEEP_ENV, "0") or 0)
    total = int(train.steps)
    gas = grad_accumulation(int(train.global_batch_size), int(train.micro_batch_size), session.world)
    main = next(iter(spec.engines.values()))
    start, salt, split = 0, "", data_split(session)
    with session.restore_dir() as directory:
        if directory is not None:
            state = session.load(directory, spec.engines, spec.ema)
            start = int(state["step"])
            set_rng_state(state["rng"])
            spec.set_extra_state(state.get("extra", {}))
            salt, note = data_stream_salt(state.get("data"), split, start)
            if session.is_logger:
                print(f"[{session.stage}] resumed from {directory} at step {start}", flush=True)
                if note:
                    print(f"[{session.stage}] {note}", flush=True)
                session.tag_resume(start)
    session.load_logged_steps("loss")
    peak, peak_source = peak_flops_per_worker(session)
    if session.is_logger:
        client = tracking.client_for(session.tracking_uri)
        client.set_tag(
            session.run_id, "restok.mfu_peak", f"{peak / 1e12:.3f} TFLOP/s per worker ({peak_source})"
        )
        # What glibc read at this worker's start (worker_malloc_env): step times depend on it on CPU.
        malloc = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
        client.set_tag(session.run_id, "restok.worker_malloc", " ".join(malloc) or "glibc defaults")
    meter = Throughput(session.world, spec.tokens_per_sample, spec.flops_per_sample, peak)
    stop_after = int(train.stop_after)
    end = min(total, stop_after) if stop_after > 0 else total
    batches = spec.micro_batches(start * gas, salt)
    # Rank 0's bar goes to the worker log; the terminal shows the driver's (tracking.follow_run).
    bar = tqdm(
        range(start, end),
        initial=start,
        total=total,
        desc=session.stage,
        disable=not session.is_logger,
        mininterval=10.0,
    )
    logs: dict[str, float] = {}
    for step in bar:
        session.maybe_crash(step)
        if pace_s:
            time.sleep(pace_s)
        micro = [next(batches) for _ in range(gas)]
        logs = spec.train_step(step, micro)
        if spec.ema is not None:
            spec.ema.update(step)
        meter.add(int(train.micro_batch_size) * gas)
        done = step + 1
        # The first step is logged too: the curve starts at the untrained model's loss.
        if done == 1 or done % int(train.log_every) == 0 or done == total:
            if spec.interval_metrics is not None:
                logs = {**logs, **spec.interval_metrics()}
            logs = all_reduce_mean(logs, session.device)
            rates = meter.rates()
            logs.update(
                {
                    "step": float(done),  # the driver's progress bar follows it (tracking.follow_run)
                    "lr": float(main.get_lr()[0]),
                    f"{spec.sample_unit}_per_s": rates["samples_per_s"],
                    "tokens_per_s": rates["tokens_per_s"],
                    "peak_memory_gib": peak_memory_bytes(session.device) / 2**30,
                }
            )
            grad_norm = main.get_global_grad_norm()
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            for name, engine in list(spec.engines.items())[1:]:  # e.g. the discriminator's own
                logs[f"{name}_lr"] = float(engine.get_lr()[0])
                other_norm = engine.get_global_grad_norm()
                if other_norm is not None:
                    logs[f"{name}_grad_norm"] = float(other_norm)
            if "mfu" in rates:
                logs["mfu"] = rates["mfu"]
            session.log_metrics(logs, step)
            bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
        if (
            spec.log_images is not None
            and int(train.image_log_every) > 0
            and (done % int(train.image_log_every) == 0 or done == total)
        ):
            spec.log_images(step)
        # A preemption notice on any rank: every rank checkpoints this step now and stops.
        preempted = done < end and any_rank(PREEMPTED.is_set(), session.device)
        if done % int(train.checkpoint_every) == 0 or done == end or preempted:
            note = {"preempted": f"SIGTERM at step {done}"} if preempted else None
            session.save(
                spec.engines,
                done,
                {
                    "step": done,
                    "rng": rng_state(),
                    "extra": spec.get_extra_state(),
                    "data": {"split": split, "salt": salt},
                },
                spec.ema,
                {k: v for k, v in logs.items() if isinstance(v, float)},
                note,
            )
        if preempted:
            if session.is_logger:
                print(
                    f"[{session.stage}] preemption notice (SIGTERM): checkpoint at step {done} "
                    "written; stopping",
                    flush=True,
                )
            break


def final_checkpoint(cfg: Any, stage: str) -> tuple[str | None, int, dict]:
    """(url, step, reported metrics) of the stage's newest complete checkpoint on storage (also
    right when a rerun had nothing left to do and reported nothing to Ray); (None, 0, {}) if none."""
    latest = latest_checkpoint(experiment_url(cfg, stage))
    if latest is None:
        return None, 0, {}
    return latest[0], int(latest[1]["step"]), dict(latest[1].get("metrics") or {})
