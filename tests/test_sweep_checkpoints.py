"""`restok sweep` over the checkpoints training keeps: a tiny tokenizer trained on real Ray Train +
DeepSpeed (ZeRO-2, 2 gloo workers) checkpoints every 2 of 8 steps and keeps 3; the sweep is given
the train_tokenizer stage directory, exports each kept checkpoint (EMA as the EMA) and runs the real
extract_codes -> train_generator -> evaluate chain for each (tiny schedules), with the plot and
table in MLflow. `restok export` of a missing step is one line naming the steps there."""

import json
import os
import pathlib
import time

import pytest
import torch
from conftest import ema_parts_match
from safetensors.torch import load_file
from test_eval import tiny_cfg, write_prep

from infra import paths, tracking
from infra.manifest import read_manifest
from jobs import train_tokenizer
from jobs.training import checkpoints

TRAIN = [
    "tokenizer_train.steps=8",
    "tokenizer_train.global_batch_size=8",
    "tokenizer_train.micro_batch_size=4",
    "tokenizer_train.checkpoint_every=2",
    "tokenizer_train.keep_checkpoints=3",
    "tokenizer_train.zero_stage=2",
    "tokenizer_train.ema_decay=0.5",
    "tokenizer_train.log_every=1",
    "tokenizer_train.image_log_every=0",
    "tokenizer_train.optim.lr=3e-3",
    "tokenizer_train.optim.warmup_steps=1",
    "data.loader_workers=0",
    "cluster.peak_tflops_per_worker=1",
]
CHAIN = [
    "eval.num_samples_per_class=2",
    "eval.probe_steps=20",
    "extract.augment=none",
    "extract.num_actors=1",
    "eval.num_actors=1",
    "generator_train.steps=1",
    "generator_train.global_batch_size=4",
    "generator_train.micro_batch_size=2",
    "generator_train.checkpoint_every=1",
    "generator_train.log_every=1",
    "generator_train.image_log_every=0",
    "tracking.register_models=false",
]
KEPT = [4, 6, 8]  # checkpoints at 2, 4, 6, 8; Ray Train keeps the newest 3


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("sweepckpt") / "work", [*TRAIN, *CHAIN])
    write_prep(cfg)
    run_id = tracking.start_run(cfg, "train_tokenizer")
    assert train_tokenizer.run(cfg, run_id=run_id)["complete"]
    return cfg, paths.stage_dir(cfg, "train_tokenizer")


