"""Prep throughput by source layout, storage and task count, in one run (issue 15).

A fake ImageNet (JPEGs from data_prep.synthetic) is written in both layouts prep reads: the folder
tree (train/<wnid>/*.JPEG + flat val/ with LOC_val_solution.csv) and the two ILSVRC tars. Each is
prepped from local disk and from moto's S3 server on loopback (the endpoint the S3 tests use,
reached through AWS_ENDPOINT_URL), with data.prep_tasks = 1 and 2, on one local Ray. Printed: prep
images/s (writing, after the listing) with the ratio to the first row, source GETs per image and
MB/s (prep manifest), the server's own GET count, and for the tar layout the listing's cost
(GETs and seconds per 1,000 images), next to the header-by-header listing that seeks inner tar
headers in 64 KiB ranges on the driver (what prep did before issue 15).

    python bench/prep_bench.py --classes 8 --per-class 100 --val 80

`--shuffle-quality` instead simulates the training batches of the ImageNet recipe over prep's
shard plan (1,000 classes x 1,281 images, 1,000 per shard; 16 ranks x micro-batch 16, each
micro-batch from one loader worker's stream) with the loader's own ResampledShardSource and
Shuffle, and prints the distinct classes per batch of 256 for several shuffle buffers.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.loading import load_config
from data_prep import prepare, sources, synthetic
from infra import storage


def jpeg(index: int, size: tuple[int, int]) -> bytes:
    image = synthetic.render(index % 10, synthetic.sample_rng(0, "bench", index), max(size))
    buf = io.BytesIO()
    Image.fromarray(image[: size[1], : size[0]]).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_layouts(root: str, classes: int, per_class: int, val: int, size: tuple[int, int]) -> int:
    """Folder tree under root/folder, two tars under root/tars; returns the mean JPEG bytes."""
    folder, tars = os.path.join(root, "folder"), os.path.join(root, "tars")
    wnids = [f"n{c:08d}" for c in range(classes)]
    total, n = 0, 0
    os.makedirs(os.path.join(folder, "val"))
    os.makedirs(tars)
    with tarfile.open(os.path.join(tars, sources.TRAIN_TAR), "w") as outer:
        for c, wnid in enumerate(wnids):
            os.makedirs(os.path.join(folder, "train", wnid))
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(per_class):
                    data = jpeg(c * per_class + i, size)
                    total, n = total + len(data), n + 1
                    name = f"{wnid}_{i}.JPEG"
                    with open(os.path.join(folder, "train", wnid, name), "wb") as fh:
                        fh.write(data)
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    rows = ["ImageId,PredictionString"]
    with tarfile.open(os.path.join(tars, sources.VAL_TAR), "w") as vt:
        for i in range(val):
            key, wnid = f"ILSVRC2012_val_{i + 1:08d}", wnids[i % classes]
            data = jpeg(10**6 + i, size)
            with open(os.path.join(folder, "val", f"{key}.JPEG"), "wb") as fh:
                fh.write(data)
            info = tarfile.TarInfo(f"{key}.JPEG")
            info.size = len(data)
            vt.addfile(info, io.BytesIO(data))
            rows.append(f"{key},{wnid} 0 0 1 1")
    for d in (folder, tars):
        with open(os.path.join(d, sources.VAL_CSV), "w") as fh:
            fh.write("\n".join(rows) + "\n")
    return total // max(n, 1)


class RequestLog:
    """WSGI middleware counting the GETs moto's server answers (all processes)."""

    def __init__(self, app):
        self.app, self.gets = app, 0

    def __call__(self, environ, start_response):
        self.gets += environ["REQUEST_METHOD"] == "GET" and "list-type" not in environ.get("QUERY_STRING", "")
        return self.app(environ, start_response)


def start_moto() -> tuple[object, RequestLog]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    log = RequestLog(server._server.app)
    server._server.app = log
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="restok-bench")
    return server, log


def header_seek_listing(url: str) -> tuple[int, float]:
    """(ranged GETs, seconds) of listing every class tar header by header in 64 KiB ranges,
    serially in this process (the listing prep used before issue 15)."""
    source = sources.ImageNetTarSource(url.rsplit("/", 1)[0])
    fs, path = storage.filesystem(url)
    stats: dict = {"requests": 0, "bytes": 0}
    t0 = time.perf_counter()
    for outer in source._class_tars(fs, path, url, stats):
        _, task = sources.list_tar_members(
            url, outer.offset_data, outer.size, block=sources.HEADER_SCAN_BLOCK
        )
        stats["requests"] += task["requests"]
    return stats["requests"], time.perf_counter() - t0


def _class_stream(shards: list[list[int]], rank: int):
    """One loader worker's samples ({"cls"}) from resampled shards, as train_batches draws them."""
    from data_prep.loaders import ResampledShardSource

    for item in ResampledShardSource(list(range(len(shards))), 0, rank, 0)():
        yield from ({"cls": c} for c in shards[item["url"]])


