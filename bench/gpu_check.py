"""One-command GPU check (issue 16 "Deliver" 4): run it the day a CUDA machine is available.

    python bench/gpu_check.py                    # CUDA, bf16: gpu_check.json/.md in $OUT or ./gpu_check_out
    python bench/gpu_check.py --dry-run          # CPU, fp32, tiny sizes: checks that every part runs
    python bench/gpu_check.py --skip recipe,official --out /tmp/x

Parts (each in its own try/except: an error is recorded and the next part runs):
  env        device, torch, measured bf16 matmul peak and the device's nominal dense peak
  sampling   HAR-L vs vanilla GPT-L on the same weights, batch 1 and 64, published recipe (CFG 3.75
             step schedule, top-p 0.95), eager
  sampling_compiled  HAR-L with compiled decode steps (CUDA graphs; one graph per pass and batch,
             counted): vanilla's 128 start positions would be 128 graphs, so it is not compiled
  official   the release's HAR / vanilla samplers on the same weights when its tree is present
             (RESTOK_OFFICIAL_TREE; bench helpers in RESTOK_OFFICIAL_BENCH, default
             /work/shared/official-bench)
  tokenizer  ResTok-L training step (fwd + bwd MSE + VQ, bf16 autocast): images/s, MFU, peak memory;
             without and with activation checkpointing (and the batch that then fits)
  generator  HAR-L training step (fwd + bwd cross-entropy + AdamW, bf16 autocast): tokens/s, MFU, peak memory
  recipe     the small-scale recipe (tests/recipe_helpers sizes) through `restok run` with
             cluster.use_gpu=true, bf16 (the preset's), one worker; exit code and stage lines

MFU = model FLOPs (torch.utils.flop_counter, one step without activation checkpointing, per
image: a checkpointed step's recomputation is not model FLOPs) / step time / peak; reported
against both the measured matmul peak and the nominal peak. Sized to finish in under 10 minutes on
an H200; `--deadline-s` (default 480) skips what would start after it, each row recorded as it
ends (an error in one row is recorded in it and the next row runs).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a bare copy of the tree (the GPU machine), not installed
from models.generator import (  # noqa: E402
    GPT,
    official_generator_config,
    official_sampling_config,
    sample,
)
from models.tokenizer import ResTok, tokenizer_config_for  # noqa: E402

# Nominal dense bf16 peaks (TFLOP/s, no sparsity), matched on the device name, longest name first.
NOMINAL_BF16_TFLOPS = {
    "H200 NVL": 835.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}
# Cheapest and most wanted first: compiles (minutes) and the recipe run last.
PARTS = ("env", "sampling", "tokenizer", "generator", "sampling_compiled", "official", "recipe")


class Ctx:
    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.peak = {}
        self.results: dict = {"parts": {}, "errors": {}}
        self.deadline = time.perf_counter() + args.deadline_s

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_mem(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def timed(self, fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    def mfu(self, flops: float, seconds: float) -> dict:
        out = {}
        for k, p in self.peak.items():
            if p:
                out[f"mfu_vs_{k}"] = flops / seconds / p
        return out


def part_env(c: Ctx) -> dict:
    info = {
        "torch": torch.__version__,
        "device": str(c.device),
        "dtype": str(c.dtype),
        "dry_run": c.dry,
        "threads": torch.get_num_threads(),
    }
    n = 8192 if c.cuda else 512
    a = torch.randn(n, n, device=c.device, dtype=c.dtype)
    b = torch.randn(n, n, device=c.device, dtype=c.dtype)
    reps = 20 if c.cuda else 3
    s = c.timed(lambda: a @ b, reps, warmup=2)
    c.peak["measured"] = 2 * n**3 / s
    info["measured_matmul_tflops"] = c.peak["measured"] / 1e12
    if c.cuda:
        name = torch.cuda.get_device_name()
        info["device_name"] = name
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        nominal = next(
            (NOMINAL_BF16_TFLOPS[k] for k in sorted(NOMINAL_BF16_TFLOPS, key=len, reverse=True) if k in name),
            None,
        )
        if nominal:
            c.peak["nominal"] = nominal * 1e12
            info["nominal_bf16_tflops"] = nominal
    return info


def _gen_pair(c: Ctx, size: str, vocab: int, levels: list[int]):
    torch.manual_seed(0)
    har = GPT(official_generator_config(False, size, vocab_size=vocab, levels=levels))
    torch.nn.init.normal_(har.head.weight, std=0.02)  # a spread for top-p (zero-init head: uniform)
    van = GPT(official_generator_config(True, size, vocab_size=vocab, levels=levels))
    van.load_state_dict({k: v for k, v in har.state_dict().items() if not k.startswith("mask_token_embed")})
    return har.to(c.device, c.dtype).eval(), van.to(c.device, c.dtype).eval()


def _gen_sizes(c: Ctx):
    if c.dry:
        return "tiny", 64, [1, 1, 2, 4, 8, 16], [1, 4]
    return "L", 8192, [1, 1, 2, 4, 8, 16, 32, 64], [1, 64]


def _row(c: Ctx, rows: list, base: dict, measure) -> None:
    """Append one measured row; past the deadline or on an error the row says so, and the part
    goes on with its next row."""
    if c.left_s() <= 0:
        rows.append({**base, "skipped": "deadline"})
        return
    try:
        rows.append({**base, **measure()})
    except Exception as e:  # noqa: BLE001 - recorded in the row
        rows.append(
            {**base, "error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-1500:]}
        )


def part_sampling(c: Ctx, compiled: bool = False) -> dict:
    """Eager: HAR and vanilla, and HAR over vanilla. Compiled (CUDA only): HAR, against its eager time."""
    if compiled and not c.cuda:
        return {"skipped": "compiled decode steps are measured on CUDA only"}
    size, vocab, levels, batches = _gen_sizes(c)
    har, van = _gen_pair(c, size, vocab, levels)
    kw = asdict(official_sampling_config())
    models = (("HAR", har),) if compiled else (("HAR", har), ("vanilla", van))
    if compiled:
        torch._dynamo.reset()
    rows = []
    for b in batches:
        labels = torch.arange(b, device=c.device) % har.num_classes

        def measure(b=b, labels=labels):
            row = {}
            for name, m in models:
                gen = torch.Generator(device=c.device)
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiled else 0
                t_first = time.perf_counter()
                sample(m, labels, generator=gen.manual_seed(0), compile_decode=compiled, **kw)  # warm-up
                row[f"{name}_first_call_s"] = time.perf_counter() - t_first
                if compiled:
                    row[f"{name}_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
                reps = 1 if (c.dry or name == "vanilla") and not c.cuda else 3
                row[f"{name}_s"] = c.timed(
                    lambda m=m, gen=gen: sample(
                        m, labels, generator=gen.manual_seed(0), compile_decode=compiled, **kw
                    ),
                    reps,
                    warmup=0,
                )
                row[f"{name}_img_s"] = b / row[f"{name}_s"]
            if not compiled:
                row["HAR_over_vanilla"] = row["vanilla_s"] / row["HAR_s"]
            return row

        _row(c, rows, {"batch": b, "mode": "compiled" if compiled else "eager"}, measure)
    return {"model": f"GPT-{size}", "levels": levels, "recipe": kw, "rows": rows}


def part_official(c: Ctx) -> dict:
    tree = os.environ.get("RESTOK_OFFICIAL_TREE", "/work/wt/official-tree")
    bench = os.environ.get("RESTOK_OFFICIAL_BENCH", "/work/shared/official-bench")
    if not Path(tree, "autoregressive").is_dir() or not Path(bench, "bench_official.py").is_file():
        return {"skipped": f"official tree ({tree}) or bench helpers ({bench}) not present"}
    if c.dry:
        return {"skipped": "dry run: the official L models are not built"}
    os.environ["RESTOK_OFFICIAL_TREE"] = tree
    sys.path.insert(0, bench)
    import bench_official as ob  # builds nothing at import; sets up the tree on sys.path
    from omegaconf import OmegaConf

    from models.generator.official import convert_official_state_dict

    cfg = OmegaConf.load(os.path.join(ob.REPO, "configs/training/generator/llamagen_l_c2i_restok_l_128.yaml"))
    torch.manual_seed(0)
    oh = ob.gpt_har.GPT_models[cfg.model.generator.model_type](cfg)
    ob.fx.perturb_constant_params(oh, 1234, 0.02)
    sd = oh.state_dict()
    ov = ob.gpt_vanilla.GPT_models[cfg.model.generator.model_type](cfg)
    ov.load_state_dict({k: v for k, v in sd.items() if not k.startswith("spe_tok_embeddings.")})
    levels = [1, 1, 2, 4, 8, 16, 32, 64]
    ours = []
    for vanilla in (False, True):
        gcfg = official_generator_config(vanilla, "L", vocab_size=8192, levels=levels)
        m = GPT(gcfg)
        m.load_state_dict(
            convert_official_state_dict(
                {k: v for k, v in sd.items() if not (vanilla and k.startswith("spe_tok_embeddings."))}, gcfg
            )
        )
        ours.append(m.to(c.device, c.dtype).eval())
    oh, ov = oh.to(c.device, c.dtype).eval(), ov.to(c.device, c.dtype).eval()
    kw = asdict(official_sampling_config())
    rows = []
    for b in (1, 64):
        labels = torch.randint(0, 1000, (b,), generator=torch.Generator().manual_seed(7)).to(c.device)
        run_oh, run_ov, _, _ = ob.gen_fns(oh, ov, labels, 128, int(cfg.model.generator.ar_token_num))
        row = {"batch": b}
        for name, fn in (
            ("official_HAR", run_oh),
            ("official_vanilla", run_ov),
            ("restok_HAR", lambda labels=labels: sample(ours[0], labels, **kw)),
            ("restok_vanilla", lambda labels=labels: sample(ours[1], labels, **kw)),
        ):
            with torch.inference_mode():
                row[f"{name}_s"] = c.timed(fn, 3)
        row["HAR_speedup_vs_official"] = row["official_HAR_s"] / row["restok_HAR_s"]
        row["vanilla_speedup_vs_official"] = row["official_vanilla_s"] / row["restok_vanilla_s"]
        rows.append(row)
    return {"rows": rows}


def _train_step_stats(c: Ctx, step, batch: int, units: int, steps: int, flops: float | None = None) -> dict:
    """`flops`: the step's model FLOPs when known (counted once on an eager, uncheckpointed twin)."""
    if flops is None:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
    c.sync()
    c.reset_mem()
    s = c.timed(step, steps, warmup=1)  # a compiled step compiles in the warm-up
    return {
        "batch": batch,
        "step_s": s,
        "per_s": units / s,
        "gflop_per_step": flops / 1e9,
        "peak_gib": c.peak_gib(),
        **c.mfu(flops, s),
    }


