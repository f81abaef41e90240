"""Side by side with the authors' code on the same weights (SPEC "Speed: what to beat", issue 16).

    python bench/vs_official.py                       # tok_tiny and gen_l (~15 min on 2 cores)
    SBS_GROUPS=tok_tiny python bench/vs_official.py   # one group
    python bench/vs_official.py --threads 1           # both sides at 1 thread (oversubscribed machine)
    python bench/vs_official.py --json out.json       # also keep every record
    SBS_GROUPS=tok_tiny python bench/vs_official.py --compile inductor
        # restok's pixel CNNs under torch.compile (tokenizer_train.compile); the release eager

Runs `side_by_side.py` (official-bench, beside SPEC.md) in the authors' venv: it builds the
release's models, converts their weights with restok's converter into restok's models (this
checkout) and times both interleaved round-robin in one process. Prints a Markdown table with
wall-clock and process-CPU ratios and the issue's targets. Skips with one line when the official
tree, its venv or the bench script is missing. Locations (environment, else these defaults):

    RESTOK_OFFICIAL_TREE   /work/wt/official-tree   (the release at e0059cb + tiny_size.patch)
    RESTOK_OFFICIAL_VENV   /work/wt/official-venv   (its python: $VENV/bin/python)
    RESTOK_OFFICIAL_BENCH  /work/shared/official-bench (side_by_side.py, bench_official.py)

Absolute seconds drift 10-50% between runs on a shared machine: compare ratios of one run only.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs.schema import CompileBackend

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {
    "RESTOK_OFFICIAL_TREE": "/work/wt/official-tree",
    "RESTOK_OFFICIAL_VENV": "/work/wt/official-venv",
    "RESTOK_OFFICIAL_BENCH": "/work/shared/official-bench",
}
# Issue 16 "Must show": (group, what) -> minimum official/restok ratio.
TARGETS = {
    ("tok_tiny", "train fwd+bwd (MSE+VQ)"): 1.3,
    ("tok_tiny", "encode"): 1.3,
    ("tok_tiny", "decode codes"): 1.3,
    ("gen_l", "HAR"): 1.5,
    ("gen_l", "vanilla"): 1.3,
}
HAR_OVER_VANILLA = {1: 8.0, 8: 3.5}

# Runs inside the official venv: side_by_side's groups, then its records as JSON.
DRIVER = """
import json, os, sys, contextlib, types, logging
sys.path.insert(0, os.environ["SBS_DIR"])
try:
    import accelerate  # noqa: F401
except ImportError:  # one process: accelerate's gather is the identity; nothing else is called
    acc = {n: types.ModuleType(n) for n in ("accelerate", "accelerate.utils",
                                            "accelerate.utils.operations", "accelerate.logging")}
    acc["accelerate.utils.operations"].gather = lambda t: t
    acc["accelerate.logging"].MultiProcessAdapter = logging.LoggerAdapter
    sys.modules.update(acc)
    print("accelerate not installed: single-process stub (gather = identity)", file=sys.stderr)
with contextlib.redirect_stdout(sys.stderr):
    import side_by_side as sbs
    threads = int(os.environ.get("SBS_THREADS") or 0)
    if threads:  # side_by_side times at 2 threads; on an oversubscribed machine 1 is fairer
        timed = sbs.ob.time_interleaved
        def time_interleaved(recs_fns, *a, **k):
            for rec, _ in recs_fns:
                rec["threads"] = threads
            return timed(recs_fns, *a, **k)
        sbs.ob.time_interleaved = time_interleaved
    backend = os.environ.get("SBS_RESTOK_COMPILE") or "off"
    if backend != "off":  # tokenizer_train.compile: restok's pixel CNNs compiled once built
        class CompiledResTok(sbs.OurResTok):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.compile_pixel_cnns(backend)
        sbs.OurResTok = CompiledResTok
    for g in os.environ.get("SBS_GROUPS", "tok_tiny,gen_l").split(","):
        sbs.GROUPS[g]()
keep = ("group", "what", "who", "batch", "threads", "median_s", "min_s", "repeats",
        "cpu_user_s_per_call", "cpu_sys_s_per_call", "peak_rss_mib")
