"""Shared test setup: a local Ray, the nano model overrides, a nano config and a random tokenizer
export with its manifest (what extraction, generator training and evaluation read).

Test modules import the plain helpers (`from conftest import nano_cfg, ...`: pytest puts tests/ on
the path) and request the fixtures by name."""

import compileall
import os
import shutil
import subprocess
import sys

# Two cores shared by every process a test starts (DEVELOPERS.md "Known traps"); set before torch
# is imported (it reads OMP_NUM_THREADS then), hence the imports below this block.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from configs.loading import load_config
from infra import paths
from infra.manifest import write_manifest
from infra.ray_connect import connect_ray
from infra.stages import stage_fingerprint
from jobs.training import checkpoints
from models.tokenizer import ResTok

# A nano ResTok: 16 tokens in levels [1, 1, 2, 4, 8], 64 codes, no VF heads (seconds on a CPU).
NANO_VOCAB, NANO_LEVELS = 64, [1, 1, 2, 4, 8]
# Tiny random frozen networks (logged with a _random_untrained suffix) for LPIPS, the VF teacher and
# the discriminator: the full tokenizer objective at 32 px without pretrained weights.
RANDOM_UNTRAINED_LOSS_NETS = dict(
    lpips_backbone="random-untrained",
    vf_teacher="vit_tiny_patch16_224",
    vf_teacher_backbone="random-untrained",
    vf_teacher_resolution=32,
    vf_teacher_kwargs={"depth": 1},
    disc_backbone_name="vit_tiny_patch16_224",
    disc_backbone="random-untrained",
    disc_resolution=32,
    disc_feature_blocks=[0],
    disc_backbone_kwargs={"depth": 1},
    disc_virtual_batch=2,
)
NANO_TOKENIZER = [
    "tokenizer.encoder_size=nano",
    "tokenizer.decoder_size=nano",
    "tokenizer.image_size=32",
    "tokenizer.pixel_channels=16",
    "tokenizer.channel_mult=[1,2,2]",
    "tokenizer.num_res_blocks=1",
    "tokenizer.z_channels=32",
    "tokenizer.cnn_norm_groups=8",
    f"tokenizer.levels={NANO_LEVELS}",
    f"tokenizer.codebook_size={NANO_VOCAB}",
    "tokenizer.num_scales=2",
    "tokenizer.vf_align=none",
]
# The built-in data at 32 px, 4 classes, one prep task.
NANO_DATA = [
    "data.image_size=32",
    "data.synthetic.num_classes=4",
    "data.synthetic.val_per_class=2",
    "data.prep_tasks=1",
]


# The heaviest modules first, so the two xdist workers (-n 2 --dist loadfile) finish together: the
# light modules fill in at the end instead of a long module running alone there (xdist's own order,
# by number of tests, handed test_readme and test_submit out among the last third). Seconds per
# module on 2 cores from `pytest --durations=120` of 2026-12-01, adjusted by estimate for tests
# added or removed since; a module not listed runs after these, in file order.
HEAVIEST_MODULES = [
    "test_cluster_faults.py",  # ~610 s
    "test_recipe.py",  # ~420 s
    "test_train_tokenizer.py",  # ~310 s
    "test_train_generator.py",  # ~260 s
    "test_submit.py",  # ~260 s
    "test_s3.py",  # ~230 s
    "test_sweep_checkpoints.py",  # ~210 s
    "test_readme.py",  # ~190 s
    "test_cli_paths_and_errors.py",  # ~175 s
    "test_killed_resume.py",  # ~170 s
    "test_extract_codes.py",  # ~100 s
]


# Our packages, byte-compiled once per session: the suite starts hundreds of processes (drivers,
# Ray workers, actors) that import them, and under PYTHONDONTWRITEBYTECODE (set in many CI images)
# each would compile them from source again (~0.25 CPU-s a process).
PACKAGES = ("configs", "data_prep", "infra", "jobs", "models", "pipeline")


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the xdist controller (or a plain run), once
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for package in PACKAGES:
            compileall.compile_dir(os.path.join(root, package), quiet=2)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


def nano_cfg(work_dir, *extra):
    """A config with the nano tokenizer on the built-in 32 px data under `work_dir` (+ overrides)."""
    return load_config(None, [f"work_dir={work_dir}", *NANO_DATA, *NANO_TOKENIZER, *extra])


