"""The release's sampling protocol (issue 12) on the default preset's sampling settings with tiny
random exports: labels interleaved over all classes, samples.npz in that order, uint8 by truncation,
and a set that does not depend on how many actors drew it. In-process: `sample_shards` is exactly
what each Ray actor runs (EvalWorker.sample); the Ray path is covered in test_eval."""

import zipfile

import numpy as np
import pytest
import torch
from test_eval import TINY_OVERRIDES, write_models

from configs.loading import load_config

MODEL_OVERRIDES = [
    o
    for o in TINY_OVERRIDES
    if o.split("=")[0].split(".")[0] in ("tokenizer", "generator") and "num_classes" not in o
]


def default_cfg(work_dir, extra=()):
    """The default preset (10 classes, 20 per class, its sampling settings) with tiny models."""
    return load_config(None, [f"work_dir={work_dir}", *MODEL_OVERRIDES, *extra])


def draw(cfg, plan_per_actor, out_dir, labels, fp="test"):
    from configs.loading import sampler_kwargs
    from infra import paths
    from jobs.evaluation.sampling import sample_shards
    from jobs.training.checkpoints import load_generator, load_tokenizer

    tok = load_tokenizer(paths.stage_dir(cfg, "train_tokenizer"), device="cpu")
    gen = load_generator(paths.stage_dir(cfg, "train_generator"), device="cpu")
    receipts = []
    for plan in plan_per_actor:  # each "actor" gets its own list of shards
        receipts += sample_shards(
            tok,
            gen,
            "cpu",
            plan,
            labels,
            int(cfg.sampling.seed),
            sampler_kwargs(cfg.sampling),
            int(cfg.sampling.batch_size),
            str(out_dir),
            fp,
        )["shards"]
    return sorted(receipts, key=lambda r: r["index"])


def test_default_run_labels_interleaved_and_independent_of_actors(tmp_path):
    from jobs.evaluation.sampling import interleaved_labels, shard_plan, write_npz

    # samples_per_shard 30 and batch 16 (neither divides the other nor the class count) stress the seeding
    cfg = default_cfg(tmp_path / "work", ["eval.samples_per_shard=30", "sampling.batch_size=16"])
    assert int(cfg.generator.num_classes) == 10 and int(cfg.eval.num_samples_per_class) == 20
    assert float(cfg.sampling.cfg_scale) == 3.0  # the default preset's CFG
    write_models(cfg)
    labels = interleaved_labels(10, 20)
    plan = [(j, s, e) for j, (s, e) in enumerate(shard_plan(len(labels), 30))]
    npz = {}
    for actors in (1, 2):
        out = tmp_path / f"actors{actors}"
        out.mkdir()
        receipts = draw(cfg, [plan[a::actors] for a in range(actors)], out, labels)
        assert [r["index"] for r in receipts] == list(range(7))
        url, shape = write_npz(str(out), [str(out / r["name"]) for r in receipts])
        assert shape == [200, 32, 32, 3]
        npz[actors] = np.load(url)
    arr, y = npz[1]["arr_0"], npz[1]["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (200, 32, 32, 3)
    # the must-show: every block of 10 consecutive labels holds all 10 classes
    for b in range(0, 200, 10):
        assert sorted(y[b : b + 10].tolist()) == list(range(10)), f"labels {b}..{b + 9}: {y[b : b + 10]}"
    assert np.bincount(y).tolist() == [20] * 10
    # 1 and 2 actors draw the identical set
    assert np.array_equal(npz[2]["arr_1"], y) and np.array_equal(npz[2]["arr_0"], arr)
    # and the images are not all alike (seeds differ per batch)
    assert not np.array_equal(arr[:16], arr[16:32])
    # streamed archive: plain stored (uncompressed) members, as np.savez writes them
    with zipfile.ZipFile(url) as zf:
        assert {i.filename: i.compress_type for i in zf.infolist()} == {"arr_0.npy": 0, "arr_1.npy": 0}


def test_shard_receipts_resume_and_reject_other_requests(tmp_path):
    from jobs.evaluation.sampling import interleaved_labels

    cfg = default_cfg(tmp_path / "work", ["eval.num_samples_per_class=2", "sampling.batch_size=8"])
    write_models(cfg)
    labels = interleaved_labels(10, 2)
    plan = [(0, 0, 10), (1, 10, 20)]
    first = draw(cfg, [plan], tmp_path, labels, fp="A")
    mtime = (tmp_path / "samples-000000.tar").stat().st_mtime_ns
    again = draw(cfg, [plan], tmp_path, labels, fp="A")  # same request: shards kept
    assert again == first and (tmp_path / "samples-000000.tar").stat().st_mtime_ns == mtime
    other = draw(cfg, [plan], tmp_path, labels, fp="B")  # another request: never reused
    assert all(r["fingerprint"] == "B" for r in other)
    assert (tmp_path / "samples-000000.tar").stat().st_mtime_ns != mtime


def test_uint8_rounding_truncates_like_the_release():
    from jobs.evaluation.sampling import to_uint8_release

    x = torch.tensor([-0.1, 0.0, 0.99 / 255, 1.5 / 255, 254.9 / 255, 1.0, 1.2])
    assert to_uint8_release(x).tolist() == [0, 0, 0, 1, 254, 255, 255]


@pytest.mark.parametrize("classes,per_class", [(10, 20), (1000, 50)])
def test_interleaved_labels_blocks(classes, per_class):
    from jobs.evaluation.sampling import interleaved_labels

    y = interleaved_labels(classes, per_class)
    assert len(y) == classes * per_class and np.bincount(y).tolist() == [per_class] * classes
    blocks = y.reshape(-1, classes)
    assert (np.sort(blocks, 1) == np.arange(classes)).all()