def part_tokenizer(c: Ctx) -> dict:
    name = "tiny-fixture" if c.dry else "official-l"
    rows = []
    per_image: dict = {}  # model FLOPs per image, from the first (eager, uncheckpointed) case
    small, big = (2, 4) if c.dry else (32, 96)
    # (checkpointing, batch, pixel CNNs compiled: tokenizer_train.compile; aot_eager in the dry run)
    cases = ((False, small, False), (False, small, True), (True, small, False), (True, big, False))
    for ckpt, batch, compiled in cases:
        base = {"preset": name, "activation_checkpointing": ckpt, "compiled_cnns": compiled, "batch": batch}

        def measure(ckpt=ckpt, batch=batch, compiled=compiled):
            cfg = tokenizer_config_for(name)
            cfg.activation_checkpointing = ckpt
            torch.manual_seed(0)
            model = ResTok(cfg).to(c.device).train()
            if compiled:
                model.compile_pixel_cnns("aot_eager" if c.dry else "inductor")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=c.cuda)
            x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=c.device)
            amp = torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.cuda)

            def step():
                with amp:
                    recon, aux = model(x, keep=cfg.num_tokens)
                    loss = F.mse_loss(recon.float(), x) + aux["vq_loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                known = per_image["flops"] * batch if per_image else None
                r = _train_step_stats(c, step, batch, batch, 1 if c.dry else 5, known)
                per_image.setdefault("flops", r["gflop_per_step"] * 1e9 / batch)
                r["images_per_s"] = r.pop("per_s")
                return r
            except torch.OutOfMemoryError as e:
                return {"error": f"OOM: {e}"[:300]}

        _row(c, rows, base, measure)  # the case's model and optimizer go with measure's frame
        c.reset_mem()
    return {"rows": rows}


def part_generator(c: Ctx) -> dict:
    size, vocab, levels, _ = _gen_sizes(c)
    batch = 4 if c.dry else 64
    torch.manual_seed(0)
    gpt = GPT(official_generator_config(False, size, vocab_size=vocab, levels=levels)).to(c.device).train()
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4, fused=c.cuda)
    labels = torch.randint(0, gpt.num_classes, (batch,), device=c.device)
    codes = torch.randint(0, vocab, (batch, gpt.block_size), device=c.device)
    amp = torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.cuda)

    def step():
        with amp:
            logits = gpt(labels, codes)
        F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    r = _train_step_stats(c, step, batch, batch * gpt.block_size, 1 if c.dry else 10)
    r.update(model=f"HAR GPT-{size}", tokens_per_s=r.pop("per_s"), images_per_s=batch / r["step_s"])
    return r


