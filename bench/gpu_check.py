"""One command that checks this project on a CUDA GPU and measures its training time.

    python bench/gpu_check.py [--device cuda] [--profile gpu] [--out PATH]
                              [--timing-steps 100] [--skip-notebook] [--skip-pytest]

It prints, and writes to one JSON file (default ``bench/results/gpu_check_<device>.json``,
rewritten after every phase, so a run cut short still leaves what it found):

1. the device: name, compute capability, memory, torch / CUDA / cuDNN versions, and
   the precision ``fit()`` chooses there (``utils.describe_precision``);
2. timing: for each model, real ``fit()`` steps on the profile's batch shape, from
   experience of the profile's size (random frames: the time does not depend on them),
   so batch sampling, the step snapshot, clipping and Adam are all included. A first
   chunk warms up (and captures the CUDA graph); then ``--timing-steps`` steps are timed
   in chunks of ``--chunk`` (``fit`` synchronises at each logged step). The median
   chunk gives ms per step, and the whole profile's minutes are its steps times that.
   On CUDA each model is timed with ``train.cuda_graphs`` on (the default) and off;
3. ``pytest -m cuda tests/test_cuda.py`` in a subprocess (``CUBLAS_WORKSPACE_CONFIG``
   set, as deterministic mode needs it before cuBLAS starts);
4. the notebook, executed on the ``smoke`` profile on this device (a copy in a temporary
   folder: the committed notebook and the repository's data are not touched).

Each phase has a time limit and the whole run stays within ``--budget-s`` (9 minutes by
default). On a CPU, ``--device cpu --profile smoke --skip-notebook`` runs the same code
in seconds (fewer timing steps by default); ``tests/test_gpu_check.py`` does that.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's storm_lib, whatever is installed

import numpy as np  # noqa: E402
import torch  # noqa: E402

from storm_lib import build_world_model, get_profile  # noqa: E402
from storm_lib.config import Config  # noqa: E402
from storm_lib.data import TrajectoryData  # noqa: E402
from storm_lib.train import fit  # noqa: E402
from storm_lib.utils import autocast_dtype, default_device, describe_precision  # noqa: E402

NOTEBOOK = ROOT / "p04_transformer_backbone.ipynb"
ACTIONS = 18  # the full Atari action set


# ------------------------------------------------------------------------ environment
def environment(device: torch.device, config: Config) -> dict[str, Any]:
    """What runs here: device, versions, and the precision ``fit`` picks."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "precision": describe_precision(config.train.precision, device),
        "autocast": str(autocast_dtype(config.train.precision, device)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(name=platform.processor() or platform.machine(), capability=None)
    return info


# ----------------------------------------------------------------------------- timing
def experience(config: Config, action_dim: int = ACTIONS) -> tuple[TrajectoryData, TrajectoryData]:
    """Random experience of the profile's size (``data.steps`` frames in episodes of
    ``data.max_episode_steps``), split as training splits it."""
    rng = np.random.default_rng(0)
    n, length, s = config.data.steps, config.data.max_episode_steps, config.data.image_size
    return TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, s, s), dtype=np.uint8),
        action=rng.integers(0, action_dim, n).astype(np.int64),
        reward=rng.choice([0.0, 1.0], n).astype(np.float32),
        cont=np.ones(n, np.float32),
        episode=(np.arange(n) // length).astype(np.int32),
        meta={"action_dim": action_dim, "env_id": "synthetic"},
    ).split(config.data.val_fraction, seed=0)


def time_fit(
    kind: str,
    config: Config,
    data: tuple[TrajectoryData, TrajectoryData],
    device: torch.device,
    *,
    steps: int,
    chunk: int,
    cuda_graphs: bool,
) -> dict[str, Any]:
    """ms per ``fit()`` step: the median over chunks of ``chunk`` steps, after one chunk
    of warm-up; and the lines ``fit`` printed (which data path, whether graphed)."""
    train_config = config.train
    train_config.eval_every = train_config.checkpoint_every = 10**9  # validation only at the end
    train_config.cuda_graphs = cuda_graphs
    torch.manual_seed(0)
    model = build_world_model(kind, config, ACTIONS, device)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        history = fit(
            model, *data, steps=chunk + steps, config=train_config, device=device,
            progress=False, log_every=chunk,
        )  # fmt: skip
    times = [r["time"] for r in history.train]
    per_chunk = [1000 * (b - a) / chunk for a, b in itertools.pairwise(times)]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ms = statistics.median(per_chunk)
    return {
        "ms_per_step": round(ms, 3),
        "chunk_ms": [round(x, 3) for x in per_chunk],
        "first_chunk_s": round(times[0], 3),
        "profile_minutes": round(config.train.steps * ms / 60_000, 2),
        "printed": [line for line in printed.getvalue().splitlines() if line.strip()],
    }


def timing(profile: str, device: torch.device, steps: int, chunk: int) -> dict[str, Any]:
    config = get_profile(profile)
    started = time.perf_counter()
    data = experience(config)
    out: dict[str, Any] = {
        "profile": profile,
        "profile_steps": config.train.steps,
        "batch": [config.train.batch_size, config.train.seq_len],
        "timed_steps": steps,
        "data_seconds": round(time.perf_counter() - started, 1),
        "models": {},
    }
    variants = (True, False) if device.type == "cuda" else (config.train.cuda_graphs,)
    for kind in ("storm", "rssm"):
        runs = {}
        for graphs in variants:
            label = "cuda_graphs" if graphs and device.type == "cuda" else "eager"
            runs[label] = time_fit(
                kind, get_profile(profile), data, device, steps=steps, chunk=chunk,
                cuda_graphs=graphs,
            )  # fmt: skip
            print(f"  {kind:<5} {label:<11} {runs[label]['ms_per_step']:9.2f} ms/step -> "
                  f"{runs[label]['profile_minutes']:7.1f} min for {config.train.steps} steps",
                  flush=True)  # fmt: skip
        default = "cuda_graphs" if "cuda_graphs" in runs and config.train.cuda_graphs else "eager"
        out["models"][kind] = {"default": default, **runs}
    out["profile_minutes"] = {
        kind: r[r["default"]]["profile_minutes"] for kind, r in out["models"].items()
    }
    out["profile_minutes"]["both"] = round(sum(out["profile_minutes"].values()), 2)
    data[0].drop_device_copies()
    return out


