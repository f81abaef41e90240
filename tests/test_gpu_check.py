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
