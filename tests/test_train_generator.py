"""train_generator on real Ray Train + DeepSpeed (gloo, 2 workers) + MLflow sqlite, tiny GPT.

The code shards are written directly (learnable class-dependent codes), so this file does not
depend on a trained tokenizer; a random tiny tokenizer export is placed beside them so sample
grids are decoded and logged as they would be in a pipeline run.
"""

import os

import numpy as np
import pytest
import torch
from conftest import NANO_LEVELS, NANO_TOKENIZER, NANO_VOCAB, ema_parts_match, write_tokenizer_export
from safetensors.torch import load_file

from configs.loading import load_config
from infra import code_shards, paths, ray_connect, storage, tracking
from infra.manifest import ManifestError, read_manifest, write_manifest
from infra.stages import stage_fingerprint
from jobs import train_generator
from jobs.training import checkpoints, ray_training

pytestmark = pytest.mark.slow

STEPS, CKPT, VOCAB, LEVELS, CLASSES = 24, 8, NANO_VOCAB, NANO_LEVELS, 4


def make_cfg(work_dir, *extra):
    return load_config(
        None,
        [
            f"work_dir={work_dir}",
            *NANO_TOKENIZER,
            "generator.size=tiny",
            f"generator.vocab_size={VOCAB}",
            f"generator.levels={LEVELS}",
            f"generator.num_classes={CLASSES}",
            f"data.synthetic.num_classes={CLASSES}",
            "generator_train.global_batch_size=8",
            "generator_train.micro_batch_size=2",  # x 2 workers x 2 accumulation steps
            f"generator_train.steps={STEPS}",
            "generator_train.log_every=1",
            f"generator_train.checkpoint_every={CKPT}",
            f"generator_train.image_log_every={STEPS}",
            "generator_train.optim.lr=3e-3",
            "generator_train.optim.warmup_steps=2",
            "sampling.cfg_scale=1.0",
            *extra,
        ],
    )


def write_codes_stage(cfg):
    """An extract_codes stage: each class has its own code pattern, two views (original + shifted)."""
    stage_dir = paths.stage_dir(cfg, "extract_codes")
    samples = []
    for i in range(48):
        c = i % CLASSES
        base = (np.arange(16) * (c + 1) + 3 * c) % VOCAB
        samples.append((f"s{i:05d}", np.stack([base, (base + 1) % VOCAB]).astype(np.int16), c))
    storage.write_bytes_atomic(storage.join(stage_dir, "train-000000.tar"), code_shards.encode_shard(samples))
    write_manifest(
        stage_dir,
        "extract_codes",
        stage_fingerprint(cfg, "extract_codes"),
        complete=True,
        shards=[{"name": "train-000000.tar", "split": "train", "count": 48}],
        counts={"train": 48},
        code_shape=[2, 16],
        dtype="int16",
        codebook_size=VOCAB,
        levels=LEVELS,
        num_classes=CLASSES,
        tokenizer_sha256="0" * 64,
    )
    # A random tiny tokenizer export, so sample grids are decoded (as in a pipeline run).
    write_tokenizer_export(cfg)


def losses(cfg, run_id):
    client = tracking.client_for(paths.tracking_uri(cfg))
    history = client.get_metric_history(run_id, "loss")
    return [m.step for m in sorted(history, key=lambda m: m.step)], [
        m.value for m in sorted(history, key=lambda m: m.step)
    ]


def train(cfg, run_id=None):
    run_id = run_id or tracking.start_run(cfg, "train_generator")
    manifest = train_generator.run(cfg, run_id=run_id)
    return manifest, run_id


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    """ZeRO-1, straight through: the reference losses for every other test here."""
    cfg = make_cfg(tmp_path_factory.mktemp("gen-z1"), "generator_train.zero_stage=1")
    write_codes_stage(cfg)
    manifest, run_id = train(cfg)
    return cfg, manifest, run_id, losses(cfg, run_id)


