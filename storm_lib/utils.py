"""Small helpers shared by every module: device choice, seeding, the precision policy."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where this PyTorch has none
            (instead of PyTorch's ``AssertionError`` deep inside the first transfer).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}, cuda {torch.version.cuda}); use cpu"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s)")
    return chosen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) in one place."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# CPU flags (Linux /proc/cpuinfo) that mean bf16 matmuls and convolutions run natively in
# oneDNN: AVX-512 BF16 (Cooper Lake, Zen 4 and newer) and AMX (Sapphire Rapids and newer).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_value(keys: tuple[str, ...], cpuinfo: str | Path) -> str | None:
    """The first value of one of ``keys`` in a Linux ``/proc/cpuinfo``; None without one."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as the kernel lists them; empty where there is no such file
    (macOS, Windows), which the precision policy reads as "no native bf16"."""
    return set((_cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (e.g. ``AMD EPYC 9R14``), or what ``platform`` knows elsewhere."""
    import platform

    return _cpuinfo_value(("model name",), cpuinfo) or platform.processor() or platform.machine()


def cpu_bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the reason in words.

    Without native support PyTorch emulates bf16 by converting to fp32 around every
    kernel, which is slower than fp32 itself; with it, bf16 autocast makes a training
    step of the ``cpu`` profile about 1.5x cheaper (``bench/bench_precision.py``).
    """
    flags = cpu_flags(cpuinfo)
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    if not flags:
        return False, "no CPU flags to read (not Linux): bf16 is not known to be native here"
    return False, f"this CPU has none of {', '.join(NATIVE_BF16_FLAGS)}: bf16 would be emulated"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the precision policy ``precision`` on ``device`` (None: fp32).

    ``auto`` is bf16 on CUDA GPUs of compute capability 8.0 and newer (native bf16
    kernels) and fp16 below it (T4, V100: bf16 convolutions would miss cuDNN). On a CPU
    it is bf16 where the CPU has native bf16 (:func:`cpu_bf16_support`), since the
    side-by-side check of ``docs/precision.md`` showed that both world models train as
    well under it as in fp32 at equal steps, and fp32 elsewhere (other devices too).
    ``bf16``/``fp16``/``fp32`` force a choice on any device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fixed = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision in fixed:
        return fixed[precision]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_support()[0] else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for the notebook's first cell: the choice and why, e.g.
    ``precision auto -> bf16 autocast on cpu (this CPU has avx512_bf16; ...)``."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        chosen = "fp32"
    elif dtype == torch.float16:
        chosen = "fp16 autocast + GradScaler"
    else:
        chosen = "bf16 autocast"
    where, why = device.type, "asked for" if precision != "auto" else ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        if precision == "auto":
            why = "native bf16" if major >= 8 else "no fast bf16 below compute capability 8.0"
    elif device.type == "cpu" and precision == "auto":
        native, why = cpu_bf16_support()
        if native:
            why += "; bf16 trains as well as fp32 at equal steps (docs/precision.md)"
    return f"precision {precision} -> {chosen} on {where}" + (f" ({why})" if why else "")


CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` of deterministic mode: cuBLAS then uses fixed workspaces,
which ``torch.use_deterministic_algorithms`` requires of CUDA matmuls (CUDA >= 10.2)."""


def model_device(model: Any, default: torch.device | str | None = None) -> torch.device:
    """Where ``model`` computes, asked in this order: its ``device`` attribute (an
    :class:`~storm_lib.outside.OutsideModel`, or any wrapper that has no parameters of its
    own, such as a ``DreamerAdapter`` around a student's CUDA net), its first parameter,
    its first buffer; else ``default`` (CPU when None).

    Guessing from parameters alone sends CPU windows to a student's GPU model whose
    wrapper holds none (issue 26, fault 1).
    """
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    for attr in ("parameters", "buffers"):
        tensors = getattr(model, attr, None)
        if callable(tensors):
            first = next(iter(tensors()), None)
            if isinstance(first, torch.Tensor):
                return first.device
    return torch.device("cpu" if default is None else default)


