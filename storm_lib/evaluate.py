"""Evaluation: PSNR and the rollout protocol of Section 4 (diagnostics: ``diagnostics.py``).

Protocol (DESIGN.md, "Evaluation protocol"): the same fixed held-out windows of
``C + H`` steps for every model; each model sees the ``C`` real context frames and
actions, imagines ``H`` frames open-loop with the real future actions, and every
imagined frame is scored against the real one with PSNR (MAX = 1 on [0, 1] frames).
Next to each model: its own reconstruction ceiling (encode -> decode of the true future
frames; the whole window is reconstructed, with its actions for a model whose
``reconstruct`` takes them, such as the RSSM, and steps C+1..C+H are scored) and the
copy-last-frame baseline (the last context frame repeated).

Intervals are 95% normal-approximation half-widths over windows,
``1.96 * std / sqrt(n)`` (sample std, ``ddof=1``); windows are treated as independent
although several may come from the same episode, so the intervals are optimistic.

Glossary: B batch, T time, C context, H horizon, S image side.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .types import Batch, ImagineMode, WorldModel

Z95 = 1.96
"""Two-sided 95% quantile of the standard normal (interval half-width factor)."""


class WindowSource(Protocol):
    """What :class:`storm_lib.data.TrajectoryData` offers to evaluation."""

    action_dim: int

    def eval_windows(self, count: int, length: int, seed: int) -> Batch: ...


Data = WindowSource | Batch


def psnr(pred: Tensor, target: Tensor, max_value: float = 1.0, cap: float = 100.0) -> Tensor:
    """Peak signal-to-noise ratio per frame, ``10 log10(MAX^2 / MSE)``, in dB.

    Computed in float64. A frame identical to its target (MSE = 0) scores exactly
    ``cap`` instead of ``inf``; every value is clipped to at most ``cap``.

    Args:
        pred: predicted frames.
        target: true frames, same shape.
        max_value: MAX, the largest pixel value (1 for [0, 1] frames).
        cap: the score of a perfect frame.

    Returns:
        PSNR per frame, float64.

    Shapes:
        pred, target: ``[..., 3, S, S]``; returns ``[...]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() < 3:
        raise ValueError(f"psnr: expected [..., 3, S, S] frames, got {tuple(pred.shape)}")
    mse = (pred.double() - target.double()).square().mean(dim=(-3, -2, -1))
    return (10.0 * torch.log10(max_value**2 / mse)).clamp(max=cap)


