"""The cluster path against a real S3 API (issue 15): moto's S3 server on loopback
(conftest.s3_endpoint), reached the way a user reaches any S3-compatible store (AWS_ENDPOINT_URL and
credentials in the environment). Data root, shards, work dir, Ray Train storage and the MLflow
server's artifact store all live in the bucket; the server's own request log counts the reads.

Each test works under its own prefix, deleted at teardown; the fixture fails if the bucket is not
left empty, and the tests check that no temporary (`.tmp-*`) object is left behind.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from conftest import run_restok, start_local_ray
from recipe_helpers import write_imagenet_folder, write_imagenet_tars

from configs.loading import load_config
from data_prep import fsspec_gopen, prepare, sources  # noqa: F401  (s3:// for webdataset)
from data_prep.sources import ImageNetFolderSource
from infra import storage

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_s3(s3_endpoint):
    """A local Ray started after the endpoint's environment is set (its workers inherit it)."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def prefix(s3_endpoint):
    """A fresh s3:// prefix for one test, deleted after it (with a check for temporaries)."""
    url = f"s3://{s3_endpoint['bucket']}/{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def objects(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    return fs.find(path)


def assert_no_temporaries(url: str) -> None:
    left = [p for p in objects(url) if storage.TMP_MARKER in p]
    assert not left, left


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """Both layouts on local disk: 4 classes x 8 train images, 8 flat val images + CSV."""
    root = tmp_path_factory.mktemp("imagenet")
    folder = write_imagenet_folder(root / "folder")
    return {"folder": folder, "tars": write_imagenet_tars(folder, root / "tars")}


def upload(local: Path, url: str) -> str:
    fs, path = storage.filesystem(url)
    fs.put(f"{local}/", f"{path}/", recursive=True)
    return url


def expected_labels(folder: Path, split: str) -> dict[str, int]:
    return {key: cls for key, cls, _ in ImageNetFolderSource(str(folder)).sample_refs(split)}


def read_shards(manifest: dict, split: str) -> dict[str, int]:
    urls = [storage.join(manifest["shards_url"], s["shard"]) for s in manifest["splits"][split]["shards"]]
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return {s["__key__"]: int(s["cls"]) for s in samples}


def prep_cfg(work: str, *overrides: str):
    return load_config(None, [f"work_dir={work}", "data.prep_tasks=2", *overrides])


def shard_ranges(job, gap: int = sources.MAX_STREAM_GAP) -> list[str]:
    """The Range headers a shard's read plan asks for (runs < READ_BLOCK here): one forward range
    per class tar it touches, from its first member's header to its last member's end; ranges of
    one tar closer than `gap` are read as one (streaming through a small gap beats a round trip)."""
    by_class: dict[int, list] = {}
    for ref in job.refs:
        by_class.setdefault(ref[1], []).append(ref[2])
    spans = sorted(
        (min(loc[1] for loc in locs), max(loc[2] + loc[3] for loc in locs)) for locs in by_class.values()
    )
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start - merged[-1][1] <= gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [f"bytes={a}-{b - 1}" for a, b in merged]


