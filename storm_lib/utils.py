"""Small helpers shared by every module: device choice, seeding, the precision policy."""

from __future__ import annotations

import contextlib
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


def configure_device(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on Ampere and newer; our shapes are fixed, so the
    autotuner's first-call search pays back. Global switches, set when training starts."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for ``None`` (fp32)."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


@contextlib.contextmanager
def private_rng(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Inside the block the global RNG (CPU, and ``device`` when it is a GPU) is seeded
    with ``seed`` (None: left as it is); afterwards it is restored, so measuring never
    changes the random draws of what follows."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
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


def median_ms(
    fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1
) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls after ``warmup``
    calls, with CUDA synchronised around each call (GPU work is asynchronous)."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