def shuffle_quality(
    buffers: list[int],
    classes: int = 1000,
    per_class: int = 1281,
    shard: int = 1000,
    ranks: int = 16,
    micro: int = 16,
    batches: int = 400,
    warmup: int = 300,
) -> None:
    import random

    from data_prep.loaders import Shuffle

    refs = [(f"{c}_{i}", c, None) for c in range(classes) for i in range(per_class)]
    plans = {"prep plan (16-class groups)": prepare.interleave_classes(refs)}
    shuffled = list(refs)
    random.Random(0).shuffle(shuffled)
    plans["shuffled plan (before issue 15)"] = shuffled
    print(
        f"distinct classes per batch of {ranks * micro} ({ranks} ranks x {micro}); "
        f"iid draws: {classes * (1 - (1 - 1 / classes) ** (ranks * micro)):.0f}"
    )
    print(
        "| plan | shuffle buffer | first batch of an epoch | mean of first 20 | steady state mean "
        "| steady min |"
    )
    print("|---|---|---|---|---|---|")
    for name, plan in plans.items():
        shards = [[r[1] for r in plan[i : i + shard]] for i in range(0, len(plan), shard)]
        for buffer in buffers if "prep" in name else buffers[:1]:
            streams = [
                iter(Shuffle(buffer, 0, rank, 0)(_class_stream(shards, rank))) for rank in range(ranks)
            ]
            counts = [len({next(s)["cls"] for s in streams for _ in range(micro)}) for _ in range(batches)]
            steady = counts[warmup:]
            print(
                f"| {name} | {buffer} | {counts[0]} | {sum(counts[:20]) / 20:.0f} | "
                f"{sum(steady) / len(steady):.0f} | {min(steady)} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--val", type=int, default=80)
    ap.add_argument("--size", default="320x256", help="JPEG width x height")
    ap.add_argument("--samples-per-shard", type=int, default=100)
    ap.add_argument("--shuffle-quality", action="store_true", help="simulate classes per training batch")
    ap.add_argument("--buffers", default="1000,5000,10000")
    args = ap.parse_args()
    if args.shuffle_quality:
        shuffle_quality([int(b) for b in args.buffers.split(",")])
        return
    size = tuple(int(v) for v in args.size.split("x"))

    tmp = tempfile.mkdtemp(prefix="restok-prep-bench-")
    server, log = start_moto()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        mean = write_layouts(tmp, args.classes, args.per_class, args.val, size)
        fs, _ = storage.filesystem("s3://restok-bench")
        for layout in ("folder", "tars"):
            fs.put(os.path.join(tmp, layout) + "/", f"restok-bench/{layout}/", recursive=True)
        images = args.classes * args.per_class + args.val
        print(
            f"{images} images ({args.classes} classes x {args.per_class} train + {args.val} val), "
            f"mean JPEG {mean / 1024:.1f} KiB, {args.samples_per_shard} per shard, 2 CPUs"
        )
        rows = []
        for storage_name, base in (("local", tmp), ("moto S3", "s3://restok-bench")):
            for source, layout in (("imagenet_folder", "folder"), ("imagenet_tar", "tars")):
                for tasks in (1, 2):
                    work = (
                        f"{tmp}/work-{uuid.uuid4().hex[:6]}"
                        if storage_name == "local"
                        else f"s3://restok-bench/work-{uuid.uuid4().hex[:6]}"
                    )
                    cfg = load_config(
                        None,
                        [
                            f"work_dir={work}",
                            f"data.source={source}",
                            f"data.root={base}/{layout}",
                            f"data.prep_tasks={tasks}",
                            f"data.samples_per_shard={args.samples_per_shard}",
                        ],
                    )
                    gets = log.gets
                    manifest = prepare.run(cfg)
                    written = manifest["written_this_run"]
                    listing = manifest["listing"].get("train")
                    rows.append(
                        {
                            "source": source,
                            "storage": storage_name,
                            "tasks": tasks,
                            "images_per_s": written["images_per_s"],
                            "gets_per_image": written["source_reads"]["gets_per_image"],
                            "mb_per_s": written["source_reads"]["mb_per_s"],
                            "server_gets": log.gets - gets if storage_name != "local" else None,
                            "listing": (
                                listing["requests"] * 1000 / listing["images"],
                                listing["seconds"] * 1000 / listing["images"],
                            )
                            if listing
                            else None,
                        }
                    )
        old_local = header_seek_listing(os.path.join(tmp, "tars", sources.TRAIN_TAR))
        old_s3 = header_seek_listing(f"s3://restok-bench/tars/{sources.TRAIN_TAR}")
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0]["images_per_s"]
    print(
        "\n| source | storage | prep tasks | images/s | ratio | GETs/image | source MB/s | server GETs "
        "| listing GETs / 1k img | listing s / 1k img |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lst = f"{r['listing'][0]:.1f} | {r['listing'][1]:.3f}" if r["listing"] else "- | -"
        print(
            f"| {r['source']} | {r['storage']} | {r['tasks']} | {r['images_per_s']:.0f} | "
            f"{r['images_per_s'] / base:.2f} | {r['gets_per_image']:.3f} | {r['mb_per_s']:.1f} | "
            f"{r['server_gets'] if r['server_gets'] is not None else '-'} | {lst} |"
        )
    train = args.classes * args.per_class
    for name, (gets, secs) in (("local", old_local), ("moto S3", old_s3)):
        print(
            f"header-by-header listing (64 KiB ranges, serial), {name}: {gets * 1000 / train:.1f} GETs "
            f"and {secs * 1000 / train:.3f} s per 1k images"
        )


if __name__ == "__main__":
    main()