def test_tar_prep_on_s3_lists_once_and_reads_each_class_tar_forward(
    s3_endpoint, ray_s3, fake_imagenet, prefix
):
    log = s3_endpoint["log"]
    root = upload(fake_imagenet["tars"], f"{prefix}/imagenet-tar")
    shared = f"{prefix}/shards"
    overrides = [
        "data.source=imagenet_tar",
        f"data.root={root}",
        f"data.shards_url={shared}",
        "data.samples_per_shard=12",
    ]
    cfg = prep_cfg(f"{prefix}/work", *overrides)

    mark = len(log.requests)
    t0 = time.perf_counter()
    manifest = prepare.run(cfg)
    print(f"tar prep on S3: {time.perf_counter() - t0:.1f}s, {len(log.requests) - mark} requests")
    for split in ("train", "val"):
        assert read_shards(manifest, split) == expected_labels(fake_imagenet["folder"], split)
    # One directory per data config under the shared URL.
    assert re.fullmatch(rf"{shared}/prep-{manifest['fingerprint']}-[0-9a-f]{{8}}", manifest["shards_url"])

    # Listing: one Ray task per class tar, kept beside the manifest.
    listing = manifest["listing"]["train"]
    assert (listing["reused"], listing["tasks"], listing["images"]) == (False, 4, 32)
    kept_url = f"{prefix}/work/prep/listing-train.json.gz"
    kept = json.loads(gzip.decompress(storage.filesystem(kept_url)[0].cat_file(kept_url)))
    assert kept["url"] == f"{root}/ILSVRC2012_img_train.tar"
    assert [len(c["members"]) for c in kept["class_tars"]] == [8, 8, 8, 8]

    # Reads: every train shard reads each class tar it touches as one forward range; the server
    # saw exactly the listing's reads plus those.
    source = sources.make_source(cfg.data)
    source.attach_listing("train", f"{prefix}/work/prep/listing-train.json.gz")
    jobs = [
        j
        for j in prepare.plan_jobs(source, cfg, manifest["shards_url"], manifest["fingerprint"])
        if j.split == "train"
    ]
    records = {j.name: storage.read_json(j.done_url) for j in jobs}
    train_gets = log.gets("/ILSVRC2012_img_train.tar")
    planned = Counter(r for j in jobs for r in shard_ranges(j))
    for job in jobs:  # a bounded number of GETs per shard: at most one per class tar touched
        assert records[job.name]["source_requests"] == len(shard_ranges(job)) <= len({r[1] for r in job.refs})
    assert not planned - Counter(train_gets), (planned, train_gets)
    assert len(train_gets) == listing["requests"] + sum(planned.values())
    reads = manifest["written_this_run"]["source_reads"]
    images = 32 + 8
    assert reads["gets_per_image"] == round(reads["requests"] / images, 4) and reads["gets_per_image"] < 0.5
    assert reads["mb_per_s"] > 0

    # Resume after a kill (no manifest, one shard lost): the kept listing is read instead of
    # scanning tar headers, and the only tar reads are the lost shard's forward ranges.
    fs, _ = storage.filesystem(prefix)
    fs.rm(f"{prefix}/work/prep/manifest.json")
    fs.rm(storage.join(manifest["shards_url"], "train-000001.tar"))
    fs.invalidate_cache()
    mark = len(log.requests)
    again = prepare.run(cfg)
    rerun = log.requests[mark:]

    def gets(suffix):
        return [r for m, p, r in rerun if m == "GET" and p.endswith(suffix)]

    assert again["listing"]["train"]["reused"] and again["listing"]["val"]["reused"]
    assert gets("/listing-train.json.gz") and gets("/listing-val.json.gz")
    assert sorted(gets("/ILSVRC2012_img_train.tar")) == sorted(shard_ranges(jobs[1]))
    assert gets("/ILSVRC2012_img_val.tar") == []
    assert again["written_this_run"]["shards"] == 1 and again["splits"] == manifest["splits"]

    # A second data config on the same shards_url leaves the first one's shards intact.
    other = prepare.run(prep_cfg(f"{prefix}/work-small", *overrides, "data.max_images_per_split=8"))
    assert other["shards_url"] != manifest["shards_url"] and other["splits"]["train"]["total"] == 8
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert storage.sha256_url(storage.join(manifest["shards_url"], shard["shard"])) == shard["sha256"]
    assert_no_temporaries(prefix)


def test_folder_prep_on_s3(s3_endpoint, ray_s3, fake_imagenet, prefix):
    root = upload(fake_imagenet["folder"], f"{prefix}/imagenet-folder")
    cfg = prep_cfg(
        f"{prefix}/work",
        "data.source=imagenet_folder",
        f"data.root={root}",
        f"data.shards_url={prefix}/shards",
        "data.samples_per_shard=12",
    )
    manifest = prepare.run(cfg)
    for split in ("train", "val"):
        assert read_shards(manifest, split) == expected_labels(fake_imagenet["folder"], split)
    # One whole-object GET per image; a train shard holds several classes.
    assert manifest["written_this_run"]["source_reads"]["gets_per_image"] == 1.0
    first = storage.join(manifest["shards_url"], "train-000000.tar")
    samples = wds.DataPipeline(wds.SimpleShardList([first]), wds.tarfile_to_samples())
    classes = {int(s["cls"]) for s in samples}
    assert len(classes) == 4
    assert_no_temporaries(prefix)