def part_recipe(c: Ctx, timeout_s: int) -> dict:
    if c.dry:
        return {"skipped": "dry run: the recipe needs CUDA here (CPU runs are tests/test_recipe.py)"}
    timeout_s = int(min(timeout_s, c.left_s() - 10))
    if timeout_s < 60:
        return {"skipped": f"deadline: {timeout_s} s left for the recipe run"}
    sys.path.insert(0, str(ROOT / "tests"))
    from recipe_helpers import SHRINK_SIZES, site_paths, write_imagenet_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_imagenet_folder(Path(tmp) / "imagenet")
        work = Path(tmp) / "work"
        overrides = [
            *SHRINK_SIZES,
            *site_paths(work, folder, "imagenet_folder"),
            "cluster.use_gpu=true",
            "cluster.num_workers=1",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "run", "imagenet256-restok-l", *overrides],
                check=False,
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp,
                timeout=timeout_s,
            )
            returncode, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:  # keep what it printed
            returncode = f"timed out after {timeout_s} s"
            out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        return {
            "returncode": returncode,
            "seconds": time.perf_counter() - t,
            "stage_lines": [ln for ln in out.splitlines() if "stage" in ln.lower()][-20:],
            "tail": out[-3000:],
        }


def markdown(res: dict) -> str:
    lines = ["# GPU check", "", "```", json.dumps(res["parts"].get("env", {}), indent=1), "```", ""]
    sampling_rows = [
        r for part in ("sampling", "sampling_compiled") for r in res["parts"].get(part, {}).get("rows", [])
    ]
    if sampling_rows:
        lines += [
            f"## Sampling ({res['parts'].get('sampling', {}).get('model', '')}, published recipe)",
            "",
            "| batch | mode | HAR s | vanilla s | HAR img/s | HAR over vanilla | graphs |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in sampling_rows:
            if "HAR_s" not in r:
                lines.append(
                    f"| {r['batch']} | {r['mode']} | {r.get('error', r.get('skipped', ''))[:80]} | | | | |"
                )
                continue
            van = f"{r['vanilla_s']:.4f}" if "vanilla_s" in r else ""
            ratio = f"{r['HAR_over_vanilla']:.2f}x" if "HAR_over_vanilla" in r else ""
            lines.append(
                f"| {r['batch']} | {r['mode']} | {r['HAR_s']:.4f} | {van} | {r['HAR_img_s']:.1f} "
                f"| {ratio} | {r.get('HAR_graphs', '')} |"
            )
    o = res["parts"].get("official")
    if o and "rows" in o:
        lines += [
            "",
            "## vs the release (same weights)",
            "",
            (
                "| batch | official HAR s | restok HAR s | HAR speed-up | official vanilla s "
                "| restok vanilla s | vanilla speed-up |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['batch']} | {r['official_HAR_s']:.4f} | {r['restok_HAR_s']:.4f} | "
            f"{r['HAR_speedup_vs_official']:.2f}x | {r['official_vanilla_s']:.4f} | "
            f"{r['restok_vanilla_s']:.4f} | "
            f"{r['vanilla_speedup_vs_official']:.2f}x |"
            for r in o["rows"]
        ]
    rows = list(res["parts"].get("tokenizer", {}).get("rows", []))
    g = res["parts"].get("generator")
    if g and "step_s" in g:
        rows.append(g)
    if rows:
        lines += [
            "",
            "## Training steps",
            "",
            (
                "| model | ckpt | batch | step s | images/s | tokens/s | "
                "MFU (measured) | MFU (nominal) | peak GiB |"
            ),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def row_name(r):
            return f"{r.get('preset', r.get('model'))}{' (compiled CNNs)' if r.get('compiled_cnns') else ''}"

        for r in rows:
            if "step_s" not in r:
                lines.append(
                    f"| {row_name(r)} | {r.get('activation_checkpointing', '')} "
                    f"| {r['batch']} | {r.get('error', r.get('skipped', ''))[:60]} | | | | | |"
                )
                continue

            def f(k, fmt="{:.3f}", r=r):
                return fmt.format(r[k]) if r.get(k) is not None else ""

            lines.append(
                f"| {row_name(r)} | {r.get('activation_checkpointing', '')} | "
                f"{r['batch']} | {f('step_s')} | {f('images_per_s', '{:.1f}')} | "
                f"{f('tokens_per_s', '{:.0f}')} | {f('mfu_vs_measured', '{:.1%}')} | "
                f"{f('mfu_vs_nominal', '{:.1%}')} | {f('peak_gib', '{:.2f}')} |"
            )
    rc = res["parts"].get("recipe")
    if rc:
        lines += [
            "",
            "## Recipe (small scale, CUDA)",
            "",
            f"returncode {rc.get('returncode', rc.get('skipped'))}, {rc.get('seconds', 0):.0f} s",
        ]
    for k, e in res["errors"].items():
        lines += ["", f"## ERROR in {k}", "", "```", e[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny sizes (checks the script runs)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    ap.add_argument("--recipe-timeout", type=int, default=240)
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=480,
        help="seconds after which no part or row starts (the device tool kills a command at 600)",
    )
    args = ap.parse_args(argv)
    c = Ctx(args)
    if not c.cuda and not c.dry:
        print("no CUDA device: running the CPU dry run instead (--dry-run)")
        c.dry = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    runners = {
        "env": part_env,
        "sampling": part_sampling,
        "sampling_compiled": lambda c: part_sampling(c, compiled=True),
        "official": part_official,
        "tokenizer": part_tokenizer,
        "generator": part_generator,
        "recipe": lambda c: part_recipe(c, args.recipe_timeout),
    }
    t0 = time.perf_counter()
    for name in PARTS:
        if name in skip:
            continue
        t = time.perf_counter()
        if c.left_s() <= 0:
            c.results["parts"][name] = {"skipped": "deadline"}
            continue
        print(f"[gpu_check] {name} ({c.left_s():.0f} s left) ...", flush=True)
        try:
            with torch.inference_mode() if name.startswith("sampling") else contextlib.nullcontext():
                c.results["parts"][name] = runners[name](c)
        except Exception:  # noqa: BLE001 - record and continue with the next part
            c.results["errors"][name] = traceback.format_exc()
            print(c.results["errors"][name], file=sys.stderr, flush=True)
        c.results.setdefault("part_seconds", {})[name] = time.perf_counter() - t
        c.reset_mem()
        (out / "gpu_check.json").write_text(json.dumps(c.results, indent=1, default=str))
    c.results["total_seconds"] = time.perf_counter() - t0
    (out / "gpu_check.json").write_text(json.dumps(c.results, indent=1, default=str))
    md = markdown(c.results)
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(
        f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} "
        f"in {c.results['total_seconds']:.0f} s; errors in: {sorted(c.results['errors']) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