def test_baseline_learns_exports_and_tracks(baseline):
    cfg, manifest, run_id, (steps, values) = baseline
    assert manifest["complete"] and manifest["steps_done"] == STEPS
    assert steps == list(range(STEPS))
    assert np.mean(values[-4:]) < 0.75 * np.mean(values[:2]), values  # loss falls on the tiny preset
    # The export is what later stages load: fp32 safetensors + config, raw and EMA differ.
    stage_dir = paths.stage_dir(cfg, "train_generator")
    gpt = checkpoints.load_generator(stage_dir)
    raw = checkpoints.load_generator(stage_dir, ema=False)
    assert gpt.block_size == sum(LEVELS)
    assert not torch.equal(gpt.head.weight, raw.head.weight)
    # `restok export` of a kept mid-run checkpoint: its EMA file is the checkpoint's EMA.
    _, kept, _ = checkpoints.kept_checkpoints(stage_dir)
    assert sorted(kept) == [STEPS - CKPT, STEPS]  # keep_checkpoints=2
    mid = checkpoints.export_checkpoint(stage_dir, STEPS - CKPT)
    exported = load_file(f"{mid}/generator_ema.safetensors")
    trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    assert ema_parts_match(kept[STEPS - CKPT], exported) == trainable
    assert checkpoints.load_generator(mid).block_size == sum(LEVELS)
    # MLflow's own API: params, metrics, sample grid, registered model with aliases.
    client = tracking.client_for(paths.tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.data.params["generator_train.zero_stage"] == "1"
    assert run.data.tags["restok.stage"] == "train_generator"
    # CPU workers start with glibc told to keep freed activations (ClusterConfig.cpu_worker_malloc_keep).
    if not any(k.startswith("MALLOC_") for k in os.environ):
        expected = " ".join(sorted(f"{k}={v}" for k, v in ray_connect.CPU_WORKER_MALLOC_ENV.items()))
        assert run.data.tags["restok.worker_malloc"] == expected
    for key in ("loss", "lr", "grad_norm", "sequences_per_s", "tokens_per_s", "mfu", "peak_memory_gib"):
        assert key in run.data.metrics, key
    artifacts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert artifacts, "no sample grid logged"
    model = client.get_registered_model("restok-generator")
    assert "last-trained" in model.aliases
    version = client.get_model_version_by_alias("restok-generator", "last-trained")
    assert version.run_id == run_id
    # A local Ray's trainer sends no resource requests to an autoscaler (local_torch_trainer_class):
    # the detached actor that forwards them was never started.
    import ray

    assert "AutoscalingCoordinator" not in {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
    }


def test_zero3_matches_zero1(baseline, tmp_path):
    cfg = make_cfg(tmp_path, "generator_train.zero_stage=3", "generator_train.image_log_every=0")
    write_codes_stage(cfg)
    manifest, run_id = train(cfg)
    assert manifest["complete"]
    steps, values = losses(cfg, run_id)
    assert steps == list(range(STEPS))
    np.testing.assert_allclose(values, baseline[3][1], rtol=1e-4)
    checkpoints.load_generator(paths.stage_dir(cfg, "train_generator"))  # gathered ZeRO-3 export


def test_resume_equivalence(baseline, tmp_path):
    """K steps, stop, resume, N - K steps == N steps straight (identical fp32 losses)."""
    cfg = make_cfg(
        tmp_path,
        "generator_train.zero_stage=1",
        f"generator_train.stop_after={CKPT}",
        "generator_train.image_log_every=0",
    )
    write_codes_stage(cfg)
    first, run_id = train(cfg)
    assert not first["complete"] and first["steps_done"] == CKPT
    # stop_after is not in the fingerprint: the same Ray Train run is resumed from its checkpoint.
    resumed = make_cfg(tmp_path, "generator_train.zero_stage=1", "generator_train.image_log_every=0")
    second, _ = train(resumed, run_id)
    assert second["complete"]
    steps, values = losses(cfg, run_id)
    assert steps == list(range(STEPS))
    assert values == baseline[3][1]


def test_zero2_killed_worker_is_restarted_from_checkpoint(baseline, tmp_path, monkeypatch):
    """ZeRO-2: rank 1 dies at step 12; Ray Train restarts the group from the step-8 checkpoint
    (sharded optimizer states); every step is logged exactly once and the losses match the
    uninterrupted ZeRO-1 run."""
    monkeypatch.setenv(ray_training.TEST_CRASH_ENV, "12")
    cfg = make_cfg(
        tmp_path,
        "generator_train.zero_stage=2",
        "generator_train.max_failures=1",
        "generator_train.image_log_every=0",
    )
    write_codes_stage(cfg)
    manifest, run_id = train(cfg)
    assert manifest["complete"]
    assert storage.exists(
        storage.join(
            paths.ray_storage_path(cfg), ray_training.experiment_name(cfg, "train_generator") + ".crashed"
        )
    )
    steps, values = losses(cfg, run_id)
    assert steps == list(range(STEPS))  # once each
    np.testing.assert_allclose(values, baseline[3][1], rtol=1e-4)


def test_mismatched_vocabulary_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path)
    write_codes_stage(cfg)
    # Consistent with its own tokenizer (the loader checks that), not with the codes on disk:
    # codes made under another config are refused by their manifest's fingerprint ...
    bad = make_cfg(tmp_path, "generator.vocab_size=65", "tokenizer.codebook_size=65")
    with pytest.raises(ManifestError, match="made under another config"):
        train_generator.run(bad, run_id="unused")
    # ... and a manifest that claims this config over 64-code shards, by their codebook size.
    codes_dir = paths.stage_dir(cfg, "extract_codes")
    header = ("version", "stage", "fingerprint", "complete", "written_at")
    fields = {k: v for k, v in read_manifest(codes_dir).items() if k not in header}
    claimed = stage_fingerprint(bad, "extract_codes")
    write_manifest(codes_dir, "extract_codes", claimed, complete=True, **fields)
    with pytest.raises(ValueError, match="generator.vocab_size=64"):
        train_generator.run(bad, run_id="unused")


