"""One results file per run: every number of Section 4 and 5 in versioned JSON.

``python -m storm_lib evaluate ... --json PATH`` and the notebook (``results/<profile>.json``)
write it; :func:`load` reads it back for another notebook (P05's dashboard) or for
``python -m storm_lib compare-results``. The layout is :data:`SCHEMA` (a JSON-Schema
subset, checked by :func:`validate` without extra packages) and is described field by
field in ``docs/results_schema.md``. Top level::

    {"format": "storm_lib-results/1", "run": {...}, "protocol": {...},
     "models": {name: {...}}, "baselines": {name: stats}, "twin_futures": {...} | null,
     "step_time_vs_length": {...} | null, "fvd": {...} | null, "notes": [str]}

A ``stats`` entry is :meth:`storm_lib.evaluate.StepStats.to_dict`: ``mean`` and 95%
``half_width`` per step (``null`` where a half-width is undefined, n < 2) and ``n``.
Numbers are plain JSON (no NaN): a value that was not measured is ``null``.

Writing follows the library's file rules: atomic (temp file + rename), a file that is not
a results file of ours (told by its ``format``) is never overwritten, and one of ours only
with ``overwrite=True`` (CLI ``--force``; the notebook replaces its own).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_write, file_sha256
from .results_schema import FORMAT, FORMAT_NAME, MODES, SCHEMA, VERSION, ResultsError, validate

if TYPE_CHECKING:
    import torch

    from .atari import TwinFutures
    from .config import Config
    from .diagnostics import TokenStatistics
    from .evaluate import ActionSensitivity, RolloutPSNR
    from .train import History


def _format_of(raw: Any) -> str | None:
    return raw.get("format") if isinstance(raw, dict) else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


MAX_BYTES = 64 << 20
"""Larger files are not results files (ours are tens of kB); they are not even read."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    if path.stat().st_size > MAX_BYTES:
        raise ResultsError(f"{path}: over {MAX_BYTES >> 20} MiB, not a results file")
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(f"{path}: not a JSON results file ({exc})") from None


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file.

    Returns:
        The document, as plain dicts and lists (see :data:`SCHEMA`).

    Raises:
        ResultsError: no such file, not JSON, not a storm_lib results file, a format
            version this storm_lib does not read (a newer one says so), or an entry that
            breaks the schema (each named).
    """
    path = Path(path)
    raw = _read_json(path)
    found = _format_of(raw)
    name, _, version = found.partition("/") if isinstance(found, str) else ("", "", "")
    if name != FORMAT_NAME:
        raise ResultsError(
            f"{path}: not a storm_lib results file (its format is {found!r}, expected {FORMAT!r})"
        )
    if version != str(VERSION):
        newer = version.isdigit() and int(version) > VERSION
        why = "a newer storm_lib wrote it; update storm_lib" if newer else "unknown version"
        raise ResultsError(
            f"{path}: results format {found!r}, but this storm_lib reads {FORMAT!r} ({why})"
        )
    validate(raw, str(path))
    return raw


def is_own_results(path: str | Path) -> bool:
    """True when ``path`` is a JSON file whose ``format`` says a storm_lib results file
    (any version): one this library wrote and may replace when asked."""
    try:
        found = _format_of(_read_json(Path(path)))
    except ResultsError:
        return False
    return isinstance(found, str) and found.startswith(f"{FORMAT_NAME}/")


def check_target(path: str | Path, *, overwrite: bool = False) -> None:
    """Whether :func:`write` may write ``path``: it is new, or one of our results files
    and ``overwrite`` asks to replace it. Cheap; call it before a long evaluation.

    Raises:
        ResultsError: ``path`` is a folder, a file that is not ours (never overwritten),
            or ours without ``overwrite``; nothing is changed.
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsError(f"{path}: is a folder; give a file name such as results/run.json")
    if not path.exists():
        return
    if not is_own_results(path):
        raise ResultsError(
            f"{path}: exists and is not a storm_lib results file, so it is never "
            "overwritten: choose another path for the results"
        )
    if not overwrite:
        raise ResultsError(
            f"{path}: already holds storm_lib results; it was left as it is. Choose another "
            "path, or replace it with --force (CLI) / overwrite=True"
        )


