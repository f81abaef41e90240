"""Evaluation stage on real local Ray with 2 actors: each val image reconstructed exactly once,
metrics logged to a real MLflow sqlite store, sampling into PNG shards + ADM npz, gen metrics with
the probe stand-in (never named FID), make-ref, CFG search. Tiny random models; seconds each."""

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from conftest import NANO_TOKENIZER, write_tokenizer_export

from configs.loading import load_config
from infra import paths
from infra.manifest import write_manifest
from infra.stages import stage_fingerprint

NUM_CLASSES = 4
TINY_OVERRIDES = [
    "data.image_size=32",
    f"data.synthetic.num_classes={NUM_CLASSES}",
    *NANO_TOKENIZER,
    "tokenizer.channel_mult=[1,1,2]",
    "generator.size=tiny",
    "generator.vocab_size=64",
    "generator.levels=[1,1,2,4,8]",
    f"generator.num_classes={NUM_CLASSES}",
    "generator.ar_tokens=4",
    "eval.num_actors=2",
    "eval.batch_size=16",
    "eval.feature_net=probe",
    "eval.probe_steps=40",
    "eval.num_samples_per_class=6",
    "eval.samples_per_shard=10",
    "eval.grid_images=4",
    "sampling.batch_size=12",
    "sampling.cfg_scale=1.5",
    "cluster.num_workers=2",
]


def tiny_cfg(work_dir, extra=()):
    # one MLflow store for the session's tests (pytest's base temp dir): a new sqlite store costs
    # seconds of migrations on 2 cores
    uri = f"sqlite:///{work_dir.parent.parent}/mlflow-eval.db"
    return load_config(
        None, [f"work_dir={work_dir}", f"tracking.tracking_uri={uri}", *TINY_OVERRIDES, *extra]
    )


def write_split(cfg, split, per_class, shard_size):
    """Prep-format shards (`<split>-NNNNNN.tar`: <key>.png + <key>.cls) of the synthetic set;
    returns (keys, the manifest's split entry)."""
    from data_prep.synthetic import render, sample_class, sample_rng
    from infra.image_shards import write_png_shard

    n = per_class * NUM_CLASSES
    samples = []
    for i in range(n):
        cls = sample_class(i, NUM_CLASSES)
        samples.append((f"{split}_{i:06d}", render(cls, sample_rng(0, split, i), 32), cls))
    out = paths.shards_url(cfg)
    entries = []
    for j in range(0, n, shard_size):
        name = f"{split}-{j // shard_size:06d}.tar"
        sha = write_png_shard(f"{out}/{name}", samples[j : j + shard_size])
        entries.append({"shard": name, "count": len(samples[j : j + shard_size]), "sha256": sha, "bytes": 0})
    return [s[0] for s in samples], {"shards": entries, "total": n}


def write_models(cfg, seed=0, tokenizer_dir=None):
    """Exports in the train stages' format (jobs.training.checkpoints), random tiny weights, manifests."""
    from jobs.training.checkpoints import generator_config, write_export
    from models.generator import GPT

    write_tokenizer_export(cfg, seed=seed, stage_dir=tokenizer_dir)
    gpt = GPT(generator_config(cfg)).state_dict()
    stage_dir = paths.stage_dir(cfg, "train_generator")
    write_export(stage_dir, "generator", gpt, gpt, cfg)
    write_manifest(stage_dir, "train_generator", stage_fingerprint(cfg, "train_generator"), complete=True)


def write_prep(cfg, val_per_class=6, val_shard=5, train_per_class=12, train_shard=16):
    val_keys, val = write_split(cfg, "val", val_per_class, val_shard)
    _, train = write_split(cfg, "train", train_per_class, train_shard)
    write_manifest(
        paths.stage_dir(cfg, "prep"),
        "prep",
        stage_fingerprint(cfg, "prep"),
        complete=True,
        shards_url=paths.shards_url(cfg),
        num_classes=NUM_CLASSES,
        splits={"val": val, "train": train},
    )
    return val_keys


