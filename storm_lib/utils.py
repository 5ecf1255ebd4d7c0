"""Small helpers shared by every module: device choice, seeding, autocast."""

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


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; a no-op elsewhere (bf16 did not pay on CPU here)."""
    if device.type == "cuda":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
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
