"""bench/gpu_check.py waits for a GPU machine; its CPU dry run keeps every part working until then."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_part_without_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}, report["errors"]
    parts = report["parts"]
    assert {"env", "sampling", "official", "tokenizer", "generator", "recipe"} <= set(parts)
    assert parts["env"]["dry_run"] is True
    assert parts["sampling"]["rows"], parts["sampling"]
    assert parts["tokenizer"]["rows"] and all(r["step_s"] > 0 for r in parts["tokenizer"]["rows"])
    assert parts["generator"]["tokens_per_s"] > 0
    assert (tmp_path / "gpu_check.md").read_text().strip()


def test_a_failing_row_is_recorded_and_nothing_starts_after_the_deadline(tmp_path, monkeypatch):
    """One device run is all there is: an error in a row stays in that row, the other rows and
    parts still run, and past --deadline-s nothing new starts (the JSON is still written)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_check

    c = gpu_check.Ctx(gpu_check.argparse.Namespace(dry_run=True, deadline_s=60))
    rows = []
    gpu_check._row(c, rows, {"batch": 1}, lambda: 1 / 0)
    gpu_check._row(c, rows, {"batch": 2}, lambda: {"step_s": 0.5})
    assert rows[0]["batch"] == 1 and rows[0]["error"].startswith("ZeroDivisionError")
    assert rows[1] == {"batch": 2, "step_s": 0.5}
    c.deadline = 0.0
    gpu_check._row(c, rows, {"batch": 3}, lambda: {"step_s": 0.5})
    assert rows[2] == {"batch": 3, "skipped": "deadline"}

    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--deadline-s", "0"]) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert set(parts) == set(gpu_check.PARTS) and all(p == {"skipped": "deadline"} for p in parts.values())