def test_tar_reads_are_forward_ranges_one_per_class_tar(s3_endpoint, fake_imagenet, prefix, monkeypatch):
    """In one process against the endpoint: a shard's refs (in locality order) are read as one
    forward range per class tar when runs are far apart (MAX_STREAM_GAP=1 KiB, past a member's
    header and padding, stands for ImageNet's 140 MB class tars), and a run longer than READ_BLOCK
    in consecutive forward ranges."""
    root = upload(fake_imagenet["tars"], f"{prefix}/imagenet-tar")
    cfg = prep_cfg(
        f"{prefix}/work", "data.source=imagenet_tar", f"data.root={root}", "data.samples_per_shard=12"
    )
    source = sources.make_source(cfg.data)
    log = s3_endpoint["log"]

    def ranged_gets(refs, stats):
        mark = len(log.requests)
        got = list(source.read(sorted(refs, key=source.locality_key), stats))
        ranges = [
            r for m, p, r in log.requests[mark:] if m == "GET" and p.endswith("/ILSVRC2012_img_train.tar")
        ]
        return got, ranges

    monkeypatch.setattr(sources, "MAX_STREAM_GAP", 1024)
    for job in prepare.plan_jobs(source, cfg, f"{prefix}/unused", "fp")[:3]:
        stats: dict = {}
        got, ranges = ranged_gets(job.refs, stats)
        assert sorted(ranges) == sorted(shard_ranges(job, gap=1024))
        assert len(ranges) == len({r[1] for r in job.refs}) == stats["requests"]
        assert sorted(k for (k, _, _), _ in got) == sorted(r[0] for r in job.refs)

    refs = [r for r in source.sample_refs("train") if r[1] == 2]  # one class tar, all members
    monkeypatch.setattr(sources, "READ_BLOCK", 4096)
    stats = {}
    got, ranges = ranged_gets(refs, stats)
    spans = [tuple(map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", r).groups())) for r in ranges]
    assert [k for (k, _, _), _ in got] == [r[0] for r in refs]
    assert len(spans) == stats["requests"] > 1
    assert spans[0][0] == refs[0][2][1] and spans[-1][1] == refs[-1][2][2] + refs[-1][2][3] - 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))  # forward, contiguous
    fs, _ = storage.filesystem(root)
    tar = f"{root}/ILSVRC2012_img_train.tar"
    assert [d for _, d in got] == [fs.cat_file(tar, start=r[2][2], end=r[2][2] + r[2][3]) for r in refs]
    assert_no_temporaries(prefix)


# ---------------------------------------------------------------- the pipeline on S3, end to end

NANO_RUN = [
    "data.synthetic.num_classes=4",
    "data.synthetic.train_per_class=16",
    "data.synthetic.val_per_class=2",
    "data.samples_per_shard=32",
    "data.loader_workers=0",
    "data.prep_tasks=1",
    "generator.num_classes=4",
    "tokenizer_train.steps=4",
    "tokenizer_train.checkpoint_every=2",
    "tokenizer_train.image_log_every=4",
    "tokenizer_train.global_batch_size=8",
    "tokenizer_train.micro_batch_size=8",
    "tokenizer_train.log_every=1",
    "tokenizer_train.optim.warmup_steps=1",
    "generator_train.steps=4",
    "generator_train.checkpoint_every=4",
    "generator_train.image_log_every=4",
    "generator_train.global_batch_size=8",
    "generator_train.micro_batch_size=8",
    "generator_train.log_every=1",
    "generator_train.optim.warmup_steps=1",
    "extract.num_actors=1",
    "extract.batch_size=16",
    "sampling.batch_size=8",
    "eval.num_samples_per_class=2",
    "eval.num_actors=1",
    "eval.batch_size=8",
    "eval.probe_steps=5",
    "cluster.num_workers=1",
    "cluster.cpus_per_worker=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explicit_resume_from_a_checkpoint_on_s3_is_read_on_the_worker(s3_endpoint, prefix, tmp_path):
    """`*_train.resume=s3://...` (checked on the driver through fsspec) is downloaded for the
    worker's plain-file reads, as the automatic resume's checkpoint is."""
    from jobs.training.ray_training import META_NAME, WorkerSession

    storage.write_json_atomic(storage.join(prefix, "ckpt", META_NAME), {"step": 3, "world": 1})
    session = WorkerSession(
        None, "train_tokenizer", "run", "", 0, 1, None, f"{prefix}/ckpt", "", str(tmp_path / "none"), 1, "fp"
    )
    with session.restore_dir() as directory:
        assert "://" not in directory
        with open(os.path.join(directory, META_NAME)) as fh:
            assert json.load(fh)["step"] == 3


def test_stage_lock_on_s3_is_won_by_one_of_two_racing_drivers(s3_endpoint, prefix, monkeypatch):
    """Both drivers see no lock (the race window, forced by an `exists` that always says no): the
    conditional write lets one create it; write-then-read-back let both believe they held it."""
    from pipeline import locks

    url = storage.join(prefix, "locks", "train_tokenizer.lock")
    fs, _ = storage.filesystem(url)
    monkeypatch.setattr(type(fs), "exists", lambda self, path, **kw: False)
    won = [locks._create_exclusive(url, {"token": t}) for t in ("a", "b")]
    assert won == [True, False]
    assert json.loads(fs.cat_file(url.removeprefix("s3://")))["token"] == "a"


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """`mlflow server --artifacts-destination s3://...` on loopback, as the runbook sets it up."""
    artifacts = f"s3://{s3_endpoint['bucket']}/mlflow-{uuid.uuid4().hex[:8]}"
    port = free_port()
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            artifacts,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # infra/RUNBOOK.md section 4
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 300  # a loaded 2-core CI box starts it in ~10-60 s
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    try:
        yield {"uri": url, "artifacts": artifacts}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        fs, path = storage.filesystem(artifacts)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture(scope="module")
def s3_pipeline(s3_endpoint, mlflow_server, tmp_path_factory):
    """One `restok run` with work_dir, cluster.storage_path and the MLflow artifacts on S3, split in
    two by tokenizer_train.stop_after (the second run resumes from the checkpoint on S3). Shared
    by the asserts below."""
    base = f"s3://{s3_endpoint['bucket']}/run-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"work_dir={base}/work",
        f"cluster.storage_path={base}/ray",
        f"tracking.tracking_uri={mlflow_server['uri']}",
        f"tracking.experiment=s3-{base[-8:]}",
        *NANO_RUN,
    ]
    cwd = tmp_path_factory.mktemp("cwd")
    try:
        t0 = time.perf_counter()
        first = run_restok("run", "--verbose", *overrides, "tokenizer_train.stop_after=2", cwd=cwd)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        second = run_restok("run", "--verbose", *overrides, cwd=cwd)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        print(f"restok run on S3 (stop_after=2, then resume): {time.perf_counter() - t0:.0f}s")
        for out in (first, second):
            print(out.stdout.rsplit("== restok run:", 1)[-1])
        cfg = load_config(None, overrides)
        yield {
            "cfg": cfg,
            "base": base,
            "first": first.stdout + first.stderr,
            "second": second.stdout + second.stderr,
            "mlflow": mlflow_server,
        }
    finally:
        fs, path = storage.filesystem(base)
        temporaries = [p for p in objects(base) if storage.TMP_MARKER in p]
        if fs.exists(path):
            fs.rm(path, recursive=True)
        assert not temporaries, temporaries


