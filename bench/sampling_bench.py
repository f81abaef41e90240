"""Sampling speed: HAR vs vanilla AR on the same weights, in one process (SPEC "Speed: what to beat").

    python bench/sampling_bench.py                      # tiny (batch 1, 64) and L (batch 1, 8) on CPU
    python bench/sampling_bench.py --presets L --l-batches 1
    python bench/sampling_bench.py --device cuda --l-batches 1,64 --compile
    python bench/sampling_bench.py --presets L --linear mkl   # CPU linears on MKL, as torch's default
    python bench/sampling_bench.py --presets L --no-prepack   # oneDNN reorders the weights per call

Random weights (the output layer gets std 0.02 instead of its zero init so top-p sees a spread);
the vanilla model shares the HAR model's tensors (minus the mask-token table). Sampling uses the
published recipe (CFG 3.75 step schedule from 0.25, top-p 0.95), so every pass runs the doubled
batch. Times are medians over --repeats runs after a warm-up run of both models per (preset, batch)
(which also packs the CPU linears' weights, `sample(prepack=True)`).
"""

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.generator import (
    GPT,
    official_generator_config,
    official_sampling_config,
    sample,
)
from models.generator.gpt import rope_table
from models.onednn_linear import use_onednn

PRESETS = {
    "tiny": {"size": "tiny", "vocab_size": 64, "levels": [1, 1, 2, 4, 8, 16]},
    "L": {"size": "L", "vocab_size": 8192, "levels": [1, 1, 2, 4, 8, 16, 32, 64]},
}


def build_pair(preset: str, device: str, dtype: torch.dtype):
    p = PRESETS[preset]
    torch.manual_seed(0)
    har = GPT(official_generator_config(False, p["size"], vocab_size=p["vocab_size"], levels=p["levels"]))
    torch.nn.init.normal_(har.head.weight, std=0.02)
    har = har.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        vanilla = GPT(
            official_generator_config(True, p["size"], vocab_size=p["vocab_size"], levels=p["levels"])
        )
    shared = {k: v for k, v in har.state_dict().items() if not k.startswith("mask_token_embed")}
    vanilla.load_state_dict(shared, strict=True, assign=True)  # same tensors, no copy
    # The non-persistent RoPE buffer was built on meta: rebuild it for real (vanilla length N + 1).
    vanilla.rope = rope_table(vanilla.block_size + 1, vanilla.head_dim, vanilla.cfg.rope_base).to(device)
    return har, vanilla.eval()