@dataclass
class StepStats:
    """Scores of ``n`` windows at each of ``H`` steps, with mean and 95% half-width."""

    values: np.ndarray
    """``[n, H]`` PSNR (dB) of every window at every step."""

    @classmethod
    def from_values(cls, values: np.ndarray) -> StepStats:
        """Wrap a ``[n, H]`` array."""
        return cls(values=np.asarray(values, dtype=np.float64).reshape(len(values), -1))

    @property
    def n(self) -> int:
        """Number of windows."""
        return int(self.values.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """``[H]`` mean over windows."""
        return self.values.mean(axis=0)

    @property
    def half_width(self) -> np.ndarray:
        """``[H]`` 95% half-width ``1.96 * std / sqrt(n)``; NaN when n < 2."""
        if self.n < 2:
            return np.full(self.values.shape[1], np.nan)
        return Z95 * self.values.std(axis=0, ddof=1) / math.sqrt(self.n)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists: ``mean``, ``half_width`` per step, and ``n``."""
        return {"mean": self.mean.tolist(), "half_width": self.half_width.tolist(), "n": self.n}


@dataclass
class RolloutPSNR:
    """Result of :func:`rollout_psnr`: PSNR per imagined step for models and baselines."""

    models: dict[str, StepStats]
    ceilings: dict[str, StepStats]
    """Per model: PSNR of encode -> decode of the true future frames (same windows)."""
    copy_last: StepStats
    """The last context frame repeated, scored against each future frame."""
    context: int
    horizon: int
    seed: int
    mode: str

    @property
    def steps(self) -> np.ndarray:
        """``[H]`` the step numbers 1..H."""
        return np.arange(1, self.horizon + 1)

    def rows(self) -> dict[str, StepStats]:
        """Every scored row in table order: models, ceilings, copy-last."""
        out = dict(self.models)
        out.update({f"{name} ceiling": s for name, s in self.ceilings.items()})
        out["copy-last"] = self.copy_last
        return out

    def table(self, steps: Sequence[int] = (1, 3, 5, 10)) -> str:
        """Fixed-width text table of ``mean ± 95% half-width`` (dB) at ``steps``."""
        shown = [k for k in steps if 1 <= k <= self.horizon]
        rows = self.rows()
        width = max(len(name) for name in rows) + 2
        head = "".join(f"{'step ' + str(k):>16}" for k in shown)
        lines = [
            f"PSNR in dB, mean ± 95% half-width over {self.copy_last.n} windows "
            f"(context {self.context}, mode {self.mode!r})",
            f"{'':<{width}}{head}",
        ]
        for name, s in rows.items():
            cells = "".join(f"{s.mean[k - 1]:>9.2f} ± {s.half_width[k - 1]:<4.2f}" for k in shown)
            lines.append(f"{name:<{width}}{cells}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists and numbers), e.g. for JSON."""
        return {
            "context": self.context,
            "horizon": self.horizon,
            "seed": self.seed,
            "mode": self.mode,
            "models": {k: v.to_dict() for k, v in self.models.items()},
            "ceilings": {k: v.to_dict() for k, v in self.ceilings.items()},
            "copy_last": self.copy_last.to_dict(),
        }


def _windows(data: Data, length: int, count: int, seed: int) -> Batch:
    """``count`` held-out windows of ``length`` steps; a given Batch is used whole, cut."""
    if isinstance(data, Batch):
        if data.obs.shape[1] < length:
            raise ValueError(f"windows have {data.obs.shape[1]} steps, need {length}")
        t = slice(0, length)
        return Batch(data.obs[:, t], data.action[:, t], data.reward[:, t], data.cont[:, t])
    return data.eval_windows(count, length, seed)


def _model_device(model: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _check_model(
    name: str, model: WorldModel, *, steps: int, action_dim: int | None, windows: Batch
) -> None:
    """ValueError if ``steps`` exceed the model's max_length or the action counts differ."""
    max_length = getattr(model, "max_length", None)
    if max_length is not None and steps > max_length:
        raise ValueError(
            f"model {name!r}: needs {steps} time steps but its max_length is {max_length}; "
            "shorten context/horizon or build it with a longer transformer.max_length"
        )
    if action_dim is not None and action_dim != model.action_dim:
        raise ValueError(
            f"model {name!r} has {model.action_dim} actions but the data has {action_dim}"
        )
    if len(windows) and int(windows.action.max()) >= model.action_dim:
        raise ValueError(
            f"model {name!r} has {model.action_dim} actions but the windows contain "
            f"action {int(windows.action.max())}"
        )


@contextlib.contextmanager
def _evaluating(model: Any, seed: int, device: torch.device) -> Iterator[None]:
    """Eval mode and a private RNG seeded with ``seed``; restores both afterwards."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            if was_training:
                model.train()


def _reconstruct(model: WorldModel, obs: Tensor, action: Tensor) -> Tensor:
    """``model.reconstruct`` clamped to [0, 1], given the actions if it takes them (RSSM)."""
    if "action" in inspect.signature(model.reconstruct).parameters:
        return model.reconstruct(obs, action=action).clamp(0.0, 1.0)  # type: ignore[call-arg]
    return model.reconstruct(obs).clamp(0.0, 1.0)


def _imagine(model: WorldModel, chunk: Batch, context: int, horizon: int, mode: str) -> Tensor:
    """``[b, H, 3, S, S]`` open-loop predictions of frames C+1..C+H, clamped to [0, 1]."""
    out = model.imagine(
        chunk.obs[:, :context],
        chunk.action[:, :context],
        chunk.action[:, context : context + horizon - 1],
        mode=mode,
    ).obs
    want = chunk.obs[:, context : context + horizon].shape
    if out.shape != want:
        raise ValueError(f"imagine returned {tuple(out.shape)}, expected {tuple(want)}")
    return out.clamp(0.0, 1.0)


def rollout_psnr(
    models: Mapping[str, WorldModel],
    data: Data,
    *,
    context: int = 8,
    horizon: int = 10,
    count: int = 256,
    seed: int = 1234,
    batch_size: int = 64,
    mode: ImagineMode = "sample",
    device: torch.device | str | None = None,
    progress: bool = True,
    cap: float = 100.0,
) -> RolloutPSNR:
    """PSNR per imagined step, for every model on the same fixed held-out windows.

    Each model runs in eval mode under ``torch.inference_mode()`` with the global RNG
    reseeded to ``seed`` (in a forked RNG state, so the caller's state is untouched):
    the sampling noise is reproducible and the same for every model. Predictions are
    clamped to [0, 1] before scoring (decoders are unbounded).

    Args:
        models: name -> world model.
        data: a ``TrajectoryData`` (its ``eval_windows(count, C + H, seed)`` are used;
            pass the validation split) or a ready ``Batch`` of windows (used whole).
        context: C, real frames given.
        horizon: H, imagined frames scored.
        count: windows drawn from ``data``.
        seed: fixes the windows and the sampling noise.
        batch_size: windows per forward pass.
        mode: ``"sample"`` or ``"mode"``, passed to ``imagine``.
        device: where windows go; default each model's own device.
        progress: show a tqdm bar.
        cap: PSNR of a perfect frame.

    Returns:
        :class:`RolloutPSNR`.

    Shapes:
        windows: ``[n, C + H, 3, S, S]``; every stats array ``[n, H]``.
    """
    if context < 1 or horizon < 1:
        raise ValueError(f"context and horizon must be >= 1, got {context} and {horizon}")
    windows = _windows(data, context + horizon, count, seed)
    action_dim = None if isinstance(data, Batch) else data.action_dim
    for name, model in models.items():
        _check_model(
            name, model, steps=context + horizon - 1, action_dim=action_dim, windows=windows
        )
    scores: dict[str, StepStats] = {}
    ceilings: dict[str, StepStats] = {}
    with torch.inference_mode():
        for name, model in models.items():
            dev = _model_device(model, device)
            rows, ceil = [], []
            with _evaluating(model, seed, dev):
                chunks = windows.chunks(batch_size)
                for chunk in tqdm(chunks, desc=f"rollout PSNR {name}", disable=not progress):
                    chunk = chunk.to(dev)
                    target = chunk.obs[:, context : context + horizon]
                    pred = _imagine(model, chunk, context, horizon, mode)
                    rows.append(psnr(pred, target, cap=cap).cpu().numpy())
                    recon = _reconstruct(model, chunk.obs, chunk.action)[:, context:]
                    ceil.append(psnr(recon, target, cap=cap).cpu().numpy())
            scores[name] = StepStats.from_values(np.concatenate(rows))
            ceilings[name] = StepStats.from_values(np.concatenate(ceil))
        target = windows.obs[:, context : context + horizon]
        last = windows.obs[:, context - 1 : context].expand_as(target)
        copy_last = StepStats.from_values(psnr(last, target, cap=cap).numpy())
    return RolloutPSNR(scores, ceilings, copy_last, context, horizon, seed, mode)


def reconstruction_psnr(
    model: WorldModel,
    windows: Batch,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cap: float = 100.0,
) -> float:
    """Mean PSNR (dB) of ``model.reconstruct`` over every frame of ``windows`` ``[B,T,...]``."""
    dev = _model_device(model, device)
    values = []
    with torch.inference_mode(), _evaluating(model, 0, dev):
        for chunk in windows.chunks(batch_size):
            chunk = chunk.to(dev)
            recon = _reconstruct(model, chunk.obs, chunk.action)
            values.append(psnr(recon, chunk.obs, cap=cap).flatten())
    return float(torch.cat(values).mean())
