"""The stage graph's orchestration: order, skipping, staleness, MLflow runs, failure reporting.

Stages here are test-only stand-ins (`StandInStage`) injected through run_pipeline(stage_impls=...):
they follow the stage contract (check upstream manifests, log to the given MLflow run, write a
complete manifest) in milliseconds. The real stages run end to end in tests/test_pipeline_e2e.py.
Ray and MLflow are real (a local Ray started once for the module, a sqlite store).
"""

import os
import time

import pytest
from omegaconf import OmegaConf

from configs.loading import load_config
from infra import manifest as manifests
from infra import paths, tracking
from infra.stages import CONFIG_KEYS, OUTPUT_NEUTRAL_KEYS, STAGE_ORDER, UPSTREAM, stage_fingerprint
from pipeline.graph import (
    StageResult,
    clear_stage_dir,
    key_metrics,
    run_pipeline,
    summary_table,
)


class StandInStage:
    """Test-only stand-in for a stage module's run(cfg, run_id): contract-shaped, instant."""

    def __init__(self, stage, calls, fail=False):
        self.stage, self.calls, self.fail = stage, calls, fail

    def __call__(self, cfg, run_id=None):
        import ray

        assert ray.is_initialized(), "the graph connects Ray before a stage runs"
        self.calls.append((self.stage, run_id))
        for up in UPSTREAM[self.stage]:
            manifests.require_complete(paths.stage_dir(cfg, up), up)
        if self.fail:
            raise ValueError(f"stand-in {self.stage} exploded")
        tracking.log_metrics(paths.tracking_uri(cfg), run_id, {"loss": 0.5}, step=1)
        return manifests.write_manifest(
            paths.stage_dir(cfg, self.stage),
            self.stage,
            stage_fingerprint(cfg, self.stage),
            complete=True,
            metrics={"loss": 0.5, "count": 3},
            files=["x.bin"],
        )