# ----------------------------------------------------------------------------- pytest
def run_pytest(timeout: float) -> dict[str, Any]:
    """``pytest -m cuda tests/test_cuda.py``: exit code, counts, and what failed."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", "tests/test_cuda.py"]  # fmt: skip
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-3000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"rc": None, "timed_out": True, "seconds": round(timeout), "tail": tail}
        out: dict[str, Any] = {
            "rc": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "tail": (proc.stdout + proc.stderr)[-3000:],
        }
        if report.exists():
            out.update(_junit(report))
    return out


def _junit(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, skipped = [], []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                failed.append({"test": name, "message": (node.get("message") or "")[:500]})
        node = case.find("skipped")
        if node is not None:
            skipped.append({"test": name, "reason": (node.get("message") or "")[:200]})
    return {
        "tests": len(cases),
        "passed": len(cases) - len(failed) - len(skipped),
        "failed": failed,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- notebook
def run_notebook(timeout: float) -> dict[str, Any]:
    """Execute a copy of the notebook on the smoke profile in a temporary folder."""
    env = {**os.environ, "STORM_PROFILE": "smoke",
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / NOTEBOOK.name
        shutil.copy(NOTEBOOK, copy)
        cmd = [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute",
               "--ExecutePreprocessor.timeout=-1", "--output", "executed.ipynb",
               str(copy)]  # fmt: skip
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"ran": True, "rc": None, "timed_out": True, "seconds": round(timeout)}
        out: dict[str, Any] = {
            "ran": True,
            "rc": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "tail": proc.stderr[-2000:],
        }
        executed = Path(tmp) / "executed.ipynb"
        if executed.exists():
            text = executed.read_text()
            out["mentions_cuda"] = bool(re.search(r"cuda|NVIDIA", text))
            out["errors"] = text.count('"output_type": "error"')
    return out


# ------------------------------------------------------------------------------- main
def default_out(info: dict[str, Any]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", str(info.get("name") or info["device"]).lower()).strip("_")
    return ROOT / "bench" / "results" / f"gpu_check_{slug or 'device'}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--profile", default="gpu", help="the profile timed (default gpu)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file")
    parser.add_argument(
        "--timing-steps",
        type=int,
        default=None,
        help="timed fit() steps per model (default 100 on CUDA, 4 elsewhere)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="steps per timed chunk (default 10 on CUDA, 2 elsewhere)",
    )
    parser.add_argument("--skip-notebook", action="store_true", help="CI executes it already")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run's limit")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = default_device(args.device)
    cuda = device.type == "cuda"
    chunk = args.chunk or (10 if cuda else 2)
    steps = -(-(args.timing_steps or (100 if cuda else 4)) // chunk) * chunk  # whole chunks
    config = get_profile(args.profile)
    info = environment(device, config)
    out_path = args.out or default_out(info)
    result: dict[str, Any] = {"environment": info, "args": vars(args) | {"out": str(out_path)}}

    def save(phase: str) -> None:
        result["seconds"] = round(time.monotonic() - started, 1)
        result["completed"] = [*result.get("completed", []), phase]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def left(limit: float) -> float:
        return max(1.0, min(limit, args.budget_s - (time.monotonic() - started)))

    print(f"device {info['device']} ({info['name']}, compute capability {info['capability']}), "
          f"torch {info['torch']} (CUDA {info['cuda']})", flush=True)  # fmt: skip
    print(info["precision"], flush=True)
    save("environment")

    print(f"timing {steps} fit() steps per model on the {args.profile} profile:", flush=True)
    result["timing"] = timing(args.profile, device, steps, chunk)
    minutes = result["timing"]["profile_minutes"]
    print(f"measured: {args.profile} profile training, STORM {minutes['storm']:.1f} min + RSSM "
          f"{minutes['rssm']:.1f} min = {minutes['both']:.1f} min", flush=True)  # fmt: skip
    save("timing")

    if args.skip_pytest:
        result["pytest"] = {"ran": False}
    else:
        result["pytest"] = run_pytest(left(210.0))
        p = result["pytest"]
        print(f"pytest -m cuda: rc {p['rc']}, {p.get('passed', '?')} passed, "
              f"{len(p.get('failed', []))} failed, {len(p.get('skipped', []))} skipped "
              f"({p['seconds']} s)", flush=True)  # fmt: skip
        for failure in p.get("failed", []):
            print(f"  FAILED {failure['test']}: {failure['message'][:200]}", flush=True)
    save("pytest")

    if args.skip_notebook:
        result["notebook"] = {"ran": False}
    else:
        result["notebook"] = run_notebook(left(170.0))
        nb = result["notebook"]
        print(f"notebook on the smoke profile: rc {nb['rc']} ({nb['seconds']} s)", flush=True)
    save("notebook")

    result["ok"] = (args.skip_pytest or result["pytest"].get("rc") == 0) and (
        args.skip_notebook or result["notebook"].get("rc") == 0
    )
    ok = result["ok"]
    save("done")
    print(f"{'ok' if ok else 'FAILED'}: wrote {out_path} ({result['seconds']} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