def damage_first_png(shard):
    """Rewrites a tar shard with its first PNG's bytes replaced by garbage (damage after writing)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"not a png" if member.name == first_png else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def make_workdir(tmp_path, val_per_class=6, val_shard=5, extra=()):
    cfg = tiny_cfg(tmp_path / "work", extra)
    val_keys = write_prep(cfg, val_per_class, val_shard)
    write_models(cfg)
    return cfg, val_keys


@pytest.mark.slow
def test_recon_eval_each_image_once_with_two_actors(tmp_path, ray_local):
    from infra import tracking
    from jobs.evaluation.recon import evaluate_recon

    cfg, val_keys = make_workdir(tmp_path, extra=["eval.keep_lengths=[4,8]"])
    with tracking.stage_run(cfg, "evaluate") as run_id:
        report = evaluate_recon(cfg, run_id)
    # 24 images in 5 shards (5,5,5,5,4) dealt i % 2: shards 0,2,4 (14) and 1,3 (10), each once
    assert report["num_actors"] == 2 and report["num_shards"] == 5
    assert report["num_images"] == report["expected_images"] == len(val_keys) == 24
    assert report["images_per_actor"] == [14, 10]
    m = report["metrics"]
    assert {
        "fd_probe_recon",
        "fd_probe_recon_keep4",
        "fd_probe_recon_keep8",
        "psnr",
        "ssim",
        "codebook_usage",
        "codebook_entropy_bits",
        "probe_recon_class_consistency",
    } <= set(m)
    assert not any("fid" in k for k in m), "probe numbers must never be named FID"
    assert "lpips_vgg" not in m and report["lpips"].startswith("omitted: ")  # no VGG weights offline

    assert 0 < m["codebook_usage"] <= 1 and 0 <= m["codebook_entropy_bits"] <= np.log2(64)
    logged = tracking.client_for(paths.tracking_uri(cfg)).get_run(run_id)
    assert logged.data.metrics["fd_probe_recon"] == pytest.approx(m["fd_probe_recon"])
    assert logged.data.tags["restok.lpips"].startswith("omitted")
    history = tracking.client_for(paths.tracking_uri(cfg)).get_metric_history(
        run_id, "fd_probe_recon_by_kept_tokens"
    )
    assert sorted(h.step for h in history) == [4, 8, 16]
    # The CPU actors started with glibc told to keep freed memory (ClusterConfig.cpu_worker_malloc_keep).
    import ray

    from infra.ray_connect import worker_malloc_env
    from jobs.evaluation.pool import get_pool

    pool = get_pool(cfg)
    seen = ray.get(
        [
            a.__ray_call__.remote(lambda _: {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
            for a in pool.actors
        ]
    )
    assert seen == [worker_malloc_env(cfg, os.environ)] * 2 and seen[0]

    # A val PNG damaged after prep wrote it: the metrics refuse the short set, naming where it is.
    damage_first_png(os.path.join(paths.shards_url(cfg), "val-000002.tar"))
    with tracking.stage_run(cfg, "evaluate") as damaged_run:
        with pytest.raises(ValueError, match=f"{paths.shards_url(cfg)}: 23 of the 24 val images prep wrote"):
            evaluate_recon(cfg, damaged_run)


@pytest.mark.slow
def test_recon_inception_score_is_one_score_whatever_the_actors_return_order(tmp_path, ray_local):
    """The val split is class-sorted and the actors' results arrive shard i % n by shard: the
    reconstructions' IS is one score over the set (the release's evaluator), so 1 and 2 actors give
    the same number (IS over contiguous slices changed with the order)."""
    from infra import tracking
    from jobs.evaluation.recon import evaluate_recon

    scores = []
    for n in (1, 2):
        inception = ["eval.feature_net=inception", "eval.inception_weights=random-untrained"]
        cfg, _ = make_workdir(tmp_path / f"actors{n}", extra=[*inception, f"eval.num_actors={n}"])
        with tracking.stage_run(cfg, "evaluate") as run_id:
            report = evaluate_recon(cfg, run_id)
        assert report["num_images"] == 24 and report["num_actors"] == n
        scores.append(report["metrics"]["recon_inception_score_random_untrained"])
    # random weights score ~1 + 2e-5; slicing moved it by 2e-6 relative, summation order by 1e-11
    assert scores[0] > 1.0 and scores[1] == pytest.approx(scores[0], rel=1e-9, abs=0)


@pytest.mark.slow
def test_evaluate_stage_gen_sampling_npz_and_skip(tmp_path, ray_local):
    from infra.image_shards import read_image_shard
    from jobs.evaluate import run

    cfg, _ = make_workdir(tmp_path, extra=["eval.recon=false"])
    manifest = run(cfg)
    gen = manifest["gen"]
    assert gen["num_samples"] == 6 * NUM_CLASSES and gen["num_actors"] == 2
    m = gen["metrics"]
    assert {"fd_probe_gen", "probe_class_consistency", "probe_precision", "probe_recall"} <= set(m)
    assert not any("fid" in k or k == "inception_score" for k in m)
    # samples: PNG shards + ADM npz, class-balanced, uint8 NHWC
    sample_dir = gen["samples"]
    npz = np.load(os.path.join(sample_dir, "samples.npz"))
    assert npz["arr_0"].shape == (24, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["arr_1"]).tolist() == [6] * NUM_CLASSES
    # the release's order: labels interleaved, every block of NUM_CLASSES holds each class once
    assert (np.sort(npz["arr_1"].reshape(-1, NUM_CLASSES), 1) == np.arange(NUM_CLASSES)).all()
    keys = [
        k
        for f in sorted(os.listdir(sample_dir))
        if f.endswith(".tar")
        for k, _, _ in read_image_shard(os.path.join(sample_dir, f))
    ]
    assert len(keys) == len(set(keys)) == 24
    # a rerun with the same fingerprint is skipped
    assert run(cfg)["written_at"] == manifest["written_at"]

    # A sample PNG damaged after the set was made: the metrics refuse the short set, naming it.
    from jobs.evaluation.gen import evaluate_gen

    damage_first_png(
        os.path.join(sample_dir, sorted(f for f in os.listdir(sample_dir) if f.endswith(".tar"))[0])
    )
    with pytest.raises(ValueError, match=f"{sample_dir}: 23 of the 24 images of the sample set"):
        evaluate_gen(cfg, None)


@pytest.mark.slow
def test_make_ref_and_cfg_search(tmp_path, ray_local):
    from infra import tracking
    from jobs.evaluation.gen import cfg_search
    from jobs.evaluation.reference import make_reference
    from jobs.metrics.fid import load_reference_stats

    cfg, _ = make_workdir(
        tmp_path,
        extra=[
            "eval.cfg_search_scales=[1.0,2.0]",
            "eval.cfg_search_start_ratios=[0.0]",
            "eval.num_samples_per_class=3",
        ],
    )
    ref_url = make_reference(cfg, str(tmp_path / "ref.npz"))
    ref = load_reference_stats(ref_url)
    assert ref.feature_net == "probe" and ref.num_images == 48 and ref.features.shape == (48, 128)
    cfg.eval.reference_stats = ref_url
    with tracking.stage_run(cfg, "evaluate") as run_id:
        result = cfg_search(cfg, run_id)
    assert len(result["points"]) == 2 and result["metric"] == "fd_probe_gen"
    assert result["best"]["fd_probe_gen"] == min(p["fd_probe_gen"] for p in result["points"])
    client = tracking.client_for(paths.tracking_uri(cfg))
    for p in result["points"]:
        child = client.get_run(p["child_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == run_id and "fd_probe_gen" in child.data.metrics
    steps = client.get_metric_history(run_id, "cfg_search_fd_probe_gen")
    assert sorted(s.step for s in steps) == [0, 1]


def test_inception_features_worker_in_process(tmp_path):
    """EvalWorker.features with the Inception path (test-written random weights, real architecture):
    pool, probabilities and the sFID spatial features reach the FeatureSet; real metric names."""
    from jobs.evaluation.features import distance_name
    from jobs.evaluation.pool import EvalWorker
    from jobs.metrics.inception import STATE_DICT_FILE, build_fid_inception

    cfg = tiny_cfg(tmp_path / "work")
    write_split(cfg, "val", 1, 4)  # 4 images in one shard
    weights = tmp_path / STATE_DICT_FILE
    torch.manual_seed(0)
    torch.save(build_fid_inception().state_dict(), weights)
    spec = {"kind": "inception", "weights": str(weights), "probe_path": ""}
    out = EvalWorker("cpu").features([f"{paths.shards_url(cfg)}/val-000000.tar"], spec, 32, 4, 10)
    fs = out["features"]
    assert len(out["keys"]) == 4 and fs.pool.count == 4 and fs.pool.dim == 2048
    assert fs.spatial is not None and fs.spatial.dim == 7 * 17 * 17
    assert fs.probs_array().shape == (4, 1008) and fs.pool.num_kept == 4
    assert (distance_name("inception", "recon"), distance_name("inception", "gen")) == ("rfid", "gfid")
    assert (distance_name("probe", "recon"), distance_name("probe", "gen")) == (
        "fd_probe_recon",
        "fd_probe_gen",
    )


@pytest.mark.parametrize(
    "use_ema, weights", [(True, "tokenizer_ema.safetensors"), (False, "tokenizer.safetensors")]
)
def test_samples_decode_with_the_tokenizer_weights_the_codes_came_from(tmp_path, use_ema, weights):
    """extract.use_ema picks the weights that tokenized the training codes; the generator's codes
    decode with those (their codebook and decoder), not always the EMA's."""
    from jobs.evaluation.generation import generate_samples

    cfg = tiny_cfg(tmp_path / "work", [f"extract.use_ema={use_ema}"])
    write_models(cfg)

    class StopAtTheCall:  # test-only stand-in for the actor pool: records what the actors get
        size = 1

        def call(self, method, per_actor, labels, tokenizer, *rest):
            self.tokenizer = tokenizer
            raise RuntimeError("stop")

    pool = StopAtTheCall()
    with pytest.raises(RuntimeError, match="stop"):
        generate_samples(
            cfg,
            str(tmp_path / "samples"),
            paths.stage_dir(cfg, "train_tokenizer"),
            paths.stage_dir(cfg, "train_generator"),
            pool=pool,
        )
    assert pool.tokenizer == os.path.join(paths.stage_dir(cfg, "train_tokenizer"), weights)