def stand_ins(calls, fail=()):
    return {s: StandInStage(s, calls, fail=s in fail) for s in STAGE_ORDER}


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); one experiment per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_cfg(work, tracking_db, request, *overrides):
    return load_config(
        None,
        [
            f"work_dir={work}",
            f"tracking.tracking_uri={tracking_db}",
            f"tracking.experiment={request.node.name}",
            *overrides,
        ],
    )


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """MLflow puts a sqlite store's artifacts under ./mlruns of whoever creates the experiment."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cfg(tmp_path, ray_local, tracking_db, request):
    return make_cfg(tmp_path / "work", tracking_db, request)


def _runs(cfg):
    client = tracking.client_for(paths.tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_runs_in_order_then_skips_everything(cfg, capsys):
    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == list(STAGE_ORDER)
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}" in out and paths.work_url(cfg) in out
    assert "loss=0.5" in out

    # MLflow: one parent, one FINISHED child per stage, each stage got its child's run id.
    runs = _runs(cfg)
    parents = [r for r in runs if r.data.tags["restok.stage"] == "pipeline"]
    children = {r.data.tags["restok.stage"]: r for r in runs if r.data.tags["restok.stage"] != "pipeline"}
    assert len(parents) == 1 and set(children) == set(STAGE_ORDER)
    for stage, run_id in calls:
        child = children[stage]
        assert child.info.run_id == run_id and child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.metrics["loss"] == 0.5
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["evaluate.loss"] == 0.5

    calls.clear()
    t0 = time.perf_counter()
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert calls == [] and time.perf_counter() - t0 < 60
    out = capsys.readouterr().out
    assert out.count("skipped") >= len(STAGE_ORDER)


def test_deleting_generator_outputs_reruns_only_what_follows(cfg):
    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    clear_stage_dir(cfg, "train_generator")
    calls.clear()
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["train_generator", "evaluate"]


def test_config_change_reruns_the_changed_stage_and_downstream(cfg, tmp_path, tracking_db, request):
    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    calls.clear()
    changed = make_cfg(tmp_path / "work", tracking_db, request, "extract.augment=none")
    assert run_pipeline(changed, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["extract_codes", "train_generator", "evaluate"]


def test_upstream_rebuilt_outside_the_graph_makes_downstream_stale(cfg):
    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    time.sleep(1.1)  # manifests carry second-resolution timestamps
    StandInStage("train_tokenizer", [])(cfg, run_id=tracking.start_run(cfg, "train_tokenizer"))
    calls.clear()
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["extract_codes", "train_generator", "evaluate"]


def test_stage_selection_and_force(tmp_path, ray_local, tracking_db, request):
    cfg = make_cfg(tmp_path / "w", tracking_db, request, "stages=[prep,train_tokenizer]")
    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["prep", "train_tokenizer"]
    calls.clear()
    assert run_pipeline(cfg, force=True, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["prep", "train_tokenizer"]


def test_failure_marks_runs_failed_and_names_the_stage(cfg, capsys):
    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls, fail={"extract_codes"})) == 1
    assert [s for s, _ in calls] == ["prep", "train_tokenizer", "extract_codes"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "restok run: stage 'extract_codes' FAILED: ValueError: stand-in extract_codes exploded"
    )
    status = {r.data.tags["restok.stage"]: r.info.status for r in _runs(cfg)}
    assert status["pipeline"] == "FAILED" and status["extract_codes"] == "FAILED"
    assert status["train_tokenizer"] == "FINISHED"
    # Fixed, the next run resumes at the failed stage.
    calls.clear()
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["extract_codes", "train_generator", "evaluate"]


def test_stage_without_complete_manifest_is_a_failure(cfg, capsys):
    impls = stand_ins([])
    impls["prep"] = lambda cfg, run_id=None: {"stage": "prep"}  # forgets its manifest
    assert run_pipeline(cfg, stage_impls=impls) == 1
    assert "stage 'prep' FAILED: PipelineError" in capsys.readouterr().err


def test_deliberately_partial_stage_stops_the_graph_without_failing(cfg, capsys):
    calls = []
    impls = stand_ins(calls)

    def partial_tokenizer(cfg, run_id=None):
        calls.append(("train_tokenizer", run_id))
        return manifests.write_manifest(
            paths.stage_dir(cfg, "train_tokenizer"),
            "train_tokenizer",
            stage_fingerprint(cfg, "train_tokenizer"),
            complete=False,
            steps_done=5,
        )

    impls["train_tokenizer"] = partial_tokenizer
    assert run_pipeline(cfg, stage_impls=impls) == 0
    assert [s for s, _ in calls] == ["prep", "train_tokenizer"]
    out = capsys.readouterr().out
    assert "incomplete" in out and "steps_done=5" in out
    calls.clear()
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["train_tokenizer", "extract_codes", "train_generator", "evaluate"]


def test_key_metrics_and_table():
    assert key_metrics({"metrics": {"rfid": 1.5, "note": "x", "ok": True}}) == {"rfid": 1.5}
    assert key_metrics({"version": 1, "num_images": 10, "files": []}) == {"num_images": 10.0}
    assert list(key_metrics({"steps_done": 3, "final_metrics": {"loss": 0.1}})) == ["loss", "steps_done"]
    assert key_metrics({"splits": {"train": {"total": 20, "shards": []}}, "counts": {"train": 40}}) == {
        "train_count": 40.0,
        "train_images": 20.0,
    }
    table = summary_table(
        [StageResult("prep", "skipped", 0.2, metrics={"n": 3.0}), StageResult("evaluate", "not run")]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "status", "time", "key", "metrics"]
    assert "n=3" in lines[2] and lines[3].split()[:3] == ["evaluate", "not", "run"]


def test_a_local_ray_asks_only_its_own_state_api(ray_local):
    """Ray Train's placement-group cleaner asks the state API whether the Train controller lives; on
    a host with another Ray instance (a `ray start` cluster, another run) Ray's lookup would reach
    that one's dashboard, hear "no such actor" and remove a live run's placement group. A local
    instance's processes ask the address it advertises, where nothing answers; the driver's own
    environment is left as it was."""
    import ray
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    from infra.ray_connect import API_SERVER_ENV

    @ray.remote(num_cpus=0)
    def ask_state_api():
        from ray.util.state import get_actor
        from ray.util.state.exception import RayStateApiException

        try:
            get_actor("ab" * 16, timeout=3)
            return os.environ.get(API_SERVER_ENV), "answered"
        except RayStateApiException as exc:
            return os.environ.get(API_SERVER_ENV), type(exc).__name__

    advertised = internal_kv._internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    ).decode()
    asked, outcome = ray.get(ask_state_api.remote())
    assert asked == f"http://{advertised}" and advertised != "127.0.0.1:8265"
    assert outcome == "ServerUnavailable"
    assert API_SERVER_ENV not in os.environ


def _leaf_keys(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_config_key_is_hashed_by_a_stage_or_declared_output_neutral():
    """A key in neither table would let a changed value skip the stages and reuse stale outputs."""
    tree = OmegaConf.to_container(OmegaConf.structured(load_config(None, [])), resolve=False)
    hashed = {k for keys in CONFIG_KEYS.values() for k in keys}

    def under(leaf, keys):
        return [k for k in keys if leaf == k or leaf.startswith(k + ".")]

    for leaf in _leaf_keys(tree):
        assert under(leaf, hashed) or under(leaf, OUTPUT_NEUTRAL_KEYS), f"{leaf}: in no stage's fingerprint"
        assert not (under(leaf, hashed) and under(leaf, OUTPUT_NEUTRAL_KEYS)), f"{leaf}: in both tables"


AFTER_TOKENIZER = ["train_tokenizer", "extract_codes", "train_generator", "evaluate"]


@pytest.mark.parametrize(
    "override, changed",
    [
        ("tokenizer_train.ema_warmup=true", AFTER_TOKENIZER),  # the exported EMA weights
        ("generator_train.ema_warmup=true", ["train_generator", "evaluate"]),
        ("data.shuffle_buffer=17", AFTER_TOKENIZER),
        ("tokenizer.init_std=0.1", AFTER_TOKENIZER),
        ("cluster.num_workers=1", []),
        ("tokenizer_train.zero_stage=3", []),
    ],
)
def test_fingerprints_change_exactly_for_the_stages_a_key_affects(override, changed):
    before, after = load_config(None, []), load_config(None, [override])
    moved = [s for s in STAGE_ORDER if stage_fingerprint(before, s) != stage_fingerprint(after, s)]
    assert moved == changed


def test_a_training_stage_redone_under_a_new_fingerprint_drops_the_old_manifest_first(tmp_path, monkeypatch):
    """The export is rewritten in place: if the new fit fails, no complete manifest of the old
    config may stay beside whatever the new run left (it would be skipped as done)."""
    import contextlib

    from conftest import nano_cfg, write_tokenizer_export

    from jobs import train_tokenizer
    from jobs.training import ray_training

    old = nano_cfg(tmp_path)
    write_tokenizer_export(old)
    new = nano_cfg(tmp_path, "tokenizer_train.steps=7")
    manifests.write_manifest(
        paths.stage_dir(new, "prep"), "prep", stage_fingerprint(new, "prep"), complete=True
    )
    stage_dir = paths.stage_dir(new, "train_tokenizer")
    assert manifests.is_complete(stage_dir, stage_fingerprint(old, "train_tokenizer"))

    def failing_fit(*args, **kwargs):
        raise RuntimeError("fit failed")

    monkeypatch.setattr(ray_training, "fit", failing_fit)
    monkeypatch.setattr(tracking, "stage_run", lambda *a, **k: contextlib.nullcontext("run-id"))
    with pytest.raises(RuntimeError, match="fit failed"):
        train_tokenizer.run(new)
    assert manifests.read_manifest(stage_dir) is None


def test_compare_finds_a_run_named_with_a_quote_in_the_store_the_environment_names(
    tracking_db, monkeypatch, capsys
):
    """`restok compare` reads MLFLOW_TRACKING_URI (RUNBOOK section 4) and finds runs by name, also
    a name with a quote (MLflow's filter strings have no escape)."""
    import argparse

    from pipeline import compare

    client = tracking.client_for(tracking_db)
    experiment = client.create_experiment("compare-quote")
    for name in ("it's", "plain"):
        run = client.create_run(experiment, run_name=name)
        client.log_metric(run.info.run_id, "psnr", 17.0)
        client.set_terminated(run.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
    assert compare.cli(argparse.Namespace(runs=["it's", "plain"], tracking_uri="")) == 0
    out = capsys.readouterr().out
    assert "it's" in out and "plain" in out and "psnr" in out


def test_overrides_may_follow_a_flag():
    from pipeline.cli import parse

    args = parse(["run", "default", "--force", "seed=1"])
    assert args.force and args.items == ["default", "seed=1"]
    with pytest.raises(SystemExit):
        parse(["run", "default", "--force", "--nope"])


def test_a_captured_error_is_one_line_on_the_terminal(monkeypatch, capsys):
    """A Ray Train failure's message carries the worker's traceback: the terminal gets its first
    line and the log's path, the log keeps the rest."""
    from pipeline import cli

    def failing_run(args):
        exc = RuntimeError("worker failed\nTraceback (most recent call last):\n  File x\nValueError: y")
        exc.restok_log = "/w/logs/run.log"
        raise exc

    monkeypatch.setattr(cli, "cmd_run", failing_run)
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["restok run: RuntimeError: worker failed (full log: /w/logs/run.log)"]


def test_unfinished_training_does_not_resume_checkpoints_of_a_rebuilt_input(tmp_path, monkeypatch):
    """A killed train_generator, then the codes rebuilt under the same config (a retrained
    tokenizer): its checkpoints were trained on the old codes, so the graph clears the stage and a
    stage run alone drops them; unchanged inputs keep them."""
    import contextlib
    import dataclasses

    from conftest import nano_cfg

    from infra import storage
    from jobs import train_generator
    from jobs.training import ray_training
    from jobs.training.stage import run_training_stage
    from pipeline.graph import resume_reason

    cfg = nano_cfg(tmp_path, "generator.num_classes=4")
    codes_dir = paths.stage_dir(cfg, "extract_codes")

    def codes(sha):
        shards = [{"name": "train-000000.tar", "sha256": sha, "count": 8, "split": "train"}]
        fp = stage_fingerprint(cfg, "extract_codes")
        return manifests.write_manifest(codes_dir, "extract_codes", fp, complete=True, shards=shards)

    ray_training.record_inputs(cfg, "train_generator", codes("a" * 64))
    kept = storage.join(ray_training.experiment_url(cfg, "train_generator"), "checkpoint_00000008")
    storage.makedirs(kept)
    assert resume_reason(cfg, "train_generator") == ""
    codes("b" * 64)  # re-extracted with other tokenizer weights, same config
    assert resume_reason(cfg, "train_generator") == (
        "input 'extract_codes' was rebuilt since its checkpoints were written"
    )

    def failing_fit(*args, **kwargs):
        raise RuntimeError("fit failed")

    monkeypatch.setattr(ray_training, "fit", failing_fit)
    monkeypatch.setattr(tracking, "stage_run", lambda *a, **k: contextlib.nullcontext("run-id"))
    spec = dataclasses.replace(train_generator.SPEC, check_inputs=None)  # the codes here are stand-ins
    with pytest.raises(RuntimeError, match="fit failed"):
        run_training_stage(spec, cfg)
    assert not storage.exists(kept)  # dropped before the fit
    assert resume_reason(cfg, "train_generator") == ""  # recorded for the new codes


def test_graph_clears_an_unfinished_training_stage_whose_input_was_rebuilt(cfg, capsys):
    """A killed train_generator (no manifest) left checkpoints of codes since rebuilt under the
    same config: the graph clears the stage, checkpoints and MLflow record included, instead of
    letting it resume them."""
    from infra import storage
    from jobs.training import ray_training

    calls = []
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    codes = manifests.read_manifest(paths.stage_dir(cfg, "extract_codes"))
    ray_training.record_inputs(cfg, "train_generator", {**codes, "shards": [{"sha256": "old"}]})
    kept = storage.join(ray_training.experiment_url(cfg, "train_generator"), "checkpoint_00000008")
    storage.makedirs(kept)
    manifests.remove_manifest(paths.stage_dir(cfg, "train_generator"))  # killed mid-run
    calls.clear()
    assert run_pipeline(cfg, stage_impls=stand_ins(calls)) == 0
    assert [s for s, _ in calls] == ["train_generator", "evaluate"]
    assert not storage.exists(kept)
    assert (
        "train_generator: input 'extract_codes' was rebuilt since its checkpoints" in capsys.readouterr().out
    )


def test_a_method_version_moves_the_stage_and_every_later_fingerprint(monkeypatch):
    """Outputs of older code under the same config are not reused (infra.stages.METHOD_VERSION)."""
    from infra import stages

    cfg = load_config(None, [])
    before = {s: stage_fingerprint(cfg, s) for s in STAGE_ORDER}
    monkeypatch.setitem(stages.METHOD_VERSION, "extract_codes", stages.METHOD_VERSION["extract_codes"] + 1)
    moved = [s for s in STAGE_ORDER if stage_fingerprint(cfg, s) != before[s]]
    assert moved == ["extract_codes", "train_generator", "evaluate"]
