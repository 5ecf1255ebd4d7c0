"""End to end on the smoke profile: the CLI, and the notebook executed top to bottom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "p04_transformer_backbone.ipynb"


def run_cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "STORM_PROFILE": "smoke", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "storm_lib", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_cli_collect_train_evaluate(tmp_path):
    data = "data/boxing.npz"
    assert "wrote data/boxing.npz" in run_cli("collect", "--out", data, cwd=tmp_path)
    for kind in ("storm", "rssm"):  # to the default paths, checkpoints/<model>_<profile>.pt
        text = run_cli("train", "--model", kind, "--data", data, cwd=tmp_path)
        assert "validation loss" in text and (tmp_path / f"checkpoints/{kind}_smoke.pt").exists()
    text = run_cli(
        "evaluate",
        "--storm",
        "checkpoints/storm_smoke.pt",
        "--rssm",
        "checkpoints/rssm_smoke.pt",
        "--data",
        data,
        "--out",
        "figs",
        "--fvd",
        cwd=tmp_path,
    )
    assert "copy-last" in text and "FVD over 4 clips" in text
    assert (tmp_path / "figs" / "psnr_vs_horizon.png").exists()


def test_cli_reports_bad_input_readably(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    env = {**os.environ, "STORM_PROFILE": "smoke"}
    proc = subprocess.run(
        [sys.executable, "-m", "storm_lib", "evaluate", "--rssm", "junk.pt", "--data", "junk.npz"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_notebook_executes_on_smoke_profile(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["STORM_PROFILE"] = "smoke"  # inherited by the kernel
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()  # raises CellExecutionError on any cell error
    finally:
        os.environ.pop("STORM_PROFILE", None)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8, f"only {len(images)} figures"
    text = json.dumps([o.get("text", "") for o in outputs])
    assert "Total run time" in text
