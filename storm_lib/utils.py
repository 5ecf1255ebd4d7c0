"""Small helpers shared by every module: device choice, seeding, the precision policy."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the precision policy ``precision`` on ``device`` (None: fp32).

    ``auto`` is bf16 on CUDA GPUs of compute capability 8.0 and newer (native bf16
    kernels), fp16 below it (T4, V100: bf16 convolutions would miss cuDNN), and fp32 on
    other devices (bf16 does not pay on CPUs without AMX). ``bf16``/``fp16``/``fp32``
    force a choice on any device (CPU autocast included, for tests).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fixed = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision in fixed:
        return fixed[precision]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for the notebook's first cell, e.g. ``auto -> fp16 autocast + GradScaler``."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        chosen = "fp32"
    elif dtype == torch.float16:
        chosen = "fp16 autocast + GradScaler"
    else:
        chosen = "bf16 autocast"
    where = device.type
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"precision {precision} -> {chosen} on {where}"


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
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` inside; the previous train/eval mode is
    restored afterwards (imagination and diagnostics never leave a model switched)."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        module.train(was_training)