def test_s3_run_resumes_training_from_checkpoint_on_s3(s3_pipeline):
    from infra.manifest import read_manifest
    from infra.paths import ray_storage_path as paths_ray_storage
    from infra.paths import stage_dir
    from jobs.training.ray_training import experiment_url, list_checkpoints

    cfg = s3_pipeline["cfg"]
    newest = f"newest complete checkpoint: {paths_ray_storage(cfg)}/train_tokenizer-"
    assert newest.startswith(f"newest complete checkpoint: {s3_pipeline['base']}/ray/work-")
    assert newest in s3_pipeline["second"]
    assert "(step 2)" in s3_pipeline["second"]
    complete, incomplete = list_checkpoints(experiment_url(cfg, "train_tokenizer"))
    assert [step for step, _, _ in complete] == [2, 4] and not incomplete
    for stage in ("prep", "train_tokenizer", "extract_codes", "train_generator", "evaluate"):
        manifest = read_manifest(stage_dir(cfg, stage))
        assert manifest and manifest["complete"], stage
    tok = read_manifest(stage_dir(cfg, "train_tokenizer"))
    assert tok["steps_done"] == 4 and tok["ray_checkpoint"].startswith(f"{s3_pipeline['base']}/ray/")
    assert tok["registered_version"]  # registration works on an s3:// stage dir
    codes = read_manifest(stage_dir(cfg, "extract_codes"))
    assert objects(stage_dir(cfg, "extract_codes")) and codes["complete"]
    metrics = read_manifest(stage_dir(cfg, "evaluate"))["metrics"]
    assert metrics, "no evaluation metrics"


def test_s3_run_mlflow_artifacts_land_in_the_servers_store(s3_pipeline):
    from infra.tracking import client_for

    cfg, mlflow = s3_pipeline["cfg"], s3_pipeline["mlflow"]
    client = client_for(mlflow["uri"])
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's default, not a work dir
    runs = {
        r.data.tags["restok.stage"]: r
        for r in client.search_runs([exp.experiment_id])
        if "restok.stage" in r.data.tags
    }
    tok = runs["train_tokenizer"]
    assert [a.path for a in client.list_artifacts(tok.info.run_id, "checkpoints")]
    version = client.get_model_version_by_alias("restok-tokenizer", "last-trained")
    assert version.run_id == tok.info.run_id
    stored = objects(mlflow["artifacts"])
    assert any(p.endswith("/checkpoints/tokenizer_ema.safetensors") for p in stored), stored[:20]
    assert any(p.endswith("/config.yaml") for p in stored)
    assert any("/reconstructions/" in p for p in stored)
