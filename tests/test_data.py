"""Data prep end to end: sources -> real tar shards (real local Ray, real fsspec) -> loaders.

Fake ImageNet trees and ILSVRC-style tars are built in tmp_path from a few generated JPEGs,
including the bad images prep must convert or count.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from recipe_helpers import write_imagenet_tars

from configs.loading import load_config
from data_prep import prepare, synthetic
from data_prep.image_bytes import SkipImage, check_image
from data_prep.loaders import eval_batches, train_batches
from data_prep.sources import ImageNetFolderSource, ImageNetTarSource, iter_samples
from infra import storage

WNIDS = ["n01440764", "n01443537", "n01484850"]


def jpeg(seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(arr)
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90)
    return buf.getvalue()


BAD = {  # file stem -> (bytes, expected outcome)
    "bad_zero": (b"", ("skipped", "empty")),
    "bad_corrupt": (b"definitely not an image " * 5, ("skipped", "corrupt")),
    "bad_truncated": (jpeg(99, (64, 64))[:2500], ("skipped", "truncated")),
    "bad_cmyk": (jpeg(98, mode="CMYK"), ("converted", "cmyk")),
    "bad_gray": (jpeg(97, mode="L"), ("converted", "grayscale")),
    "bad_png": (jpeg(96, fmt="PNG"), ("converted", "png_in_jpeg")),
}


def make_imagenet_tree(root, per_class=4, val_layout="folders", bad=False):
    """train/<wnid>/*.JPEG, val in class folders or flat + LOC_val_solution.csv; returns expected labels."""
    expected = {"train": {}, "val": {}}
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(WNIDS):
        os.makedirs(root / "train" / wnid, exist_ok=True)
        for i in range(per_class):
            key = f"{wnid}_{i}"
            (root / "train" / wnid / f"{key}.JPEG").write_bytes(jpeg(c * 100 + i))
            expected["train"][key] = c
        for i in range(2):
            key = f"ILSVRC2012_val_{c * 2 + i + 1:08d}"
            folder = root / "val" / wnid if val_layout == "folders" else root / "val"
            os.makedirs(folder, exist_ok=True)
            (folder / f"{key}.JPEG").write_bytes(jpeg(1000 + c * 10 + i, size=(30, 44)))
            rows.append(f"{key},{wnid} 1 2 20 30 {wnid} 3 4 10 10")
            expected["val"][key] = c
    if bad:
        for stem, (data, _) in BAD.items():
            (root / "train" / WNIDS[0] / f"{stem}.JPEG").write_bytes(data)
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return expected


def make_ilsvrc_tars(tree, out):
    """The two ILSVRC tars from a flat-val tree, class tars out of order on purpose (class index =
    sorted wnid order)."""
    write_imagenet_tars(tree, out, wnids=list(reversed(WNIDS)))


def read_shards(manifest, split):
    """key -> (cls, json) over the split's shards, read back with WebDataset."""
    urls = [storage.join(manifest["shards_url"], s["shard"]) for s in manifest["splits"][split]["shards"]]
    out = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        assert sample["__key__"] not in out, "duplicate key"
        image = sample.get("jpg", sample.get("png"))
        assert Image.open(io.BytesIO(image)).mode == "RGB"
        out[sample["__key__"]] = int(sample["cls"])
    return out


def prep_cfg(work_dir, *overrides):
    return load_config(None, [f"work_dir={work_dir}", "data.prep_tasks=2", *overrides])


# ---------------------------------------------------------------- units (no Ray)


def test_synthetic_is_deterministic_and_classes_differ():
    a, cls = synthetic.sample_png(3, "train", 17, 10, 32)
    assert cls == 7 and (a, cls) == synthetic.sample_png(3, "train", 17, 10, 32)
    assert a != synthetic.sample_png(3, "val", 17, 10, 32)[0]
    assert len(set(synthetic.class_names(100))) == 100
    means = [
        synthetic.render(c, synthetic.sample_rng(0, "train", c), 48).reshape(-1, 3).mean(0) for c in range(10)
    ]
    assert Image.open(io.BytesIO(a)).size == (32, 32)
    assert min(np.abs(means[i] - means[j]).sum() for i in range(10) for j in range(i)) > 3


def test_synthetic_classes_are_separable_by_shape_colour():
    """Nearest centroid on the mean of the brightest pixels (the shape's colour) beats 90%."""

    def features(split, n):
        out = []
        for i in range(n):
            pixels = (
                synthetic.render(i % 10, synthetic.sample_rng(0, split, i), 32)
                .reshape(-1, 3)
                .astype(np.float32)
            )
            out.append(pixels[np.argsort(pixels.sum(1))[-150:]].mean(0))
        return np.array(out), np.arange(n) % 10

    xt, yt = features("train", 100)
    xv, yv = features("val", 50)
    centroids = np.stack([xt[yt == c].mean(0) for c in range(10)])
    predicted = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (predicted == yv).mean() > 0.9


@pytest.mark.parametrize("stem", sorted(BAD))
def test_bad_images_are_converted_or_skipped(stem):
    data, (outcome, reason) = BAD[stem]
    if outcome == "skipped":
        with pytest.raises(SkipImage) as err:
            check_image(data)
        assert err.value.reason == reason
    else:
        checked = check_image(data)
        assert checked.converted == reason
        image = Image.open(io.BytesIO(checked.data))
        assert (image.format, image.mode) == ("JPEG", "RGB")
        assert image.size == checked.original_size == Image.open(io.BytesIO(data)).size


def test_tar_source_reads_same_samples_as_folder(tmp_path):
    expected = make_imagenet_tree(tmp_path / "tree", val_layout="flat")
    make_ilsvrc_tars(tmp_path / "tree", tmp_path / "tars")
    # A hidden folder beside the classes (a tool's cache) is not a class: ids stay the wnids' ranks.
    os.makedirs(tmp_path / "tree" / "train" / ".cache")
    (tmp_path / "tree" / "train" / ".cache" / "x.JPEG").write_bytes(jpeg(7))
    folder = ImageNetFolderSource(str(tmp_path / "tree"))
    tars = ImageNetTarSource(f"file://{tmp_path / 'tars'}")
    for split in ("train", "val"):
        from_folder = {k: (c, d) for d, c, k in iter_samples(folder, split)}
        from_tar = {k: (c, d) for d, c, k in iter_samples(tars, split)}
        assert from_folder == from_tar and {k: c for k, (c, _) in from_tar.items()} == expected[split]
    # A run starting in the middle of a class tar streams from that member's header.
    refs = tars.sample_refs("train")[5:7]
    assert [r[0] for r, _ in tars.read(refs)] == [r[0] for r in refs]


def test_shard_plan_holds_contiguous_runs_of_few_classes():
    """Issue 15: a class-sorted list (variable class sizes) cut into shards of 100: each shard holds
    a contiguous run of each class it touches and at most 2 x CLASSES_PER_GROUP classes; every
    sample appears once."""
    rng = random.Random(0)
    refs = [(f"{c}_{i}", c, (c, i)) for c in range(40) for i in range(rng.randrange(30, 70))]
    plan = prepare.interleave_classes(refs)
    assert sorted(plan) == sorted(refs)
    for start in range(0, len(plan), 100):
        shard = plan[start : start + 100]
        by_class: dict[int, list[int]] = {}
        for _, c, (_, i) in shard:
            by_class.setdefault(c, []).append(i)
        assert len(by_class) <= 2 * prepare.CLASSES_PER_GROUP
        assert all(sorted(ix) == list(range(min(ix), max(ix) + 1)) for ix in by_class.values())


# ---------------------------------------------------------------- prep + loaders, memory:// (threads)


def test_synthetic_memory_roundtrip_and_loaders():
    work = f"memory://restok-{uuid.uuid4().hex[:8]}"
    cfg = prep_cfg(
        work, "data.synthetic.train_per_class=5", "data.synthetic.val_per_class=3", "data.samples_per_shard=8"
    )
    manifest = prepare.run(cfg)
    assert manifest["splits"]["train"]["total"] == 50 and manifest["splits"]["val"]["total"] == 30
    assert [s["count"] for s in manifest["splits"]["val"]["shards"]] == [8, 8, 8, 6]
    assert [c["name"] for c in manifest["classes"]][:2] == ["red_circle", "green_square"]
    for split, n in (("train", 50), ("val", 30)):
        labels = read_shards(manifest, split)
        assert labels == {f"{split}_{i:08d}": i % 10 for i in range(n)}
    for s in manifest["splits"]["train"]["shards"]:
        assert storage.sha256_url(storage.join(manifest["shards_url"], s["shard"])) == s["sha256"]
    assert prepare.run(cfg) == manifest  # complete: skipped

    # Eval: 2 ranks x 2 workers, by shard (4 shards) and by sample (1 shard): each sample once.
    val_urls = [storage.join(manifest["shards_url"], "val-000000.tar")]
    for shards, n in ((manifest, 30), (val_urls, 8)):
        seen = []
        for rank in range(2):
            batches = eval_batches(shards, "val", rank, 2, batch_size=4, image_size=24, num_workers=2)
            got = list(batches)
            if shards is manifest:
                assert len(batches) == len(got)
            for images, labels, keys in got:
                assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32
                assert labels.tolist() == [int(k[-8:]) % 10 for k in keys]
                seen += keys
        assert len(seen) == n and len(set(seen)) == n
    # Deterministic order.
    first = [k for _, _, ks in eval_batches(manifest, "val", 0, 2, 4, 24, num_workers=2) for k in ks]
    assert first == [k for _, _, ks in eval_batches(manifest, "val", 0, 2, 4, 24, num_workers=2) for k in ks]

    # Train: budget 50 samples over 2 ranks, batch 4 -> 6 full batches per rank.
    batches = train_batches(manifest, "train", 1, 2, batch_size=4, image_size=16, seed=0, num_workers=2)
    got = list(batches)
    assert len(got) == len(batches) == 6
    for images, labels in got:
        assert images.shape == (4, 3, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    small = train_batches(manifest, "train", 0, 2, 4, 16, seed=0, samples_per_epoch=17, num_workers=0)
    assert len(list(small)) == 2
    # data.shuffle_buffer 0 (or 1): samples pass in shard order instead of failing on an empty buffer
    unshuffled = train_batches(manifest, "train", 0, 2, 4, 16, seed=0, num_workers=0, shuffle_buffer=0)
    assert len(list(unshuffled)) == len(unshuffled)
    # Starting an epoch's iterator (at a resume: mid-epoch) leaves torch's global RNG untouched.
    for workers in (0, 2):
        state = torch.get_rng_state()
        next(iter(train_batches(manifest, "train", 0, 2, 4, 16, seed=0, num_workers=workers)))
        assert torch.equal(torch.get_rng_state(), state)

    # Same (seed, rank, epoch) -> same batches; another epoch -> other samples and crops.
    def epoch_batches(epoch):
        return list(train_batches(manifest, "train", 0, 2, 4, 16, seed=3, epoch=epoch, num_workers=0))

    e0, e0_again, e1 = epoch_batches(0), epoch_batches(0), epoch_batches(1)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, e0_again, strict=False)
    )
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e0, e1, strict=False))


def test_transforms_match_reference_arithmetic():
    from torchvision import transforms as T

    from data_prep.transforms import EvalTransform, TrainTransform, decode

    image = Image.open(io.BytesIO(jpeg(5, size=(90, 61)))).convert("RGB")
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)])
    assert np.array_equal(np.asarray(EvalTransform(32)(image)), np.asarray(reference(image)))
    # scale_min=1 and no flip: the crop is the full shorter side at a random offset.
    out = TrainTransform(61, scale_min=1.0, hflip=False)(image, random.Random(0))
    offsets = [np.array_equal(np.asarray(out), np.asarray(image.crop((x, 0, x + 61, 61)))) for x in range(30)]
    assert out.size == (61, 61) and any(offsets)
    # The loader's tensor path draws the same crop as the PIL path and matches it closely.
    tf = TrainTransform(24)
    data = jpeg(7, size=(60, 45))
    as_pil = np.asarray(tf(decode(data), random.Random(1)), dtype=np.float32)
    as_tensor = tf(tf.decode(data), random.Random(1)).permute(1, 2, 0).numpy().astype(np.float32)
    assert as_tensor.shape == as_pil.shape == (24, 24, 3) and np.abs(as_tensor - as_pil).mean() < 3
    # Draft decoding never goes below the requested shorter side.
    big = jpeg(6, size=(400, 300))
    assert min(decode(big, 100).size) >= 100 and decode(big, 100).size != (400, 300)
    assert decode(big, None).size == (400, 300)


def test_resized_crop_equals_torchvision_resized_crop_on_uint8():
    """The loader's crop + antialiased bicubic resize (torch only) gives torchvision v2's values."""
    import torchvision.transforms.v2.functional as TF

    from data_prep.transforms import resized_crop_uint8

    gen = torch.Generator().manual_seed(0)
    for height, width, side, size in [(45, 60, 40, 24), (61, 90, 61, 32), (33, 33, 20, 64), (50, 70, 32, 32)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
        top, left = (height - side) // 3, (width - side) // 2
        ours = resized_crop_uint8(image, top, left, side, size)
        theirs = TF.resized_crop(
            image,
            top,
            left,
            side,
            side,
            [size, size],
            interpolation=TF.InterpolationMode.BICUBIC,
            antialias=True,
        )
        assert ours.dtype == torch.uint8 and torch.equal(ours, theirs), (height, width, side, size)


def test_failed_run_resumes_without_rewriting(monkeypatch):
    work = f"memory://restok-{uuid.uuid4().hex[:8]}"
    cfg = prep_cfg(
        work,
        "data.synthetic.train_per_class=4",
        "data.synthetic.val_per_class=1",
        "data.samples_per_shard=10",
        "data.prep_tasks=1",
    )
    real_make = prepare.make_source

    class FailingSourceMock:
        """Wraps the real source; raises on the third train shard, like a killed task."""

        def __init__(self, inner):
            self.inner, self.name, self.native_ext = inner, inner.name, inner.native_ext
            self.classes, self.sample_refs = inner.classes, inner.sample_refs

        def read(self, refs):
            for ref, data in self.inner.read(refs):
                if ref in FailingSourceMock.poison:
                    raise OSError("simulated kill")
                yield ref, data

    writes = Counter()
    real_open = storage.atomic_open

    @contextlib.contextmanager
    def counting_open(url, mode="wb"):  # counts files that reached their final name
        with real_open(url, mode) as fh:
            yield fh
        writes[os.path.basename(url)] += 1

    monkeypatch.setattr(storage, "atomic_open", counting_open)
    jobs = prepare.plan_jobs(real_make(cfg.data), cfg, "memory://unused", "fp")
    FailingSourceMock.poison = {jobs[2].refs[3]}
    monkeypatch.setattr(prepare, "make_source", lambda data: FailingSourceMock(real_make(data)))
    with pytest.raises(RuntimeError, match="train-000002.tar"):
        prepare.run(cfg)
    stage = storage.join(work, "prep")
    assert not storage.exists(storage.join(stage, "train-000002.tar"))
    assert storage.read_json(storage.join(stage, "manifest.json")) is None
    FailingSourceMock.poison = set()
    manifest = prepare.run(cfg)
    shard_writes = {k: v for k, v in writes.items() if k.endswith(".tar")}
    assert shard_writes == {f"train-{i:06d}.tar": 1 for i in range(4)} | {"val-000000.tar": 1}
    assert manifest["splits"]["train"]["total"] == 40


def test_prep_under_another_config_does_not_reuse_shards(monkeypatch, capsys):
    """Issue 19: shards of a prep under data.resize=None are not reused under data.resize=32 (same
    plan, other bytes), even when that run is interrupted and resumed."""
    work = f"memory://restok-{uuid.uuid4().hex[:8]}"
    base = [
        "data.synthetic.train_per_class=3",
        "data.synthetic.val_per_class=1",
        "data.synthetic.resolution=48",
        "data.samples_per_shard=10",
        "data.prep_tasks=1",
    ]
    prepare.run(prep_cfg(work, *base))
    resized = prep_cfg(work, *base, "data.resize=32")
    real_write = prepare.write_shard
    calls = []

    def killed_after_one_shard(source, job):  # a run killed after its first shard
        calls.append(job.name)
        if len(calls) > 1:
            raise OSError("simulated kill")
        return real_write(source, job)

    monkeypatch.setattr(prepare, "write_shard", killed_after_one_shard)
    with pytest.raises(RuntimeError, match="simulated kill"):
        prepare.run(resized)
    # The resize=None manifest no longer claims the half-rewritten shards.
    assert storage.read_json(storage.join(work, "prep", "manifest.json")) is None
    assert "discarded 4 of 4 shards: 4 made under another config" in capsys.readouterr().out
    monkeypatch.setattr(prepare, "write_shard", real_write)
    resumed = prepare.run(resized)
    clean = prepare.run(prep_cfg(f"memory://restok-{uuid.uuid4().hex[:8]}", *base, "data.resize=32"))
    for split in ("train", "val"):
        shards = resumed["splits"][split]["shards"]
        assert [s["sha256"] for s in shards] == [s["sha256"] for s in clean["splits"][split]["shards"]]
        for s in shards:  # and the bytes on storage are those the manifest names
            assert storage.sha256_url(storage.join(work, "prep", s["shard"])) == s["sha256"]


# ---------------------------------------------------------------- prep with real local Ray


@pytest.mark.slow
def test_folder_prep_with_bad_images_both_val_layouts(tmp_path, ray_local):
    from infra.paths import tracking_uri
    from infra.tracking import client_for, start_run

    for layout in ("folders", "flat"):
        root = tmp_path / layout
        expected = make_imagenet_tree(root, val_layout=layout, bad=True)
        cfg = prep_cfg(
            tmp_path / f"work-{layout}",
            "data.source=imagenet_folder",
            f"data.root={root}",
            "data.samples_per_shard=5",
        )
        run_id = start_run(cfg, "prep") if layout == "flat" else None
        manifest = prepare.run(cfg, run_id=run_id)
        train = manifest["splits"]["train"]
        assert train["skipped"] == {"empty": 1, "corrupt": 1, "truncated": 1}
        assert train["converted"] == {"cmyk": 1, "grayscale": 1, "png_in_jpeg": 1}
        assert manifest["skipped_keys"]["train"]["truncated"] == ["bad_truncated"]
        assert train["planned"] == 18 and train["total"] == 15
        labels = read_shards(manifest, "train")
        assert {k: v for k, v in labels.items() if not k.startswith("bad")} == expected["train"]
        assert {labels[k] for k in labels if k.startswith("bad")} == {0}
        assert read_shards(manifest, "val") == expected["val"]
        assert [c["wnid"] for c in manifest["classes"]] == WNIDS
        if run_id:
            metrics = client_for(tracking_uri(cfg)).get_run(run_id).data.metrics
            assert metrics["prep/train_images"] == 15 and metrics["prep/train_skipped"] == 3


def test_shared_shards_of_a_changed_folder_go_to_a_new_directory(tmp_path, ray_local):
    """Same data config, but data.root gained an image between two work dirs' preps: the second
    writes its own directory under the shared URL instead of rewriting shards that the first's
    complete manifest lists."""
    root = tmp_path / "imagenet"
    make_imagenet_tree(root, per_class=3)
    shared = ["data.source=imagenet_folder", f"data.root={root}", f"data.shards_url={tmp_path / 'shards'}"]
    first = prepare.run(prep_cfg(tmp_path / "work-a", *shared, "data.samples_per_shard=5"))
    before = {p: p.read_bytes() for p in Path(first["shards_url"]).glob("*.tar")}
    (root / "train" / WNIDS[0] / "added_0.JPEG").write_bytes(jpeg(999))
    second = prepare.run(prep_cfg(tmp_path / "work-b", *shared, "data.samples_per_shard=5"))
    assert second["fingerprint"] == first["fingerprint"]
    assert second["shards_url"] != first["shards_url"]
    assert second["splits"]["train"]["total"] == first["splits"]["train"]["total"] + 1
    assert {p: p.read_bytes() for p in Path(first["shards_url"]).glob("*.tar")} == before


@pytest.mark.slow
def test_tar_prep_rerun_after_kill(tmp_path, ray_local):
    expected = make_imagenet_tree(tmp_path / "tree", per_class=5, val_layout="flat")
    make_ilsvrc_tars(tmp_path / "tree", tmp_path / "tars")
    cfg = prep_cfg(
        tmp_path / "work",
        "data.source=imagenet_tar",
        f"data.root=file://{tmp_path / 'tars'}",
        f"data.shards_url=file://{tmp_path / 'shards'}",
        "data.samples_per_shard=4",
    )
    manifest = prepare.run(cfg)
    assert read_shards(manifest, "train") == expected["train"]
    assert read_shards(manifest, "val") == expected["val"]
    names = [s["shard"] for s in manifest["splits"]["train"]["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(4)]

    # What a kill leaves: no manifest, a missing shard (no done record), a half-written temporary;
    # plus a shard from an older config that the plan does not name.
    # one directory per data config and sample list
    shards = Path(manifest["shards_url"].removeprefix("file://"))
    assert shards.parent == tmp_path / "shards" and shards.name.startswith(f"prep-{manifest['fingerprint']}-")
    os.remove(tmp_path / "work" / "prep" / "manifest.json")
    os.remove(shards / "train-000002.tar")
    dead = shards / ".tmp-deadbeef-train-000002.tar"
    dead.write_bytes(b"partial")
    idle = time.time() - prepare.SHARED_TMP_IDLE_S - 60
    os.utime(dead, (idle, idle))
    # A shared shards URL: another work dir's prep of the same data may be writing right now.
    live = shards / ".tmp-cafef00d-train-000003.tar"
    live.write_bytes(b"being written")
    (shards / "train-000009.tar").write_bytes(b"old")
    before = {p.name: os.stat(p).st_mtime_ns for p in shards.glob("*.tar")}

    again = prepare.run(cfg)
    after = {p.name: os.stat(p).st_mtime_ns for p in shards.iterdir() if p.is_file()}
    assert not dead.exists() and live.read_bytes() == b"being written"
    assert sorted(after) == sorted(names + ["val-000000.tar", "val-000001.tar", live.name])
    rewritten = {n for n in after if after[n] != before.get(n)}
    assert rewritten == {"train-000002.tar"}
    assert again["splits"] == manifest["splits"]  # same bytes: sha256 and counts match
    assert again["written_this_run"]["shards"] == 1

    # The loader reads file:// shards from the manifest's stage directory, inside Ray workers
    # (rank and world size passed in, no global state), with its own DataLoader worker there.
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=1)
    def keys_seen_by(rank):
        batches = eval_batches(str(tmp_path / "work" / "prep"), "train", rank, 2, 8, 16, num_workers=1)
        return [k for _, labels, keys in batches for k in keys]

    seen = sum(ray.get([keys_seen_by.remote(r) for r in range(2)]), [])
    assert sorted(seen) == sorted(expected["train"])


def test_prep_resize_reencodes_shorter_side():
    work = f"memory://restok-{uuid.uuid4().hex[:8]}"
    cfg = prep_cfg(
        work,
        "data.synthetic.train_per_class=1",
        "data.synthetic.val_per_class=1",
        "data.synthetic.resolution=48",
        "data.resize=32",
        "data.splits=[val]",
    )
    manifest = prepare.run(cfg)
    urls = [storage.join(manifest["shards_url"], s["shard"]) for s in manifest["splits"]["val"]["shards"]]
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert len(samples) == 10 and "train" not in manifest["splits"]
    for sample in samples:
        assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)
        assert json.loads(sample["json"])["width"] == 48
