"""ResTok training-step throughput, encode/decode latency and peak memory (not a timed test).

    python bench/tokenizer_bench.py                      # CPU: tiny-fixture (B=4) and official-l (B=1)
    python bench/tokenizer_bench.py --device cuda        # GPU: bf16 autocast, MFU vs measured peak

On a shared CPU pass --threads 1: with more OpenMP threads than free cores every op waits on
descheduled threads (here 2 threads under load: 9.4 s vs 0.11 s per cpu-nano step).

SPEC "Speed: what to beat" (authors' code, 2-core CPU, fp32): ResTok-L training step at batch 1
17.8 s and 8.5 GiB peak; encode 2.55 s, decode 2.27 s. Compare numbers only within one run.
"""

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tokenizer import ResTok, tokenizer_config_for

AUTHORS_CPU = {"official-l": {"step_s": 17.8, "peak_gib": 8.5, "encode_s": 2.55, "decode_s": 2.27}}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS


def bench(
    name: str,
    batch: int,
    steps: int,
    warmup: int,
    device,
    amp_dtype,
    ckpt: bool = False,
    count_flops: bool = True,
):
    """Train-mode forward+backward (MSE + VQ, all tokens kept) then eval encode/decode."""
    cfg = tokenizer_config_for(name)
    cfg.activation_checkpointing = ckpt
    model = ResTok(cfg).to(device).train()
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def step(saved_hooks=None):
        with autocast, saved_hooks or contextlib.nullcontext():
            recon, aux = model(images, keep=cfg.num_tokens)  # fixed length: comparable steps
            loss = F.mse_loss(recon.float(), images) + aux["vq_loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    # What the forward keeps for the backward (grows with the batch; what checkpointing cuts):
    # distinct storages autograd saved, parameters excluded by storage identity. Under bf16
    # autocast the weights' bf16 copies are new storages and are counted (a per-step constant,
    # spread over the batch).
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    flops = FlopCounterMode(display=False)
    t = time.perf_counter()
    with flops if count_flops else contextlib.nullcontext():
        # counts FLOPs and kept tensors; a warm-up step, or the only timed step when warmup == 0
        step(torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t))
    _sync(device)
    first_s = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        step()
    if warmup == 0:
        step_s, steps = first_s, steps - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if steps > 0:
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        timed = (time.perf_counter() - t) / steps
        step_s = timed if warmup else (first_s + timed * steps) / (steps + 1)
    peak = _peak_gib(device)
    model.eval()
    with torch.no_grad(), autocast:
        _sync(device)
        t = time.perf_counter()
        zq, _ = model.encode(images)
        _sync(device)
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        model.decode(zq)
        _sync(device)
        dec_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    return {
        "preset": name,
        "batch": batch,
        "params_m": params / 1e6,
        "step_s": step_s,
        "img_s": batch / step_s,
        "gflop": flops.get_total_flops() / 1e9 if count_flops else float("nan"),
        "peak_gib": peak,
        "kept_gib_per_img": sum(kept.values()) / 2**30 / batch,
        "encode_s": enc_s,
        "decode_s": dec_s,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--presets", default="tiny-fixture,official-l")
    ap.add_argument("--batch", default=None, help="comma list per preset (default cpu 4,1; cuda 32,8)")
    ap.add_argument("--steps", default=None, help="timed steps per preset (default cpu 3,1; cuda 10,5)")
    ap.add_argument(
        "--warmup",
        default=None,
        help="warm-up steps per preset (default cpu 1,0: L is timed on its first step; cuda 3,3)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fp32", action="store_true", help="on cuda: no bf16 autocast")
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing per ViT block (TokenizerConfig.activation_checkpointing)",
    )
    ap.add_argument(
        "--no-flops",
        action="store_true",
        help="skip the FLOP count (its first step keeps extra tensors: peak RSS is higher)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    presets = args.presets.split(",")
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batch or ("32,8" if cuda else "4,1")).split(",")]
    steps = [int(s) for s in (args.steps or ("10,5" if cuda else "3,1")).split(",")]
    warmups = [int(w) for w in (args.warmup or ("3,3" if cuda else "1,0")).split(",")]

    def pad(xs):
        return (xs + [xs[-1]] * len(presets))[: len(presets)]

    amp = torch.bfloat16 if cuda and not args.fp32 else None
    peak = measured_matmul_peak(device, amp or torch.float32)
    print(
        f"device {device}, threads {torch.get_num_threads()}, checkpointing {args.checkpointing}, "
        f"{'bf16 autocast' if amp else 'fp32'}, measured matmul peak {peak / 1e12:.2f} TFLOP/s"
    )
    rows = [
        bench(p, b, s, w, device, amp, args.checkpointing, not args.no_flops)
        for p, b, s, w in zip(presets, pad(batches), pad(steps), pad(warmups), strict=False)
    ]
    head = (
        f"{'preset':14s} {'B':>3s} {'params M':>9s} {'step s':>8s} {'img/s':>8s} "
        f"{'GFLOP':>9s} {'MFU %':>6s} {'peak GiB':>8s} {'kept GiB/img':>12s} {'enc s':>7s} {'dec s':>7s}"
        "  vs authors"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = 100 * r["gflop"] * 1e9 / r["step_s"] / peak
        ref = AUTHORS_CPU.get(r["preset"]) if not cuda and r["batch"] == 1 else None
        vs = (
            f"step {ref['step_s'] / r['step_s']:.2f}x faster, enc {ref['encode_s'] / r['encode_s']:.2f}x, "
            f"dec {ref['decode_s'] / r['decode_s']:.2f}x"
            if ref
            else ""
        )
        print(
            f"{r['preset']:14s} {r['batch']:3d} {r['params_m']:9.1f} {r['step_s']:8.3f} "
            f"{r['img_s']:8.2f} {r['gflop']:9.1f} {mfu:6.1f} {r['peak_gib']:8.2f} "
            f"{r['kept_gib_per_img']:12.3f} "
            f"{r['encode_s']:7.3f} {r['decode_s']:7.3f}  {vs}"
        )
    if not cuda:
        print(
            "CPU peak is the process peak RSS (monotone over the run). kept GiB/img: tensors the "
            "forward keeps for the backward, per image. The authors' numbers are from another "
            "2-core machine: ratios are indicative only."
        )


if __name__ == "__main__":
    main()
