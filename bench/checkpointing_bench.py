"""ResTok-L training step with activation checkpointing on vs off, interleaved in one process.

    python bench/checkpointing_bench.py [PAIRS]    # official-l, batch 1, fp32, 1 thread; default 2 pairs

Each pair runs one step with `activation_checkpointing` on, then one off (fwd + bwd of MSE + VQ);
prints process CPU and wall seconds per step and the on/off ratio of the median CPU time (the first
pair excluded when there are more). Peak memory needs separate processes (RSS is monotone):
`bench/tokenizer_bench.py --presets official-l --batch 1 --steps 1 --no-flops [--checkpointing]`.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tokenizer import ResTok, tokenizer_config_for


def main(pairs: int = 2) -> None:
    torch.set_num_threads(1)
    cfg = tokenizer_config_for("official-l")
    torch.manual_seed(0)
    model = ResTok(cfg).train()
    x = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    res: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for ckpt in [True, False] * pairs:
        model.cfg.activation_checkpointing = ckpt  # read at every forward
        c, w = time.process_time(), time.perf_counter()
        recon, aux = model(x, keep=cfg.num_tokens)
        (F.mse_loss(recon, x) + aux["vq_loss"]).backward()
        model.zero_grad(set_to_none=True)
        res[ckpt].append((time.process_time() - c, time.perf_counter() - w))
        print(
            f"checkpointing {ckpt}: cpu {res[ckpt][-1][0]:.2f} s, wall {res[ckpt][-1][1]:.2f} s", flush=True
        )
    med = {
        k: sorted(c for c, _ in (v[1:] if len(v) > 1 else v))[(len(v) - (len(v) > 1)) // 2]
        for k, v in res.items()
    }
    print(f"on/off (median process CPU): {med[True] / med[False]:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
