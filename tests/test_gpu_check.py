"""``bench/gpu_check.py`` on a CPU: the same code path as on a GPU, in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
         "--profile", "smoke", "--skip-notebook", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["completed"] == [
        "environment", "timing", "pytest", "notebook", "done"
    ]  # fmt: skip
    env = result["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["precision"].startswith("precision")
    timing = result["timing"]
    assert timing["profile"] == "smoke" and timing["timed_steps"] == 4
    for kind in ("storm", "rssm"):
        run = timing["models"][kind][timing["models"][kind]["default"]]
        assert run["ms_per_step"] > 0 and len(run["chunk_ms"]) == 2
        minutes = timing["profile_steps"] * run["ms_per_step"] / 60_000
        assert abs(run["profile_minutes"] - minutes) < 0.01
    assert timing["profile_minutes"]["both"] > 0
    pytest_run = result["pytest"]  # the CUDA tests, all skipped here
    assert pytest_run["rc"] == 0 and pytest_run["tests"] > 10 and not pytest_run["failed"]
    assert len(pytest_run["skipped"]) == pytest_run["tests"]
    assert all("CUDA" in s["reason"] for s in pytest_run["skipped"])
    assert result["notebook"] == {"ran": False}
    assert "measured: smoke profile training" in proc.stdout
