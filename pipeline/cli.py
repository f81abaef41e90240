"""The `restok` command line.

Every command takes an optional preset name (configs/presets/*.yaml or a YAML path) followed by
`key=value` overrides, e.g. `restok run imagenet256-restok-l cluster.address=auto`.
Subcommands are thin: they resolve the config and call into pipeline/ jobs/ data_prep/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from configs.loading import (
    ConfigError,
    list_presets,
    load_config,
    split_preset_and_overrides,
    to_yaml,
)
from data_prep.sources import SourceError
from infra import console
from infra.manifest import ManifestError
from infra.paths import input_manifest
from jobs.training.ray_training import StageFailure
from pipeline import locks
from pipeline.compare import RunNotFound
from pipeline.convert import ConvertError
from pipeline.graph import STAGE_MODULES as GRAPH_STAGE_MODULES
from pipeline.graph import PipelineError, preflight, selected_stages
from pipeline.locks import LockHeld
from pipeline.submit import SubmitError

# The graph's stages plus `sample`, which `restok sample` runs alone.
STAGE_MODULES = {**GRAPH_STAGE_MODULES, "sample": "jobs.sample"}


def resolve(items: Sequence[str]) -> Any:
    preset, overrides = split_preset_and_overrides(items)
    return load_config(preset, overrides)


def _call(module: str, func: str, *args: Any, **kwargs: Any) -> Any:
    mod = importlib.import_module(module)
    return getattr(mod, func)(*args, **kwargs)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "list":
        print("\n".join(list_presets()))
        return 0
    cfg = resolve(args.items)
    print(to_yaml(cfg), end="")
    return 0


@contextlib.contextmanager
def captured(args: argparse.Namespace, cfg: Any) -> Iterator[None]:
    """Full output to <work_dir>/logs/ (the terminal gets lines, bars and the summary), unless
    --verbose. A Ray the command started is shut down inside the capture: its log monitor prints
    the workers' last lines (and Ray's own chatter) when it stops, and they belong in the log."""
    verbose = getattr(args, "verbose", False)
    log = (
        contextlib.nullcontext()
        if verbose
        else console.log_to_file(console.log_path(str(cfg.work_dir), args.command))
    )
    with log:
        try:
            yield
        finally:
            ray = sys.modules.get("ray")  # never imported here: most commands do not start Ray
            if ray is not None and ray.is_initialized():
                ray.shutdown()


# `restok eval ACTION` reads these stages' outputs (checked before anything starts).
EVAL_INPUTS = {
    "recon": ["prep", "train_tokenizer"],
    "gen": ["train_tokenizer", "train_generator"],
    "cfg-search": ["train_tokenizer", "train_generator"],
    "make-ref": [],
    "score": [],
    "all": ["prep", "train_tokenizer", "train_generator"],
}


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:

        cfg = resolve(args.items)
        if stage in GRAPH_STAGE_MODULES:
            preflight(cfg, [stage])
        with captured(args, cfg):
            console.say(f"restok {args.command}: preset {cfg.preset} | work dir {cfg.work_dir}")
            print(f"# resolved config\n{to_yaml(cfg)}", flush=True)
            # One driver per stage, as under `restok run` (pipeline.locks).
            with locks.stage_lock(cfg, stage) if stage in GRAPH_STAGE_MODULES else contextlib.nullcontext():
                _call(STAGE_MODULES[stage], "run", cfg)
            console.say(f"{stage}: done")
        return 0

    return run


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resolve(args.items)
    if args.verbose:
        print(to_yaml(cfg), end="")

    preflight(cfg, selected_stages(cfg))
    with captured(args, cfg):
        return _call("pipeline.graph", "run_pipeline", cfg, force=args.force) or 0


def cmd_eval(args: argparse.Namespace) -> int:

    if args.action == "score":  # restok eval score REF.npz SAMPLES.npz [preset] [key=value ...]
        import os

        files, items = args.items[:2], args.items[2:]
        if len(files) != 2:
            raise SystemExit("usage: restok eval score REF.npz SAMPLES.npz [preset] [key=value ...]")
        files = [f if "://" in f else os.path.abspath(f) for f in files]  # against the cwd, as config paths
        cfg = resolve(items)
        with captured(args, cfg):
            return _call("jobs.evaluate", "cli", "score", cfg, files) or 0
    cfg = resolve(args.items)
    for up in EVAL_INPUTS[args.action]:
        input_manifest(cfg, up)
    with captured(args, cfg):
        # Every action but score writes under the evaluate stage dir: one driver at a time there,
        # as under `restok run` (pipeline.locks).
        with locks.stage_lock(cfg, "evaluate"):
            return _call("jobs.evaluate", "cli", args.action, cfg) or 0


def cmd_convert(args: argparse.Namespace) -> int:
    return _call("pipeline.convert", "cli", args) or 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = resolve(args.items)
    with captured(args, cfg):
        return _call("pipeline.sweep", "run_sweep", cfg, args.checkpoints, args.steps) or 0


def cmd_export(args: argparse.Namespace) -> int:
    # The config is needed only for a checkpoint without its own config.yaml (older runs).
    cfg = resolve(args.items) if args.items else None
    if args.list:
        stage, kept, searched = _call("jobs.training.checkpoints", "kept_checkpoints", args.source, cfg)
        print(f"{stage}: kept checkpoints at steps {sorted(kept)} (searched {searched})")
        return 0
    out = _call(
        "jobs.training.checkpoints", "export_checkpoint", args.source, args.checkpoint, args.out or None, cfg
    )
    print(f"export: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    return _call("pipeline.compare", "cli", args) or 0


def cmd_submit(args: argparse.Namespace) -> int:
    return _call("pipeline.submit", "cli", args) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="restok", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    items_help = "[PRESET] [key=value ...]"

    verbose_help = "everything on the terminal (the resolved config, Ray and worker output)"
    s = sub.add_parser("run", help="run every stage end to end (skips finished stages)")
    s.add_argument("items", nargs="*", help=items_help)
    s.add_argument("--force", action="store_true", help="rerun every stage")
    s.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("config", help="show the resolved config or list presets")
    s.add_argument("action", choices=["show", "list"])
    s.add_argument("items", nargs="*", help=items_help)
    s.set_defaults(func=cmd_config)

    for stage in ("prep", "train_tokenizer", "extract_codes", "train_generator", "sample"):
        s = sub.add_parser(stage.replace("_", "-"), help=f"run the {stage} stage alone")
        s.add_argument("items", nargs="*", help=items_help)
        s.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
        s.set_defaults(func=_stage_command(stage))

    s = sub.add_parser(
        "eval",
        help="evaluation: recon | gen | all | make-ref | cfg-search | "
        "score REF.npz SAMPLES.npz (ADM's evaluator)",
    )
    s.add_argument("action", choices=["recon", "gen", "all", "make-ref", "cfg-search", "score"])
    s.add_argument("items", nargs="*", help=items_help)
    s.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("convert", help="convert the authors' released checkpoints")
    s.add_argument("what", choices=["official-tokenizer", "official-generator", "verify"])
    s.add_argument("src", nargs="?", help="release checkpoint file (or fixture dir for verify)")
    s.add_argument("dst", nargs="?", help="output directory")
    s.add_argument("--vanilla", action="store_true", help="vanilla AR generator instead of HAR")
    s.add_argument("--from-hub", metavar="REPO_ID", help="download the release files first")
    s.add_argument("--config", help="release tokenizer config (YAML or JSON) when not ResTok-L")
    s.add_argument(
        "--levels",
        help="generator level list, e.g. 1,1,2,4,8,16 (default: from the "
        "checkpoint's special table, else ResTok-L's)",
    )
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("sweep", help="recon-vs-gen sweep over tokenizer checkpoints")
    s.add_argument("items", nargs="*", help=items_help)
    s.add_argument(
        "--checkpoints",
        nargs="+",
        default=[],
        help="train_tokenizer stage dirs (their kept Ray Train checkpoints), checkpoint "
        "dirs or export dirs (default: this config's train_tokenizer stage dir)",
    )
    s.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[],
        help="only these steps of a stage dir's kept checkpoints (default: all kept)",
    )
    s.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser(
        "export",
        help="export a kept training checkpoint (any ZeRO stage, EMA "
        "as the EMA) to the format later stages and sweeps load",
    )
    s.add_argument(
        "source", help="training stage dir (e.g. WORK/train_tokenizer) or a Ray Train checkpoint dir"
    )
    s.add_argument(
        "items",
        nargs="*",
        help="[PRESET] [key=value ...] that trained it (only for checkpoints without their own config.yaml)",
    )
    s.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="the step to export (default: the newest kept)",
    )
    s.add_argument("--out", default="", help="output dir (default: SOURCE/exports/step_<STEP>)")
    s.add_argument("--list", action="store_true", help="list the kept checkpoints' steps")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("compare", help="side-by-side table of MLflow runs")
    s.add_argument("runs", nargs="+")
    s.add_argument("--tracking-uri", default="")
    s.set_defaults(func=cmd_compare)

    for action in ("submit", "status", "logs", "stop"):
        s = sub.add_parser(action, help=f"Ray Jobs: {action}")
        if action == "submit":
            s.add_argument("items", nargs="*", help=items_help)
            s.add_argument("--stage", default="", help="submit one stage alone")
            s.add_argument("--no-wait", action="store_true")
            s.add_argument(
                "--runtime-pip",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="install pyproject's pinned requirements in the job's runtime env "
                "(default: on, off for a loopback cluster that already has them)",
            )
            s.add_argument(
                "--python",
                default="",
                help="python on the cluster for the job's driver (default: python; "
                "this interpreter for a loopback cluster)",
            )
        else:
            s.add_argument("job_id")
        s.add_argument("--address", default="", help="Ray dashboard, e.g. http://HEAD:8265")
        s.set_defaults(func=cmd_submit, action=action)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: one line, no traceback."""
    return (
        ConfigError,
        SourceError,
        ManifestError,
        StageFailure,
        PipelineError,
        ConvertError,
        SubmitError,
        RunNotFound,
        LockHeld,
        FileNotFoundError,
        PermissionError,
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but `key=value` items may also follow a flag (`restok run default --force
    seed=1`): argparse's `nargs="*"` stops at the flag, and parse_intermixed_args does not take
    subcommands."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "items") and all("=" in x and not x.startswith("-") for x in extra):
        args.items = [*args.items, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"restok: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log = getattr(exc, "restok_log", None)
        where = f" (full log: {log})" if log else ""
        if isinstance(exc, _user_errors()):
            print(f"restok {args.command}: {console.one_line(exc)}{where}", file=sys.stderr)
            return 2
        if log is None:
            raise  # output was not captured: the traceback is the log
        print(f"restok {args.command}: {console.one_line(exc)}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