def write(path: str | Path, doc: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Validate ``doc`` and write it to ``path`` atomically (parent folders are created).

    Raises:
        ResultsError: ``doc`` is not valid (nothing is written) or ``path`` may not be
            written (:func:`check_target`).
        OSError: the write failed (a full disk says so); the old file stays as it was.
    """
    validate(doc)
    check_target(path, overwrite=overwrite)
    text = json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def psnr_summary(doc: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """One mode of a results document in :meth:`storm_lib.evaluate.RolloutPSNR.to_dict`
    form: :func:`storm_lib.evaluate.psnr_table` prints the same table from it as the run
    printed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    protocol, models = doc["protocol"], doc["models"]
    return {
        "context": protocol["context"],
        "horizon": protocol["horizon"],
        "seed": protocol["seed"],
        "mode": mode,
        "models": {name: m["psnr"][mode] for name, m in models.items()},
        "ceilings": {n: m["ceiling"][mode] for n, m in models.items() if m["ceiling"][mode]},
        "baselines": dict(doc["baselines"]),
        "entropy": {
            name: m["posterior_entropy"][mode]
            for name, m in models.items()
            if m["posterior_entropy"][mode] is not None
        },
        "mode_ignored": [name for name, m in models.items() if m.get("takes_mode") is False],
    }


# ------------------------------------------------------------------------ building
def plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: tuples become lists, NumPy numbers and arrays
    Python ones, paths strings, NaN and infinity ``None`` (not measured)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy arrays and scalars, 0-d tensors
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit of the checkout storm_lib runs from, and whether it has uncommitted
    changes; both None when storm_lib is not in a git checkout (e.g. installed)."""
    top = _git("rev-parse", "--show-toplevel")
    ours = Path(__file__).resolve().parent / "__init__.py"
    if not top or (Path(top) / "storm_lib" / "__init__.py").resolve() != ours:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def run_record(
    *,
    label: str | None = None,
    command: str = "notebook",
    config: Config | None = None,
    device: torch.device | str | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """The ``run`` entry: what ran where, with which versions, when and for how long.

    Args:
        label: the run's name in comparisons (default ``"<profile> (<device name>)"``).
        command: what wrote the file, ``"notebook"`` or ``"evaluate"``.
        config: the profile used (its ``to_dict()`` is stored).
        device: where it ran (default: CUDA if available).
        started: ``time.perf_counter()`` when the run began (the notebook's
            ``NOTEBOOK_START``); gives the date and the duration. Default: now.
    """
    import torch

    from .utils import autocast_dtype, cpu_name, default_device, describe_precision

    device = default_device(device)
    elapsed = 0.0 if started is None else time.perf_counter() - started
    began = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=elapsed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    precision = None
    if config is not None:
        dtype = autocast_dtype(config.train.precision, device)
        precision = {
            "training": config.train.precision,
            "training_autocast": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"),
            "evaluation": "fp32",  # evaluation never autocasts
            "description": describe_precision(config.train.precision, device),
        }
    profile = None if config is None else config.name
    return {
        "label": label or f"{profile or 'run'} ({name or device.type})",
        "command": command,
        "profile": profile,
        "config": None if config is None else plain(config.to_dict()),
        "device": str(device),
        "device_name": name or None,
        "precision": precision,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{
                key: _version(pkg)
                for key, pkg in (
                    ("numpy", "numpy"),
                    ("gymnasium", "gymnasium"),
                    ("ale_py", "ale-py"),
                    ("storm_lib", "storm_lib"),
                )
            },
        },
        "git": git_state(),
        "date": began.isoformat(timespec="seconds"),
        "duration_s": None if started is None else elapsed,
    }


def checkpoint_record(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A checkpoint's identity (path, SHA-256, kind, step of total, profile) and the
    training data it records (``None`` when it records none). A file in another format
    (a bare P03 state dict, a student's weights) has only its path and SHA-256."""
    from .checkpoint import CheckpointError, read_checkpoint

    path = Path(path)
    identity = {"path": str(path), "sha256": file_sha256(path), "kind": None, "step": None,
                "total_steps": None, "profile": None}  # fmt: skip
    try:
        payload = read_checkpoint(path, "cpu")
    except CheckpointError:
        return identity, None
    identity.update(
        kind=payload["model"], step=payload["step"], total_steps=payload["total_steps"],
        profile=payload["config"].name,
    )  # fmt: skip
    return identity, plain(payload.get("data"))


def _validation_curves(history: History | None) -> dict[str, Any] | None:
    """``History.val`` column by column: ``step``, ``time`` and each metric (None where a
    record lacks it)."""
    if history is None or not history.val:
        return None
    names = [
        k for k in dict.fromkeys(k for r in history.val for k in r) if k not in ("step", "time")
    ]
    return {
        "step": [int(r["step"]) for r in history.val],
        "time": [float(r["time"]) for r in history.val],
        "metrics": {name: [r.get(name) for r in history.val] for name in names},
    }


def _model_entry(
    name: str,
    results: Mapping[str, RolloutPSNR],
    *,
    history: History | None,
    sensitivity: ActionSensitivity | None,
    fvd: float | None,
    clip_count: int | None,
    checkpoint: str | Path | None,
    tokens: TokenStatistics | None = None,
) -> dict[str, Any]:
    from .report import gap_decomposition, gap_numbers, ms_per_training_step

    identity, data = checkpoint_record(checkpoint) if checkpoint else (None, None)
    gap = gap_numbers(results, name)
    return {
        "kind": identity["kind"] if identity else None,
        "psnr": {m: results[m].models[name].to_dict() for m in MODES},
        "ceiling": {
            m: results[m].ceilings[name].to_dict() if name in results[m].ceilings else None
            for m in MODES
        },
        "posterior_entropy": {m: results[m].entropy.get(name) for m in MODES},
        "takes_mode": name not in results["mode"].mode_ignored,
        "gap_decomposition": None
        if gap is None
        else {**gap, "text": gap_decomposition(results, name)},
        "action_sensitivity": None if sensitivity is None else sensitivity.to_dict(),
        "fvd": fvd,
        "clip_count": clip_count,
        "validation": _validation_curves(history),
        "train_ms_per_step": ms_per_training_step(history),
        "checkpoint": identity,
        "training_data": data,
        "tokens": None if tokens is None else tokens.to_dict(),
    }


def _protocol(results: Mapping[str, RolloutPSNR]) -> dict[str, Any]:
    """The shared protocol of both modes; ValueError when they were not scored alike."""
    missing = [m for m in MODES if m not in results]
    if missing:
        raise ValueError(f"results need both modes {MODES}; missing {missing}")
    first, second = (results[m] for m in MODES)
    same = (first.context, first.horizon, first.seed, list(first.models)) == (
        second.context, second.horizon, second.seed, list(second.models)
    )  # fmt: skip
    if not same or plain(first.to_dict()["baselines"]) != plain(second.to_dict()["baselines"]):
        raise ValueError("the two modes were not scored on the same windows and models")
    return {"context": first.context, "horizon": first.horizon, "count": first.copy_last.n,
            "seed": first.seed, "modes": list(MODES)}  # fmt: skip


def build_results(
    results: Mapping[str, RolloutPSNR],
    *,
    histories: Mapping[str, History] | None = None,
    sensitivity: Mapping[str, ActionSensitivity] | None = None,
    fvd: Mapping[str, Any] | None = None,
    clip_counts: Mapping[str, int] | None = None,
    tokens: Mapping[str, TokenStatistics] | None = None,
    twins: TwinFutures | None = None,
    timings: Mapping[str, Mapping[str, Any]] | None = None,
    sequence_timings: Mapping[str, Mapping[str, Any]] | None = None,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    config: Config | None = None,
    device: torch.device | str | None = None,
    started: float | None = None,
    label: str | None = None,
    command: str = "notebook",
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """A results document (:data:`SCHEMA`) from the objects a run already has.

    Args:
        results: ``{"mode": RolloutPSNR, "sample": RolloutPSNR}`` of the same windows.
        histories: ``{name: History}`` of training (validation curves, ms per step).
        sensitivity: ``{name: ActionSensitivity}``.
        fvd: what :func:`storm_lib.fvd.fvd_for_models` returned.
        clip_counts: ``{name: pixel values outside [0, 1]}`` for outside models, where known.
        tokens: ``{name: diagnostics.token_statistics(...)}`` (token churn, predictability).
        twins: :func:`storm_lib.atari.twin_futures`'s result.
        timings, sequence_timings: ``{name: step_time_vs_length(...)}`` of the whole step
            and of the sequence model alone.
        checkpoints: ``{name: path}`` of each model's weights (identity, training data).
        config, device, started, label, command: the ``run`` entry (:func:`run_record`).
        notes: sentences to keep with the numbers (e.g. why FVD is missing).

    Any of the optional inputs may be None: its entries are then ``null``.

    Raises:
        ValueError: the two modes were scored on different windows or models.
    """
    protocol = _protocol(results)
    first = results[MODES[0]]
    histories, sensitivity = histories or {}, sensitivity or {}
    scores = (fvd or {}).get("fvd", {})
    models = {
        name: _model_entry(
            name,
            results,
            history=histories.get(name),
            sensitivity=sensitivity.get(name),
            fvd=scores.get(name),
            clip_count=(clip_counts or {}).get(name),
            checkpoint=(checkpoints or {}).get(name),
            tokens=(tokens or {}).get(name),
        )
        for name in first.models
    }
    twin_entry = None
    if twins is not None:
        from .evaluate import StepStats

        twin_entry = {"psnr": StepStats.from_values(twins.psnr).to_dict(),
                      "copy_last": StepStats.from_values(twins.copy_last).to_dict(),
                      "identical": twins.identical, "cap": twins.cap}  # fmt: skip
    steps = None
    if timings or sequence_timings:
        steps = {"model": timings or None, "sequence": sequence_timings or None}
    doc = {
        "format": FORMAT,
        "run": run_record(
            label=label, command=command, config=config, device=device, started=started
        ),
        "protocol": protocol,
        "models": models,
        "baselines": first.to_dict()["baselines"],
        "twin_futures": twin_entry,
        "step_time_vs_length": steps,
        "fvd": None if not fvd else {k: fvd[k] for k in ("clips", "frames", "seconds")},
        "notes": list(notes),
    }
    return plain(doc)


def save_run_results(
    path: str | Path, results: Mapping[str, RolloutPSNR], *, overwrite: bool = False, **parts: Any
) -> dict[str, Any]:
    """:func:`build_results` then :func:`write` to ``path``, and say so; the notebook's one
    call. ``parts`` are :func:`build_results`'s keyword arguments.

    Returns:
        The document written.
    """
    check_target(path, overwrite=overwrite)
    doc = build_results(results, **parts)
    write(path, doc, overwrite=overwrite)
    print(
        f"wrote {path}: {', '.join(doc['models'])} ({FORMAT}; read it with storm_lib.results.load)"
    )
    return doc


__all__ = [
    "FORMAT",
    "SCHEMA",
    "ResultsError",
    "build_results",
    "check_target",
    "load",
    "psnr_summary",
    "save_run_results",
    "validate",
    "write",
]
