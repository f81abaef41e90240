"""`restok sweep` over 2 tiny tokenizer checkpoints: plot + table artifacts, one child run per stage
and checkpoint under the sweep parent, each with its metrics; `restok compare` on those runs.

The default test runs the real evaluate stage (Ray eval pool: recon + sampling + gen metrics) but
stand-ins for extract_codes / train_generator (named `standin_*`: they write a random generator
export and log a child run); tests/test_sweep_checkpoints.py runs the real stages for each of
3 kept training checkpoints.
"""

import os

import pytest
from test_eval import make_workdir, tiny_cfg, write_models  # noqa: F401  (shared tiny fixtures)

from infra import paths, tracking
from infra.manifest import write_manifest
from infra.stages import stage_fingerprint

SWEEP_OVERRIDES = [
    "eval.num_samples_per_class=3",
    "eval.probe_steps=30",
    "extract.augment=none",
    "extract.num_actors=2",
    "generator_train.steps=2",
    "generator_train.global_batch_size=8",
    "generator_train.micro_batch_size=4",
    "generator_train.checkpoint_every=2",
    "generator_train.log_every=1",
    "generator_train.image_log_every=1000",
    "tracking.register_models=false",
    "cluster.num_workers=2",
]


def standin_extract_codes(cfg, run_id=None, parent_run_id=None):
    """Stand-in for jobs.extract_codes.run: no codes, just its child run and manifest."""
    with tracking.stage_run(cfg, "extract_codes", run_id, parent_run_id) as rid:
        tracking.log_metrics(paths.tracking_uri(cfg), rid, {"standin_codes_train": 0.0})
    return write_manifest(
        paths.stage_dir(cfg, "extract_codes"),
        "extract_codes",
        stage_fingerprint(cfg, "extract_codes"),
        complete=True,
        standin=True,
    )


def standin_train_generator(cfg, run_id=None, parent_run_id=None):
    """Stand-in for jobs.train_generator.run: a random (untrained) generator export + manifest."""
    from jobs.training.checkpoints import generator_config, write_export
    from models.generator import GPT

    with tracking.stage_run(cfg, "train_generator", run_id, parent_run_id) as rid:
        state = GPT(generator_config(cfg)).state_dict()
        write_export(paths.stage_dir(cfg, "train_generator"), "generator", state, state, cfg)
        tracking.log_metrics(paths.tracking_uri(cfg), rid, {"standin_loss": 0.0})
    return write_manifest(
        paths.stage_dir(cfg, "train_generator"),
        "train_generator",
        stage_fingerprint(cfg, "train_generator"),
        complete=True,
        standin=True,
    )