def write_tokenizer_export(cfg, seed=None, stage_dir=None):
    """A train_tokenizer export of random weights in the real format, with a complete manifest."""
    if seed is not None:
        torch.manual_seed(seed)
    tok = ResTok(checkpoints.tokenizer_config(cfg))
    stage_dir = stage_dir or paths.stage_dir(cfg, "train_tokenizer")
    checkpoints.write_export(stage_dir, "tokenizer", tok.state_dict(), tok.state_dict(), cfg)
    write_manifest(
        stage_dir,
        "train_tokenizer",
        stage_fingerprint(cfg, "train_tokenizer"),
        complete=True,
        levels=list(tok.levels),
        codebook_size=int(tok.codebook_size),
        num_tokens=int(tok.num_tokens),
    )
    return tok


# The installed console script next to this interpreter (what a user types).
RESTOK = shutil.which("restok", path=os.path.dirname(sys.executable)) or "restok"
# The recipe preset reads these through ${oc.env:...} (pipeline.submit.FORWARDED_ENV): a user's
# own settings must not leak into a test's run.
SITE_ENV = ("RESTOK_WORK_DIR", "RESTOK_DATA_ROOT", "RESTOK_STORAGE_PATH", "MLFLOW_TRACKING_URI")


def ema_parts_match(checkpoint_dir: str, exported: dict[str, torch.Tensor]) -> int:
    """Every EMA part a checkpoint's ranks saved (ema_rank<r>.safetensors: a whole tensor, or a
    range of the flattened weight starting where its `ema_fragments` metadata says) equals that
    range of `exported`; returns how many elements the parts hold."""
    import glob
    import json

    from safetensors import safe_open

    held = 0
    for path in glob.glob(os.path.join(checkpoint_dir, "ema_rank*.safetensors")):
        with safe_open(path, "pt") as fh:
            starts = json.loads((fh.metadata() or {}).get("ema_fragments", "{}"))
            for name in fh.keys():
                part = fh.get_tensor(name).reshape(-1)
                start = starts.get(name, 0)
                assert torch.equal(exported[name].reshape(-1)[start : start + part.numel()], part), name
                held += part.numel()
    return held


def run_restok(*argv: str, cwd, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`restok ARGV` in `cwd` as a user runs it (one OpenMP thread per process: 2 cores), output
    captured."""
    base = {k: v for k, v in os.environ.items() if k not in SITE_ENV}
    return subprocess.run(
        [RESTOK, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (and the evaluation actor pool it starts, closed after)."""
    import ray  # here: importing Ray costs seconds, and most test modules never start it

    from jobs.evaluation.pool import close_pool

    start_local_ray()
    yield
    close_pool()
    ray.shutdown()


def start_local_ray() -> bool:
    """A local Ray started as the product starts one (infra.ray_connect: no dashboard, a state-API
    address of its own); False if one was already up."""
    return connect_ray(load_config(None, []))


class S3RequestLog:
    """WSGI middleware recording (method, path, Range header) of every request the S3 server
    answers, from any process (driver, Ray tasks, Train workers, the MLflow server)."""

    def __init__(self, app):
        self.app, self.requests = app, []

    def __call__(self, environ, start_response):
        request = (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE"))
        self.requests.append(request)
        return self.app(environ, start_response)

    def gets(self, path_suffix: str) -> list:
        """Range headers (None = whole object) of the GETs of objects whose path ends so."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(path_suffix)]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port with one bucket, configured the way a user points
    any S3 client at an S3-compatible store: AWS_ENDPOINT_URL and credentials in the environment
    (botocore/s3fs, pyarrow for Ray Train storage and the MLflow server all read them). Yields
    {"url", "bucket", "log", "env"}; teardown fails if the bucket is not left empty."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    log = S3RequestLog(server._server.app)
    server._server.app = log  # werkzeug's handler calls server.app per request
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "restok-test",
        "AWS_SECRET_ACCESS_KEY": "restok-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    bucket = "restok-test"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    try:
        yield {"url": env["AWS_ENDPOINT_URL"], "bucket": bucket, "log": log, "env": env}
        left = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not left, f"objects left in s3://{bucket}: {left[:10]}"
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