json.dump([{k: r.get(k) for k in keep} for r in sbs.ROWS], open(os.environ["SBS_JSON"], "w"))
"""


def locate() -> dict[str, Path] | str:
    """Paths of tree, venv python and bench folder, or the one-line reason to skip."""
    get = {k: Path(os.environ.get(k) or v) for k, v in DEFAULTS.items()}
    py = get["RESTOK_OFFICIAL_VENV"] / "bin" / "python"
    checks = [
        (get["RESTOK_OFFICIAL_TREE"] / "autoregressive" / "models" / "gpt_har.py", "official tree"),
        (py, "official venv python"),
        (get["RESTOK_OFFICIAL_BENCH"] / "side_by_side.py", "side_by_side.py"),
    ]
    for path, what in checks:
        if not path.exists():
            return f"skipped: {what} not found at {path} (set RESTOK_OFFICIAL_TREE/_VENV/_BENCH)"
    return {"tree": get["RESTOK_OFFICIAL_TREE"], "python": py, "bench": get["RESTOK_OFFICIAL_BENCH"]}


def cpu_s(r: dict) -> float:
    return (r.get("cpu_user_s_per_call") or 0.0) + (r.get("cpu_sys_s_per_call") or 0.0)


def table(rows: list[dict]) -> str:
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["group"], r["what"], r["batch"]), {})[r["who"]] = r
    out = [
        "| group | what | batch | official s | restok s | restok faster (wall) | (process CPU) | target |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for (g, what, b), d in by.items():
        o, m = d["official"], d["restok"]
        ratio = o["median_s"] / m["median_s"]
        cpu = cpu_s(o) / cpu_s(m) if cpu_s(m) else float("nan")
        tgt = TARGETS.get((g, what))
        mark = "" if tgt is None else f">= {tgt}x {'met' if ratio >= tgt else 'NOT met'}"
        out.append(
            f"| {g} | {what} | {b} | {o['median_s']:.4f} | {m['median_s']:.4f} | {ratio:.2f}x "
            f"| {cpu:.2f}x | {mark} |"
        )
    for g in sorted({r["group"] for r in rows if r["group"].startswith("gen")}):
        for b in sorted({r["batch"] for r in rows if r["group"] == g}):
            d = {(r["who"], r["what"]): r["median_s"] for r in rows if r["group"] == g and r["batch"] == b}
            if len(d) < 4:
                continue
            ours = d[("restok", "vanilla")] / d[("restok", "HAR")]
            tgt = HAR_OVER_VANILLA.get(b)
            mark = "" if tgt is None else f" (target >= {tgt}x: {'met' if ours >= tgt else 'NOT met'})"
            out.append(
                f"\n{g} batch {b}: HAR over vanilla, official "
                f"{d[('official', 'vanilla')] / d[('official', 'HAR')]:.2f}x, restok {ours:.2f}x{mark}"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default=os.environ.get("SBS_GROUPS", "tok_tiny,gen_l"))
    ap.add_argument("--json", default=None, help="write the raw records here")
    ap.add_argument("--log", default=None, help="progress log (default: stderr)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both sides (default: side_by_side's 2); 1 on a shared machine",
    )
    ap.add_argument(
        "--compile",
        choices=get_args(CompileBackend),
        default="off",
        help="torch.compile restok's pixel CNNs (tokenizer_train.compile); the first call of each "
        "case compiles, outside the timed rounds",
    )
    args = ap.parse_args(argv)
    where = locate()
    if isinstance(where, str):
        print(where)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(args.json or Path(tmp) / "rows.json").resolve()
        env = dict(
            os.environ,
            RESTOK_OFFICIAL_TREE=str(where["tree"]),
            RESTOK_CHECKOUT=str(ROOT),
            SBS_GROUPS=args.groups,
            SBS_DIR=str(where["bench"]),
            SBS_JSON=str(out_json),
            SBS_THREADS=str(args.threads or ""),
            SBS_RESTOK_COMPILE=args.compile,
        )
        with open(args.log or os.devnull, "w") as log:
            proc = subprocess.run(
                [str(where["python"]), "-c", DRIVER], env=env, check=False, stderr=log if args.log else None
            )
        if proc.returncode:
            print(f"side-by-side failed (exit {proc.returncode}); see the progress log")
            return proc.returncode
        rows = json.loads(out_json.read_text())
    print(
        f"groups {args.groups}; {sys.platform}, fp32, threads {rows[0]['threads'] if rows else '?'}; "
        f"medians of interleaved rounds; restok pixel CNNs compiled: {args.compile}"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
