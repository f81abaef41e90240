"""The README's commands, executed (litgpt style).

The quick start's first command is `python3 -m venv .venv && . .venv/bin/activate && pip install -e
".[test]" && restok run`. CI (.ci/run) performs the venv + install steps and then runs exactly the
README's test command; this test checks that, checks the package is installed from this tree, and
runs the command's `restok run` for real with overrides appended: a temporary `work_dir` and
shorter schedules (the full default run is tests/test_pipeline_e2e.py, opt-in). It then runs it
again (everything skipped, in well under a minute). Which stages rerun after a stage's outputs are
deleted or its config changes is the stage graph's, tested in tests/test_pipeline_graph.py.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Appended to the README's `restok run`: schedule keys only (issue 18), so the run is the README's
# command otherwise exactly: the default preset, its relative work dir, from a scratch directory.
SHORT_RUN = [
    "tokenizer_train.steps=24",
    "tokenizer_train.checkpoint_every=12",
    "tokenizer_train.image_log_every=12",
    "generator_train.steps=24",
    "generator_train.checkpoint_every=12",
    "generator_train.image_log_every=12",
    "eval.num_samples_per_class=2",
    "eval.probe_steps=20",
]
SCHEDULE_KEYS = ("steps", "checkpoint_every", "image_log_every", "num_samples_per_class", "probe_steps")
# What a person must never see on the terminal: Ray's internals, warnings, worker prefixes.
NOISE = re.compile(
    r"PlacementGroupCleaner|PreemptionWatcher|WARNING|Warning:|\(pid=|\(RayTrainWorker|"
    r"Traceback|INFO |ray\._private|DeprecationWarning",
    re.I,
)


def fenced_blocks(text, lang="bash"):
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def quick_start_commands():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install_run, test = fenced_blocks(section)[:2]
    return install_run, test


def test_quick_start_has_the_two_commands():
    install_run, test = quick_start_commands()
    assert (
        install_run
        == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && restok run'
    )
    assert test == "python -m pytest -q"


def test_ci_runs_exactly_the_readme_test_command():
    install_run, test = quick_start_commands()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci  # the whole line, unchanged
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    install = install_run.split(" && ")[2]  # pip install -e ".[test]"
    assert any(line.endswith(install.replace("pip install", "install -q", 1)) for line in ci), install


def test_package_is_installed_from_this_tree_with_its_command():
    dist = importlib.metadata.distribution("restok")
    assert any(ep.name == "restok" and ep.value == "pipeline.cli:main" for ep in dist.entry_points)
    import pipeline

    assert Path(pipeline.__file__).resolve().parent == ROOT / "pipeline"


def _summary(stdout):
    """{stage: status} from the summary table `restok run` prints last."""
    table = stdout.rsplit("== restok run:", 1)[1]
    rows = {}
    for line in table.splitlines():
        parts = line.split()
        if parts and parts[0] in ("prep", "train_tokenizer", "extract_codes", "train_generator", "evaluate"):
            rows[parts[0]] = parts[1]
    return rows


def _restok_run(cwd, *extra):
    """The README's `restok run` (the console script next to this interpreter), run in `cwd`."""
    restok = shutil.which("restok", path=os.path.dirname(sys.executable)) or "restok"
    install_run, _ = quick_start_commands()
    command = install_run.split(" && ")[-1].split()  # ["restok", "run"]
    argv = [restok, *command[1:], *SHORT_RUN, *extra]
    t0 = time.perf_counter()
    done = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return done.stdout, done.stderr, time.perf_counter() - t0


def test_short_run_appends_schedule_keys_only():
    assert all(item.split("=")[0].rsplit(".", 1)[1] in SCHEDULE_KEYS for item in SHORT_RUN)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_restok_run_from_a_scratch_dir_then_rerun_skips(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    work = scratch / "restok_work"  # the default preset's relative work_dir, under the cwd
    out, err, _ = _restok_run(scratch)
    assert set(_summary(out).values()) == {"ran"}, out[-3000:]
    # A person's terminal: under 60 lines, none of them Ray's or a warning, the summary last.
    lines = (out + err).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    assert not [line for line in lines if NOISE.search(line)], "\n".join(lines)
    assert out.rstrip().splitlines()[-1].startswith("look at it:   mlflow ui --backend-store-uri")
    assert f"mlflow ui --backend-store-uri sqlite:///{work}/mlflow.db" in out
    logs = list((work / "logs").glob("run-*.log"))
    assert len(logs) == 1 and f"full log: {logs[0]}" in out
    assert "RayTrainWorker" in logs[0].read_text()  # the full story is in the log file
    assert (work / "config.yaml").exists()
    for stage in ("prep", "train_tokenizer", "extract_codes", "train_generator", "evaluate"):
        assert json.loads((work / stage / "manifest.json").read_text())["complete"] is True

    out, _, seconds = _restok_run(scratch)
    assert set(_summary(out).values()) == {"skipped"} and seconds < 60, (seconds, out[-3000:])
