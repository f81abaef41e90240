"""`restok sweep` over 2 tiny tokenizer checkpoints with the real stages (extract_codes on Ray
actors, train_generator on Ray Train + DeepSpeed, evaluate on the eval pool): plot + table
artifacts, one child run per stage and checkpoint under the sweep parent, each with its metrics.
Also `restok compare` on those runs."""
import os

import pytest

from pipeline import paths, tracking

from test_eval import make_workdir, write_models, tiny_cfg  # noqa: F401  (shared tiny fixtures)

SWEEP_OVERRIDES = [
    "eval.num_samples_per_class=3", "eval.probe_steps=30", "extract.augment=none", "extract.num_actors=2",
    "generator_train.steps=2", "generator_train.global_batch_size=8", "generator_train.micro_batch_size=4",
    "generator_train.checkpoint_every=2", "generator_train.log_every=1", "generator_train.image_log_every=1000",
    "tracking.register_models=false", "cluster.num_workers=2",
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from jobs.evaluate import close_pool

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    close_pool()
    ray.shutdown()


@pytest.mark.slow
def test_sweep_two_checkpoints_plot_table_child_runs(tmp_path, ray_local, capsys):
    from pipeline.compare import compare_runs, format_table
    from pipeline.sweep import sweep

    cfg, _ = make_workdir(tmp_path, extra=SWEEP_OVERRIDES)
    # two "checkpoints" of the tokenizer: export dirs with different weights
    ckpts = []
    for seed in (1, 2):
        d = str(tmp_path / f"tok_step{seed}")
        write_models(cfg, seed=seed, tokenizer_dir=d)
        ckpts.append(d)
    result = sweep(cfg, ckpts)
    assert os.path.getsize(result["plot"]) > 1000
    rows = result["rows"]
    assert [r["checkpoint"] for r in rows] == ["tok_step1", "tok_step2"]
    assert all(r["fd_probe_recon"] is not None and r["fd_probe_gen"] is not None for r in rows)
    with open(result["csv"]) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 3 and lines[0].startswith("checkpoint,path,fd_probe_recon,fd_probe_gen")
    assert "fid" not in open(result["markdown"]).read().replace("fd_probe", "")

    client = tracking.client_for(paths.tracking_uri(cfg))
    parent = client.get_run(result["parent_run_id"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recon_vs_gen.png", "sweep.csv", "sweep.md"} <= artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {}
    for run in children:
        by_stage.setdefault(run.data.tags["restok.stage"], []).append(run)
    assert {k: len(v) for k, v in by_stage.items()} == {"extract_codes": 2, "train_generator": 2, "evaluate": 2}
    for run in by_stage["evaluate"]:
        assert {"fd_probe_recon", "fd_probe_gen", "probe_class_consistency", "codebook_entropy_bits"} <= set(run.data.metrics)
    for run in by_stage["train_generator"] + by_stage["extract_codes"]:
        assert run.data.metrics, run.data.tags["restok.stage"]

    # restok compare: params that differ + all metrics, side by side
    ids = [r.info.run_id for r in by_stage["evaluate"]]
    header, table = compare_runs(paths.tracking_uri(cfg), ids)
    names = [row[0] for row in table]
    assert "fd_probe_gen" in names and "params.work_dir" in names and "params.seed" not in names
    text = format_table(header, table)
    assert ids[0][:8] in text