def test_code_batches_resume_exactly():
    codes = np.arange(40 * 2 * 3, dtype=np.int16).reshape(40, 2, 3)
    classes = np.arange(40) % 4
    loader = code_shards.CodeBatches(codes, classes, micro_batch=4, rank=1, world=2, seed=7)
    it = loader.iterate(0)
    straight = [next(it) for _ in range(13)]  # crosses an epoch boundary (5 batches per epoch)
    resumed = loader.iterate(9)
    for a, b in zip(straight[9:], [next(resumed) for _ in range(4)], strict=False):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = code_shards.CodeBatches(codes, classes, 4, rank=0, world=2, seed=7).iterate(0)
    mine = {int(v) // 6 for b in straight[:5] for v in b[0][:, 0]}  # sample index of each row
    theirs = {int(v) // 6 for b in [next(other) for _ in range(5)] for v in b[0][:, 0]}
    assert len(mine) == len(theirs) == 20 and not mine & theirs  # an epoch splits the samples


def test_code_batches_of_a_step_do_not_depend_on_world_or_micro_batch():
    """A resume on another world size or micro-batch size (both output-neutral) goes on with the
    same global batches, also past the first epoch: the epoch is cut into global batches."""
    codes = np.arange(1000 * 2 * 3, dtype=np.int16).reshape(1000, 2, 3)
    classes = np.arange(1000) % 4

    def steps(world, micro, start_step, count, global_batch=60):
        out = []
        its = [
            code_shards.CodeBatches(codes, classes, micro, r, world, 7, global_batch).iterate(
                start_step * global_batch // (micro * world)
            )
            for r in range(world)
        ]
        for _ in range(count):
            rows = set()
            for it in its:
                for _ in range(global_batch // (micro * world)):
                    c, _ = next(it)
                    rows |= {tuple(row) for row in c.tolist()}
            out.append(rows)
        return out

    straight = steps(2, 10, 0, 40)  # 16 steps per epoch: crosses two epoch boundaries
    assert all(len(rows) == 60 for rows in straight)
    assert steps(3, 10, 20, 20) == straight[20:] == steps(1, 20, 20, 20) == steps(2, 5, 20, 20)


def test_worker_malloc_env_cpu_only_and_users_settings_win(tmp_path):
    cfg = load_config("default", [f"work_dir={tmp_path}"])
    ours = ray_connect.CPU_WORKER_MALLOC_ENV
    assert ray_connect.worker_malloc_env(cfg, {}) == ours
    assert ray_connect.worker_malloc_env(cfg, {"MALLOC_ARENA_MAX": "2"}) == {"MALLOC_ARENA_MAX": "2"}
    cfg.cluster.use_gpu = True
    assert ray_connect.worker_malloc_env(cfg, {}) == {}
    cfg.cluster.use_gpu = False
    cfg.cluster.cpu_worker_malloc_keep = False
    assert ray_connect.worker_malloc_env(cfg, {}) == {}


def test_data_streams_continue_under_their_split_and_start_afresh_under_another():
    """A resume under the split the streams were drawn with continues them exactly; another world
    size, micro-batch size or loader process count (output-neutral) gets fresh streams from that
    step (the tokenizer's per-rank streams would otherwise replay batches on a grown world)."""
    split = {"world": 2, "micro_batch": 4, "loader_workers": 2}
    assert ray_training.data_stream_salt(None, split, 8) == ("", "")  # a checkpoint from before
    assert ray_training.data_stream_salt({"split": split, "salt": ""}, split, 8) == ("", "")
    grown = {**split, "world": 4}
    salt, note = ray_training.data_stream_salt({"split": split, "salt": ""}, grown, 8)
    assert salt == ">8" and "fresh random data streams from step 8" in note
    assert ray_training.data_stream_salt({"split": grown, "salt": salt}, grown, 12) == (">8", "")
    assert ray_training.data_stream_salt({"split": grown, "salt": salt}, split, 12)[0] == ">8>12"