def configure_device(device: torch.device | str | None = None, deterministic: bool = False) -> str:
    """Set the global kernel switches for ``device`` once, at start-up; return one line
    saying what was set (the CLI prints it; the notebook's first cell prints it too).

    On CUDA: TF32 matmuls and convolutions on compute capability 8.0 and newer (Ampere+;
    fp32 matmuls then round their inputs to 10 mantissa bits, which training does not
    notice), and cuDNN autotuning (``cudnn.benchmark``: our shapes are fixed, so the
    first-call search pays back). With ``deterministic``: autotuning off (it picks
    algorithms per process), ``torch.use_deterministic_algorithms(True)`` (no atomics in
    backward kernels; an op without a deterministic kernel raises instead of running)
    and ``CUBLAS_WORKSPACE_CONFIG`` set to :data:`CUBLAS_WORKSPACE`, which must happen
    before CUDA starts: when CUDA was already started in this process the line says so.
    On a CPU there is nothing to set (its kernels are deterministic at a fixed thread
    count); the line gives the thread count.

    Idempotent: calling it again with the same arguments changes nothing, so ``fit()``
    calls it too. The switches are set to what is asked (``deterministic=False`` turns
    deterministic algorithms off again).
    """
    device = default_device(device)
    torch.use_deterministic_algorithms(deterministic)
    if device.type != "cuda":
        what = f"{device.type}: nothing to set; {torch.get_num_threads()} threads"
        return what + ("; deterministic algorithms on" if deterministic else "")
    notes = []
    if deterministic:
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
            late = torch.cuda.is_initialized()
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
            notes.append(
                f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} set after CUDA started: export it "
                "before starting Python for matmuls to be deterministic"
                if late
                else f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}"
            )
        else:
            notes.append(f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}")
    major, minor = torch.cuda.get_device_capability(device)
    tf32 = major >= 8
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    name = f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    parts = [
        "TF32 matmuls and convolutions on" if tf32 else "TF32 off (needs compute capability 8.0)",
        "deterministic: cuDNN autotuning off, deterministic algorithms on"
        if deterministic
        else "cuDNN autotuning on",
        *notes,
    ]
    return f"{name}: " + "; ".join(parts)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for ``None`` (fp32)."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


@contextlib.contextmanager
def private_rng(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside the block the global RNGs are seeded with ``seed`` (None: left as they are);
    afterwards every one of them is restored, so measuring never changes the random draws
    of what follows.

    ``torch.manual_seed`` reseeds the CPU *and every CUDA device*, so the fork covers the
    CPU, every CUDA device already started in this process, and ``device`` when it is a
    GPU (which starts it): forking only the CPU, or only the model's device, would leave
    the caller's CUDA RNG overwritten, e.g. when a wrapper without parameters made its
    device look like the CPU.
    """
    cuda: set[int] = set()
    if torch.cuda.is_initialized():
        cuda.update(range(torch.cuda.device_count()))
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        cuda.add(torch.cuda.current_device() if index is None else index)
    with torch.random.fork_rng(devices=sorted(cuda)):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def evaluating(
    model: nn.Module | Any, seed: int | None = None, device: torch.device | None = None
) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` inside, with :func:`private_rng` when
    ``seed`` is given. The train/eval mode is restored afterwards (imagination, validation
    and diagnostics never leave a model switched). ``model`` may lack ``eval``/``train``
    (an outside model): it then gets the rest."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            if seed is None:
                yield
            else:
                with private_rng(seed, device):
                    yield
    finally:
        if was_training:
            model.train()


def synchronize(device: torch.device) -> None:
    """Wait for the queued GPU work on ``device`` (nothing to wait for elsewhere): a clock
    read without it measures only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device | str | None = None,
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup``
    untimed calls (allocations, cuDNN autotuning, lazy initialisation).

    GPU work is asynchronous: a timer around a call measures only the launches. On CUDA
    (``device``, default CUDA when available) the device is synchronised before the clock
    starts and before it stops, so each time is that of the work itself. Every timing the
    CLI, the benchmarks and the notebook print goes through here.

    Example (the notebook's KV-cache cell)::

        ms = median_ms(lambda: storm.imagine(*args, mode="mode"), device, repeats=3)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = default_device(device) if device is None else torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