@pytest.mark.slow
# The real stages run in tests/test_sweep_checkpoints.py (3 kept checkpoints, real chain each).
@pytest.mark.parametrize("stages", ["standin"])
def test_sweep_two_checkpoints_plot_table_child_runs(tmp_path, ray_local, stages, capsys):
    from jobs import evaluate
    from pipeline.compare import compare_runs, format_table
    from pipeline.sweep import sweep

    cfg, _ = make_workdir(tmp_path, extra=SWEEP_OVERRIDES)
    # two "checkpoints" of the tokenizer: export dirs with different weights
    ckpts = []
    for seed in (1, 2):
        d = str(tmp_path / f"tok_step{seed}")
        write_models(cfg, seed=seed, tokenizer_dir=d)
        ckpts.append(d)
    stage_fns = (
        None
        if stages == "real"
        else {
            "extract_codes": standin_extract_codes,
            "train_generator": standin_train_generator,
            "evaluate": evaluate.run,
        }
    )
    result = sweep(cfg, ckpts, stages=stage_fns)
    assert os.path.getsize(result["plot"]) > 1000
    rows = result["rows"]
    assert [r["checkpoint"] for r in rows] == ["tok_step1", "tok_step2"]
    assert all(r["fd_probe_recon"] is not None and r["fd_probe_gen"] is not None for r in rows)
    with open(result["csv"]) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 3 and lines[0].startswith("checkpoint,path,fd_probe_recon,fd_probe_gen")
    with open(result["markdown"]) as fh:
        assert "fid" not in fh.read().replace("fd_probe", "")

    client = tracking.client_for(paths.tracking_uri(cfg))
    parent = client.get_run(result["parent_run_id"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recon_vs_gen.png", "sweep.csv", "sweep.md"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {}
    for run in children:
        by_stage.setdefault(run.data.tags["restok.stage"], []).append(run)
    assert {k: len(v) for k, v in by_stage.items()} == {
        "extract_codes": 2,
        "train_generator": 2,
        "evaluate": 2,
    }
    for run in by_stage["evaluate"]:
        assert {"fd_probe_recon", "fd_probe_gen", "probe_class_consistency", "codebook_entropy_bits"} <= set(
            run.data.metrics
        )
    for run in by_stage["train_generator"] + by_stage["extract_codes"]:
        assert run.data.metrics, run.data.tags["restok.stage"]

    # restok compare: params that differ + all metrics, side by side
    ids = [r.info.run_id for r in by_stage["evaluate"]]
    header, table = compare_runs(paths.tracking_uri(cfg), ids)
    names = [row[0] for row in table]
    assert "fd_probe_gen" in names and "params.work_dir" in names and "params.seed" not in names
    text = format_table(header, table)
    assert ids[0][:8] in text
    from argparse import Namespace

    from pipeline.compare import cli

    assert cli(Namespace(runs=ids, tracking_uri=paths.tracking_uri(cfg))) == 0
    assert "fd_probe_gen" in capsys.readouterr().out


def test_children_train_apart_and_replaced_weights_redo_the_chain(tmp_path):
    """Each child's Ray Train folder is its own under a shared cluster.storage_path (their stage
    fingerprints are equal); rerunning a chain skips finished stages, and new weights seeded at a
    checkpoint's path make every later stage of that chain run again (no Ray: counting stand-ins)."""
    import time

    from configs.loading import to_yaml
    from infra.manifest import is_complete, read_manifest
    from pipeline.sweep import child_config, run_chain, seed_work_dir

    cfg, _ = make_workdir(tmp_path, extra=[*SWEEP_OVERRIDES, f"cluster.storage_path={tmp_path / 'ray'}"])
    ckpt = str(tmp_path / "tok")
    write_models(cfg, seed=1, tokenizer_dir=ckpt)
    sweep_dir = str(tmp_path / "work" / "sweeps" / "abc")
    children = [child_config(cfg, ckpt, i, sweep_dir, {}) for i in (0, 1)]
    assert len({paths.ray_storage_path(c) for c in children} | {paths.ray_storage_path(cfg)}) == 3

    calls = []

    def standin(stage):
        def run(child, run_id=None, parent_run_id=None):
            fp = stage_fingerprint(child, stage)
            if is_complete(paths.stage_dir(child, stage), fp):
                return read_manifest(paths.stage_dir(child, stage))
            calls.append(stage)
            return write_manifest(paths.stage_dir(child, stage), stage, fp, complete=True)

        return run

    stages = {s: standin(s) for s in ("extract_codes", "train_generator", "evaluate")}
    child = children[0]
    prep_dir = paths.stage_dir(cfg, "prep")
    seed_work_dir(child, ckpt, prep_dir)
    run_chain(to_yaml(child), "", stages)
    seed_work_dir(child, ckpt, prep_dir)  # same weights: nothing is rewritten
    run_chain(to_yaml(child), "", stages)
    assert calls == ["extract_codes", "train_generator", "evaluate"]
    time.sleep(1.1)  # manifests are stamped to the second
    write_models(cfg, seed=2, tokenizer_dir=ckpt)  # other weights at the same path
    seed_work_dir(child, ckpt, prep_dir)
    run_chain(to_yaml(child), "", stages)
    assert calls == ["extract_codes", "train_generator", "evaluate"] * 2
    # A second driver of the same chain (the sweep started twice) stops at the held stage lock.
    from pipeline import locks

    with locks.stage_lock(child, "train_generator"):
        with pytest.raises(locks.LockHeld, match="stage 'train_generator' is being run by another driver"):
            run_chain(to_yaml(child), "", stages)
    assert calls == ["extract_codes", "train_generator", "evaluate"] * 2