@pytest.mark.slow
def test_kept_checkpoints_export_as_ema_and_missing_step_is_one_line(trained, capsys):
    from pipeline.cli import main

    cfg, stage_dir = trained
    stage, kept, _ = checkpoints.kept_checkpoints(stage_dir)
    assert stage == "train_tokenizer" and sorted(kept) == KEPT
    # Under the Ray Train storage path, not in the stage dir.
    assert all(k.startswith(paths.ray_storage_path(cfg) + "/") for k in kept.values())

    assert main(["export", stage_dir, "--checkpoint", "4"]) == 0
    out = os.path.join(stage_dir, "exports", "step_0000004")
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"export: {out}"
    # ZeRO-2: each rank holds the EMA of the fp32 master ranges its optimizer owns; the export's
    # EMA file puts them together, and is not the raw weights.
    ema, raw = (
        load_file(os.path.join(out, f)) for f in ("tokenizer_ema.safetensors", "tokenizer.safetensors")
    )
    trainable = [k for k, p in checkpoints.load_tokenizer(out).named_parameters() if p.requires_grad]
    assert ema_parts_match(kept[4], ema) == sum(ema[k].numel() for k in trainable)
    assert any(not torch.equal(ema[k], raw[k]) for k in trainable)  # decay 0.5: EMA != raw
    assert checkpoints.load_tokenizer(out).levels == list(cfg.tokenizer.levels)
    # A checkpoint on remote storage (fsspec memory:// here) exports the same weights.
    import fsspec
    from safetensors.torch import load as load_bytes

    mem = fsspec.filesystem("memory")
    mem.put(kept[4] + "/", "/sweepckpt/ckpt4/", recursive=True)
    remote = checkpoints.export_checkpoint("memory:///sweepckpt/ckpt4", out="memory:///sweepckpt/export4")
    remote_ema = load_bytes(mem.cat(remote.split("://", 1)[1] + "/tokenizer_ema.safetensors"))
    assert remote_ema.keys() == ema.keys() and all(torch.equal(remote_ema[k], ema[k]) for k in ema)
    # Reused while the checkpoint is the same; redone when a retrain rewrote that step's checkpoint.
    exported_at = read_manifest(out)["written_at"]
    assert (
        checkpoints.export_checkpoint(stage_dir, 4) == out and read_manifest(out)["written_at"] == exported_at
    )
    marker = os.path.join(kept[4], "COMPLETE.json")
    with open(marker) as fh:
        rewritten = {**json.load(fh), "written_at": time.time()}
    with open(marker, "w") as fh:
        json.dump(rewritten, fh)
    time.sleep(1.1)  # manifests are stamped to the second
    assert (
        checkpoints.export_checkpoint(stage_dir, 4) == out and read_manifest(out)["written_at"] != exported_at
    )
    # The newest kept checkpoint is what the stage exported at its end.
    last = checkpoints.export_checkpoint(stage_dir, 8)
    for f in ("tokenizer_ema.safetensors", "tokenizer.safetensors"):
        a, b = load_file(os.path.join(last, f)), load_file(os.path.join(stage_dir, f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f

    # A step Ray Train did not keep: one line naming the stage dir and the steps there.
    capsys.readouterr()
    assert main(["export", stage_dir, "--checkpoint", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and stage_dir in err and "step 2" in err and str(KEPT) in err, err


@pytest.mark.slow
def test_sweep_stage_dir_runs_real_chain_per_kept_checkpoint(trained):
    from pipeline.sweep import resolve_checkpoints, sweep

    cfg, stage_dir = trained
    with pytest.raises(FileNotFoundError, match=r"step 3; available steps: \[4, 6, 8\]"):
        resolve_checkpoints(cfg, [stage_dir], steps=[3, 4])
    assert resolve_checkpoints(cfg, [stage_dir], steps=[6]) == [
        os.path.join(stage_dir, "exports", "step_0000006")
    ]

    # The chains' generator training on one Ray Train worker (cluster.* is not in any fingerprint).
    sweep_cfg = tiny_cfg(pathlib.Path(cfg.work_dir), [*TRAIN, *CHAIN, "cluster.num_workers=1"])
    result = sweep(sweep_cfg)  # no --checkpoints: this config's train_tokenizer stage dir, all kept
    rows = result["rows"]
    assert [r["step"] for r in rows] == KEPT
    assert [r["checkpoint"] for r in rows] == [f"step {s}" for s in KEPT]
    assert len({r["path"] for r in rows}) == 3
    assert all(r["fd_probe_recon"] is not None and r["fd_probe_gen"] is not None for r in rows)
    _, kept, _ = checkpoints.kept_checkpoints(stage_dir)
    for r in rows:  # each row is the export of its own kept checkpoint
        manifest = read_manifest(r["path"])
        assert manifest["steps_done"] == r["step"] and manifest["source_checkpoint"] == kept[r["step"]]

    client = tracking.client_for(paths.tracking_uri(cfg))
    parent = result["parent_run_id"]
    assert {"recon_vs_gen.png", "sweep.csv", "sweep.md"} <= {a.path for a in client.list_artifacts(parent)}
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    stages = sorted(run.data.tags["restok.stage"] for run in children)
    assert stages == sorted(["extract_codes", "train_generator", "evaluate"] * 3)
    assert all(run.data.metrics for run in children)
    assert len(client.get_metric_history(parent, "fd_probe_gen")) == 3


def test_kept_checkpoints_found_from_stage_dir_manifest_or_config(tmp_path):
    """Finding a stage's checkpoints without running anything (fake layout, files only): under
    cluster.storage_path from the stage's config.yaml, by the manifest's fingerprint; incomplete
    checkpoints (a rank's state missing) and other runs' directories are not listed."""
    import json

    from configs.loading import to_yaml
    from infra.manifest import write_manifest
    from infra.stages import stage_fingerprint

    cfg = tiny_cfg(tmp_path / "work", [f"cluster.storage_path={tmp_path / 'elsewhere'}"])
    storage_root = pathlib.Path(paths.ray_storage_path(cfg))
    assert storage_root.parent == tmp_path / "elsewhere" and storage_root.name.startswith("work-")
    # another work dir sharing the storage path (same config, same fingerprints) has its own folder
    other = tiny_cfg(tmp_path / "other" / "work", [f"cluster.storage_path={tmp_path / 'elsewhere'}"])
    assert paths.ray_storage_path(other) != str(storage_root)
    fp = stage_fingerprint(cfg, "train_tokenizer")

    def fake(run, name, step, ranks=(0, 1), **meta):
        d = storage_root / run / name
        d.mkdir(parents=True)
        meta = {"step": step, "world": 2, "stage": "train_tokenizer", **meta}
        (d / "meta.json").write_text(json.dumps(meta))
        for r in ranks:
            (d / f"rank{r}.pt").write_bytes(b"")
        return str(d)

    a = fake(f"train_tokenizer-{fp}", "checkpoint_2026-01-01_00-00-01", 10)
    fake(f"train_tokenizer-{fp}", "checkpoint_2026-01-01_00-00-02", 20, ranks=(0,))  # rank 1 unfinished
    b = fake(f"train_tokenizer-{fp}", "checkpoint_2026-01-01_00-00-03", 30)
    fake("train_tokenizer-0123456789abcdef", "checkpoint_2026-01-01_00-00-04", 40)  # another config
    # written by a loop that writes the completeness marker, which is not there yet: in flight
    fake(f"train_tokenizer-{fp}", "checkpoint_2026-01-01_00-00-05", 50, ema_layout="fragments")
    stage_dir = tmp_path / "work" / "train_tokenizer"
    stage_dir.mkdir(parents=True)
    (stage_dir / "config.yaml").write_text(to_yaml(cfg))
    write_manifest(str(stage_dir), "train_tokenizer", fp, complete=False, steps_done=30)
    stage, kept, _ = checkpoints.kept_checkpoints(str(stage_dir))
    assert stage == "train_tokenizer" and kept == {10: a, 30: b}
    with pytest.raises(FileNotFoundError, match=r"step 20; available steps: \[10, 30\]"):
        checkpoints.find_checkpoint(str(stage_dir), 20)
    # Without config.yaml or manifest the config given names the run (a killed first run).
    (stage_dir / "config.yaml").unlink()
    (stage_dir / "manifest.json").unlink()
    assert checkpoints.kept_checkpoints(str(stage_dir), cfg)[1] == {10: a, 30: b}