def linears_floor_s(model: GPT, batch: int, device: str, repeats: int = 3) -> float:
    """Seconds HAR's linear layers alone take over one sample of `batch` images: each pass's row
    count (CFG doubles the batch) through every Linear, on the kernels and packs sampling uses.
    Attention, norms and sampling come on top, so vanilla's measured time over this is the most
    HAR/vanilla can reach on this machine: both models compute the same rows (one per token), HAR
    in 9 wide passes, vanilla in 128 narrow ones bound by reading the weights."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = [2 * batch * (step.end - step.start) for step in model.layout.steps]
    per_rows = {}
    with torch.no_grad():
        for m in sorted(set(rows)):
            xs = {n: torch.randn(m, n, device=device) for n in {lin.in_features for lin in linears}}
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                _sync(device)
                t0 = time.perf_counter()
                for lin in linears:
                    lin(xs[lin.in_features])
                _sync(device)
                times.append(time.perf_counter() - t0)
            per_rows[m] = statistics.median(times[1:])
    return sum(per_rows[m] for m in rows)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_sampling(model: GPT, batch: int, repeats: int, device: str, kw: dict):
    labels = torch.arange(batch, device=device) % model.num_classes
    runs = []
    for r in range(repeats):
        gen = torch.Generator(device=device).manual_seed(r)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        res = sample(model, labels, generator=gen, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0, time.process_time() - c0, res))
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    return wall, cpu, runs[0][2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,L")
    ap.add_argument("--batches", default="1,64", help="batch sizes for tiny")
    ap.add_argument("--l-batches", default=None, help="batch sizes for L (default 1,8 on CPU, 1,64 on CUDA)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs for tiny")
    ap.add_argument("--l-repeats", type=int, default=1, help="timed runs for L")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (dynamic shapes)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--linear",
        default="onednn",
        choices=["onednn", "mkl"],
        help="fp32 CPU linears on oneDNN (ours) or MKL (torch's F.linear, as the release)",
    )
    ap.add_argument(
        "--prepack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fp32 CPU linears use weights packed once for oneDNN (sample's default)",
    )
    args = ap.parse_args(argv)
    with use_onednn(args.linear == "onednn"):
        return run(args)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kw = asdict(official_sampling_config()) | {"prepack": args.prepack}
    l_batches = args.l_batches or ("1,64" if args.device.startswith("cuda") else "1,8")
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"dtype {args.dtype}, "
        f"compile {args.compile}, CPU linears {args.linear}, prepack {args.prepack}; sampler {kw}"
    )
    rows = []
    for preset in args.presets.split(","):
        t0 = time.perf_counter()
        har, vanilla = build_pair(preset, args.device, dtype)
        if args.compile:
            # Compile the transformer trunk only (the per-step embedding gather stays eager, so the
            # step kinds do not multiply graphs); dynamic shapes cover every step length and start.
            for m in (har, vanilla):
                m._trunk = torch.compile(m._trunk, dynamic=True)
        n_params = sum(p.numel() for p in har.parameters())
        print(
            f"[{preset}] built in {time.perf_counter() - t0:.1f}s, {n_params:,} parameters, "
            f"{har.block_size} tokens, levels {list(har.cfg.levels)}",
            flush=True,
        )
        batches = [int(b) for b in (l_batches if preset == "L" else args.batches).split(",")]
        repeats = args.l_repeats if preset == "L" else args.repeats
        for batch in batches:
            # Warm-up (allocations, kernels, packs, compiled graphs), each model (own packs and graphs).
            for model in (har, vanilla):
                sample(model, torch.zeros(batch, dtype=torch.long), **kw)
            result = {}
            for mode, model in (("HAR", har), ("vanilla", vanilla)):
                wall, cpu, res = time_sampling(model, batch, repeats, args.device, kw)
                result[mode] = (wall, cpu, res)
                print(
                    f"  {preset} batch {batch} {mode}: wall {wall:.3f}s, process CPU {cpu:.3f}s, "
                    f"per pass {[round(t, 3) for t in res.step_times][:12]}",
                    flush=True,
                )
            t_har, c_har, r_har = result["HAR"]
            t_van, c_van, r_van = result["vanilla"]
            floor = linears_floor_s(har, batch, args.device)
            print(
                f"  {preset} batch {batch} HAR's linears alone: {floor:.3f}s "
                f"({len(har.layout.steps)} passes, CFG-doubled rows); HAR/vanilla can reach at most "
                f"{t_van / floor:.2f}x here",
                flush=True,
            )
            last_share = r_har.step_times[-1] / sum(r_har.step_times)
            rows.append(
                (
                    preset,
                    batch,
                    r_har.num_forward_passes,
                    r_van.num_forward_passes,
                    t_har,
                    t_van,
                    c_har,
                    c_van,
                    last_share,
                    t_van / floor,
                )
            )
        del har, vanilla

    print()
    # Process CPU time is shown beside wall time: on a shared machine the wall clock also counts
    # time spent waiting for a core, the CPU time does not (it sums over threads).
    print(
        "| preset | batch | HAR passes | vanilla passes | HAR s/image | vanilla s/image | HAR img/s "
        "| vanilla img/s | speed-up (wall) | speed-up (CPU time) | HAR last pass share "
        "| ceiling (vanilla / HAR's linears) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset, batch, p_h, p_v, t_h, t_v, c_h, c_v, share, ceiling in rows:
        print(
            f"| {preset} | {batch} | {p_h} | {p_v} | {t_h / batch:.4f} | {t_v / batch:.4f} "
            f"| {batch / t_h:.2f} "
            f"| {batch / t_v:.2f} | {t_v / t_h:.2f}x | {c_v / c_h:.2f}x | {share:.0%} | {ceiling:.2f}x |"
        )
    return rows


if __name__ == "__main__":
    main()
