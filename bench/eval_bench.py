"""Evaluation feature extraction: images/s of the Ray eval pool with 1 and 2 actors (scaling ratio).

Writes PNG shards of synthetic images, then times `EvalWorker.features` over them (shard i -> actor
i % n) with 1 actor and with 2 actors in the same run, after a warm-up pass that loads the network
in every actor (so the timing is extraction, not start-up). The network is the FID Inception
architecture with random weights (the real workload: 299 px input, same FLOPs), or the probe CNN.
Random weights only change the numbers, never the speed; nothing here is a metric.

    python bench/eval_bench.py --images 64 --net inception
    python bench/eval_bench.py --images 2000 --net probe --image-size 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from configs.loading import load_config
from data_prep import synthetic
from infra.image_shards import write_png_shard
from jobs.evaluation.pool import EvalPool


def write_shards(folder: str, n: int, size: int, per_shard: int) -> list[str]:
    samples = [
        (f"img_{i:06d}", synthetic.render(i % 10, synthetic.sample_rng(0, "bench", i), size), i % 10)
        for i in range(n)
    ]
    urls = []
    for j in range(0, n, per_shard):
        url = os.path.join(folder, f"bench-{j // per_shard:06d}.tar")
        write_png_shard(url, samples[j : j + per_shard])
        urls.append(url)
    return urls


def feature_spec(net: str, folder: str) -> dict:
    if net == "inception":
        from jobs.metrics.inception import STATE_DICT_FILE, build_fid_inception

        path = os.path.join(folder, STATE_DICT_FILE)
        torch.save(build_fid_inception().state_dict(), path)  # random weights, real architecture
        return {"kind": "inception", "weights": path, "probe_path": ""}
    from jobs.metrics.probe import ProbeNet

    path = os.path.join(folder, "probe.pt")
    torch.save({"state_dict": ProbeNet(10).state_dict(), "num_classes": 10, "image_size": 32}, path)
    return {"kind": "probe", "weights": "", "probe_path": path}


def time_pool(cfg, actors: int, shards: list[str], spec: dict, size: int, batch: int, repeats: int) -> float:
    cfg.eval.num_actors = actors
    pool = EvalPool(cfg, actors)
    try:
        pool.map_shards("features", shards[:actors], spec, size, batch, 0)  # warm-up: load the net
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = pool.map_shards("features", shards, spec, size, batch, 0)
            seconds = time.perf_counter() - t0
            rates.append(sum(len(r["keys"]) for r in results) / seconds)
        return float(np.median(rates))
    finally:
        pool.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--net", choices=["inception", "probe"], default="inception")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, ["cluster.num_workers=2"])
    with tempfile.TemporaryDirectory() as folder:
        shards = write_shards(folder, args.images, args.image_size, args.per_shard)
        spec = feature_spec(args.net, folder)
        rows = [
            (n, time_pool(cfg, n, shards, spec, args.image_size, args.batch_size, args.repeats))
            for n in (1, 2)
        ]
    ray.shutdown()
    base = rows[0][1]
    print(
        f"\nfeature extraction ({args.net}, {args.images} images at {args.image_size} px, "
        f"batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread(s) per actor, median of {args.repeats})"
    )
    print(f"{'actors':>6}  {'images/s':>10}  {'vs 1 actor':>10}")
    for n, rate in rows:
        print(f"{n:>6}  {rate:>10.2f}  {rate / base:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
