"""Data throughput: restok prep + WebDataset loaders vs a plain torchvision ImageFolder + DataLoader.

Both sides read the same JPEGs (written as files for ImageFolder, as prep shards for ours) with
the same transform objects (data_prep.transforms: same crop draws, bicubic), the same batch size
and worker count, in the same run. For training ours decodes with torchvision.io and crops /
resizes uint8 tensors; the baseline uses ImageFolder's default PIL loader and the PIL path of
the same TrainTransform. Evaluation is PIL on both sides. Prints images/s with the ratio.
The write row compares prep (decode check + tar, Ray tasks) with plainly writing the files.

    python bench/data_bench.py --images 1000 --image-sizes 128,256 --workers 2
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.loading import load_config  # noqa: E402
from data_prep import prepare, synthetic  # noqa: E402
from data_prep.loaders import eval_batches, resolve_shards, train_batches  # noqa: E402
from data_prep.tar_samples import tar_samples  # noqa: E402
from data_prep.transforms import EvalTransform, TrainTransform, to_chw_uint8, to_unit_float  # noqa: E402
from infra.shards import read_samples  # noqa: E402


def make_tree(root: str, n: int, width: int, height: int, classes: int) -> tuple[float, int]:
    """ImageNet-like train/<wnid>/*.JPEG; returns (file-writing images/s, total bytes)."""
    encoded = []
    for i in range(n):
        cls = i % classes
        big = synthetic.render(cls, synthetic.sample_rng(0, "bench", i), max(width, height))
        buf = io.BytesIO()
        Image.fromarray(big[:height, :width]).save(buf, format="JPEG", quality=90)
        encoded.append((f"n{cls:08d}", f"n{cls:08d}_{i}.JPEG", buf.getvalue()))
    start = time.perf_counter()
    for wnid, name, data in encoded:
        os.makedirs(os.path.join(root, "train", wnid), exist_ok=True)
        with open(os.path.join(root, "train", wnid, name), "wb") as fh:
            fh.write(data)
    return n / (time.perf_counter() - start), sum(len(d) for _, _, d in encoded)


class BaselineTransform:
    """The same transform object as ours, fed by ImageFolder's PIL loader, uint8 CHW out."""

    def __init__(self, transform):
        self.transform, self.rng = transform, None

    def __call__(self, image):
        if self.rng is None:  # one RNG per DataLoader worker process
            self.rng = random.Random(os.getpid())
        return to_chw_uint8(self.transform(image, self.rng))


def train_shard_urls(manifest: dict) -> list[str]:
    return resolve_shards(manifest, "train")[0]


def expand_rate(samples) -> float:
    """Samples per second of expanding shards into samples (no decoding)."""
    start, n = time.perf_counter(), 0
    for _ in samples:
        n += 1
    return n / (time.perf_counter() - start)


def time_batches(batches) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += batch[0].shape[0]
    return n / (time.perf_counter() - start), n


def baseline_batches(root: str, transform, batch_size: int, workers: int, shuffle: bool):
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(os.path.join(root, "train"), transform=BaselineTransform(transform))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=shuffle,
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield to_unit_float(images), labels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image-sizes", default="128,256")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=2, help="best of N passes (first pass warms the page cache)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    tmp = tempfile.mkdtemp(prefix="restok-data-bench-")
    rows = []
    try:
        files_rate, nbytes = make_tree(tmp, args.images, args.width, args.height, args.classes)
        print(
            f"# {args.images} JPEGs {args.width}x{args.height} "
            f"({nbytes / args.images / 1024:.1f} KiB each) in {tmp}"
        )
        cfg = load_config(
            None,
            [
                f"work_dir={tmp}/work",
                "data.source=imagenet_folder",
                f"data.root={tmp}",
                "data.splits=[train]",
                "data.samples_per_shard=250",
                f"data.prep_tasks={max(1, args.workers)}",
                "cluster.address=local",
            ],
        )
        manifest = prepare.run(cfg)
        prep_rate = manifest["written_this_run"]["images_per_s"]
        rows.append(("write: prep shards (check + tar) vs plain file copy", prep_rate, files_rate))
        # Why the training loader keeps its own tar parser (data_prep.tar_samples) over webdataset's.
        urls = train_shard_urls(manifest)
        ours = max(expand_rate(tar_samples({"url": u} for u in urls)) for _ in range(args.repeats))
        base = max(expand_rate(s for u in urls for s in read_samples(u)) for _ in range(args.repeats))
        rows.append(("expand shards: tar_samples vs webdataset (infra.shards)", ours, base))

        n = manifest["splits"]["train"]["total"]
        for size in [int(s) for s in args.image_sizes.split(",")]:
            train_tf, eval_tf = TrainTransform(size), EvalTransform(size)
            best = {k: 0.0 for k in ("ours_train", "base_train", "ours_eval", "base_eval")}
            for _ in range(args.repeats):
                best["ours_train"] = max(
                    best["ours_train"],
                    time_batches(
                        train_batches(
                            manifest,
                            "train",
                            0,
                            1,
                            args.batch_size,
                            size,
                            seed=0,
                            samples_per_epoch=n,
                            num_workers=args.workers,
                        )
                    )[0],
                )
                best["base_train"] = max(
                    best["base_train"],
                    time_batches(
                        baseline_batches(tmp, train_tf, args.batch_size, args.workers, shuffle=True)
                    )[0],
                )
                best["ours_eval"] = max(
                    best["ours_eval"],
                    time_batches(
                        eval_batches(manifest, "train", 0, 1, args.batch_size, size, num_workers=args.workers)
                    )[0],
                )
                best["base_eval"] = max(
                    best["base_eval"],
                    time_batches(
                        baseline_batches(tmp, eval_tf, args.batch_size, args.workers, shuffle=False)
                    )[0],
                )
            rows.append((f"load train {size}px (crop 0.8-1 + flip)", best["ours_train"], best["base_train"]))
            rows.append((f"load eval {size}px (resize + centre crop)", best["ours_eval"], best["base_eval"]))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'what':<52} {'ours img/s':>11} {'baseline img/s':>15} {'ratio':>7}")
    for what, ours, base in rows:
        print(f"{what:<52} {ours:>11.1f} {base:>15.1f} {ours / base if base else float('nan'):>7.2f}")
    print(
        f"(workers={args.workers}, batch={args.batch_size}; baseline = torchvision ImageFolder + DataLoader, "
        f"same transform; write baseline = writing the same JPEG files)"
    )


if __name__ == "__main__":
    main()
