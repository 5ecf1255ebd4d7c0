"""Evaluation: PSNR and the rollout protocol of Section 4 (diagnostics: ``diagnostics.py``).

Protocol: the same fixed held-out windows of
``C + H`` steps for every model; each model sees the ``C`` real context frames and
actions, imagines ``H`` frames open-loop with the real future actions, and every
imagined frame is scored against the real one with PSNR (MAX = 1 on [0, 1] frames).
Rollouts take the argmax latent at every step (``mode="mode"``: deterministic, the
dynamics alone) or sample them (``"sample"``: what imagination for an agent does).

Next to each model, its reconstruction ceiling of the same kind: encode -> decode of the
true future frames with the posterior's argmax for argmax rollouts, with a posterior
sample for sampled ones (the whole window is reconstructed, with its actions, and steps
C+1..C+H are scored), and the posterior's mean entropy per categorical, which says how
much a sample can differ from the argmax. Beside them, trivial predictors from the
context alone (:func:`baseline_predictions`): a model that does not beat them has
learned no useful dynamics. :func:`action_sensitivity` tells whether a model uses its
actions at all.

Intervals are 95% normal-approximation half-widths over windows,
``1.96 * std / sqrt(n)`` (sample std, ``ddof=1``); windows are treated as independent
although several may come from the same episode, so the intervals are optimistic.

Glossary: B batch, T time, C context, H horizon, S image side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .types import Batch, ImagineMode, RolloutModel
from .utils import evaluating, model_device, private_rng

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


MODES = ("mode", "sample")
"""Rollout modes of Section 4: argmax latents (the headline) and sampled latents."""
NO_MODE = "this model samples in both modes (or in neither)"
"""What the tables and the report say of a model whose ``imagine`` takes no mode."""

CEILING_KINDS = {"mode": "argmax", "sample": "posterior sample"}
"""What each mode's ceilings decode: the posterior's argmax, or a posterior sample."""

BASELINES = ("copy-last", "linear extrapolation", "context mean")
"""The trivial predictors of :func:`baseline_predictions`, in table order."""


def baseline_predictions(obs: Tensor, context: int, horizon: int) -> dict[str, Tensor]:
    """Trivial predictions of frames C+1..C+H from the C context frames alone.

    * ``copy-last``: the last context frame, unchanged (nothing moves);
    * ``linear extrapolation``: each pixel keeps its last change, ``o_C + k (o_C - o_{C-1})``
      clamped to [0, 1] (naive motion; needs C >= 2);
    * ``context mean``: the mean of the C context frames (where things have been).

    Shapes:
        obs: ``[B, >= C, 3, S, S]``; every prediction ``[B, H, 3, S, S]``.
    """
    last = obs[:, context - 1 : context]
    shape = (obs.shape[0], horizon, *obs.shape[2:])
    out = {"copy-last": last.expand(shape)}
    if context >= 2:
        k = torch.arange(1, horizon + 1, dtype=obs.dtype, device=obs.device).view(1, -1, 1, 1, 1)
        out["linear extrapolation"] = (last + k * (last - obs[:, context - 2 : context - 1])).clamp(
            0.0, 1.0
        )
    out["context mean"] = obs[:, :context].mean(1, keepdim=True).expand(shape)
    return out


@dataclass
class RolloutPSNR:
    """Result of :func:`rollout_psnr`: PSNR per imagined step for models and baselines."""

    models: dict[str, StepStats]
    ceilings: dict[str, StepStats]
    """Per model: PSNR of encode -> decode of the true future frames (same windows), with
    the posterior's argmax in mode ``"mode"`` and a posterior sample in ``"sample"``.
    Absent for a model without ``reconstruct``."""
    baselines: dict[str, StepStats]
    """Trivial predictors (:data:`BASELINES`), scored like the models."""
    entropy: dict[str, float]
    """Per model: mean entropy of the posterior per categorical, nats (max ln V)."""
    context: int
    horizon: int
    seed: int
    mode: str
    mode_ignored: tuple[str, ...] = ()
    """Models whose ``imagine`` takes no mode (``follows_mode`` False): their rows are
    the same rollout under both modes, so no mode's effect was measured for them."""

    @property
    def steps(self) -> np.ndarray:
        """``[H]`` the step numbers 1..H."""
        return np.arange(1, self.horizon + 1)

    @property
    def copy_last(self) -> StepStats:
        """The last context frame repeated (the baseline every model must beat)."""
        return self.baselines["copy-last"]

    @property
    def ceiling_kind(self) -> str:
        """What the ceilings decode: ``"argmax"`` or ``"posterior sample"``."""
        return CEILING_KINDS[self.mode]

    def rows(self) -> dict[str, StepStats]:
        """Every scored row in table order: models, ceilings, baselines."""
        out = dict(self.models)
        out.update({f"{name} ceiling": s for name, s in self.ceilings.items()})
        out.update(self.baselines)
        return out

    def table(self, steps: Sequence[int] = (1, 3, 5, 10)) -> str:
        """Fixed-width text table of ``mean ± 95% half-width`` (dB) at ``steps``, rendered
        from :meth:`to_dict` by :func:`psnr_table` (so a saved results file prints the
        same table)."""
        return psnr_table(self.to_dict(), steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists and numbers), e.g. for JSON."""
        return {
            "context": self.context,
            "horizon": self.horizon,
            "seed": self.seed,
            "mode": self.mode,
            "models": {k: v.to_dict() for k, v in self.models.items()},
            "ceilings": {k: v.to_dict() for k, v in self.ceilings.items()},
            "baselines": {k: v.to_dict() for k, v in self.baselines.items()},
            "entropy": dict(self.entropy),
            "mode_ignored": list(self.mode_ignored),
        }


def psnr_table(summary: Mapping[str, Any], steps: Sequence[int] = (1, 3, 5, 10)) -> str:
    """The text table of :meth:`RolloutPSNR.table` from its :meth:`RolloutPSNR.to_dict`
    form (or :func:`storm_lib.results.psnr_summary` of a saved file, where a missing
    half-width is ``None``): models, their ceilings, baselines, at ``steps``."""
    horizon, mode = summary["horizon"], summary["mode"]
    shown = [k for k in steps if 1 <= k <= horizon]
    rows = dict(summary["models"])
    rows.update({f"{name} ceiling": s for name, s in summary["ceilings"].items()})
    rows.update(summary["baselines"])
    width = max(len(name) for name in rows) + 2
    head = "".join(f"{'step ' + str(k):>16}" for k in shown)
    latents = "argmax latents" if mode == "mode" else "sampled latents"
    lines = [
        f"PSNR in dB, mean ± 95% half-width over {summary['baselines']['copy-last']['n']} "
        f"windows (context {summary['context']}, {latents}; ceilings decode the "
        f"{CEILING_KINDS[mode]})",
        f"{'':<{width}}{head}",
    ]
    for name, s in rows.items():
        hw = [math.nan if v is None else v for v in s["half_width"]]
        cells = "".join(f"{s['mean'][k - 1]:>9.2f} ± {hw[k - 1]:<4.2f}" for k in shown)
        lines.append(f"{name:<{width}}{cells}")
    if summary["entropy"]:
        values = ", ".join(f"{k} {v:.2f}" for k, v in summary["entropy"].items())
        lines.append(f"posterior entropy per categorical (nats): {values}")
    for name in summary.get("mode_ignored", ()):
        lines.append(
            f"note: {name} takes no mode, so {NO_MODE}: its rows are the same rollout as in "
            "the other mode's table"
        )
    return "\n".join(lines)


def _windows(data: Data, length: int, count: int, seed: int) -> Batch:
    """``count`` held-out windows of ``length`` steps; a given Batch is used whole, cut."""
    if isinstance(data, Batch):
        if data.obs.shape[1] < length:
            raise ValueError(f"windows have {data.obs.shape[1]} steps, need {length}")
        t = slice(0, length)
        return Batch(data.obs[:, t], data.action[:, t], data.reward[:, t], data.cont[:, t])
    return data.eval_windows(count, length, seed)


def _model_device(model: Any, device: torch.device | str | None) -> torch.device:
    """``device`` when given, else where the model computes (:func:`utils.model_device`:
    an outside model's ``device`` first, so a wrapper without parameters is not taken for
    a CPU model)."""
    return torch.device(device) if device is not None else model_device(model)


def _check_model(
    name: str, model: RolloutModel, *, steps: int, action_dim: int | None, windows: Batch
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


def _reconstruct(
    model: RolloutModel, obs: Tensor, action: Tensor, mode: ImagineMode = "mode"
) -> Tensor:
    """``model.reconstruct`` with the argmax or a sample of the posterior, clamped to [0, 1]."""
    return model.reconstruct(obs, action, mode=mode).clamp(0.0, 1.0)


def _entropy(model: RolloutModel, obs: Tensor, action: Tensor) -> Tensor | None:
    """``[B, T]`` mean entropy per categorical of the posterior, in nats (None for a model
    without ``posterior_log_probs``)."""
    if not hasattr(model, "posterior_log_probs"):
        return None
    log_probs = model.posterior_log_probs(obs, action)
    return -(log_probs.exp() * log_probs).sum(-1).mean(-1)


def _imagine(
    model: RolloutModel, chunk: Batch, context: int, horizon: int, mode: ImagineMode
) -> Tensor:
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


def _imagine_seeded(
    model: RolloutModel,
    chunk: Batch,
    context: int,
    horizon: int,
    mode: ImagineMode,
    seed: int,
    device: torch.device,
) -> Tensor:
    """:func:`_imagine` with the global RNG (CPU and ``device``) seeded to ``seed``."""
    with private_rng(seed, device):
        return _imagine(model, chunk, context, horizon, mode)


def rollout_psnr(
    models: Mapping[str, RolloutModel],
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
    clamped to [0, 1] before scoring (decoders are unbounded). Each model's ceiling
    decodes its posterior the way the rollout decodes its prior (argmax or sample), from
    the same frames.

    Args:
        models: name -> world model.
        data: a ``TrajectoryData`` (its ``eval_windows(count, C + H, seed)`` are used;
            pass the validation split) or a ready ``Batch`` of windows (used whole).
        context: C, real frames given.
        horizon: H, imagined frames scored.
        count: windows drawn from ``data``.
        seed: fixes the windows and the sampling noise.
        batch_size: windows per forward pass.
        mode: ``"mode"`` (argmax latents) or ``"sample"``, passed to ``imagine`` and to
            the ceiling's ``reconstruct``.
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
    entropy: dict[str, float] = {}
    for name, model in models.items():
        dev = _model_device(model, device)
        rows, ceil, ent = [], [], []
        with evaluating(model, seed, dev):
            chunks = windows.chunks(batch_size)
            for chunk in tqdm(chunks, desc=f"rollout PSNR {name}", disable=not progress):
                chunk = chunk.to(dev)
                target = chunk.obs[:, context : context + horizon]
                pred = _imagine(model, chunk, context, horizon, mode)
                rows.append(psnr(pred, target, cap=cap).cpu().numpy())
                if callable(getattr(model, "reconstruct", None)):  # optional (outside models)
                    recon = _reconstruct(model, chunk.obs, chunk.action, mode)[:, context:]
                    ceil.append(psnr(recon, target, cap=cap).cpu().numpy())
                ent.append(_entropy(model, chunk.obs, chunk.action))
        scores[name] = StepStats.from_values(np.concatenate(rows))
        if ceil:
            ceilings[name] = StepStats.from_values(np.concatenate(ceil))
        known = [e for e in ent if e is not None]
        if known and len(known) == len(ent):
            entropy[name] = float(torch.cat(known).mean())
    # The baselines are computed where the windows are (a Batch on the GPU stays there);
    # only the [n, H] PSNR table comes to the host.
    target = windows.obs[:, context : context + horizon]
    baselines = {
        name: StepStats.from_values(psnr(pred, target, cap=cap).cpu().numpy())
        for name, pred in baseline_predictions(windows.obs, context, horizon).items()
    }
    ignored = tuple(n for n, m in models.items() if not getattr(m, "follows_mode", True))
    return RolloutPSNR(scores, ceilings, baselines, entropy, context, horizon, seed, mode, ignored)


@dataclass
class ActionSensitivity:
    """Result of :func:`action_sensitivity` for one model (all ``[n, H]`` stats)."""

    real: StepStats
    """PSNR against the truth of rollouts under the real future actions."""
    shuffled: StepStats
    """The same, under the future actions of another window."""
    between: StepStats
    """PSNR between the two rollouts: ``cap`` where they are identical (actions ignored)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).to_dict() for k in ("real", "shuffled", "between")}


def ignores_actions(sensitivity: ActionSensitivity, cap: float = 100.0) -> bool:
    """True when the rollouts under real and shuffled actions are identical at every step:
    the model returns the same frames whatever the actions are."""
    return bool(np.all(sensitivity.between.values[:, 1:] >= cap))


def shuffled_partners(count: int, seed: int) -> Tensor:
    """A seeded permutation of ``range(count)`` with no fixed point (each window takes
    another window's actions), ``[count]`` int64; the identity when ``count < 2``."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def action_sensitivity(
    models: Mapping[str, RolloutModel],
    data: Data,
    *,
    context: int = 8,
    horizon: int = 10,
    count: int = 256,
    seed: int = 1234,
    batch_size: int = 64,
    mode: ImagineMode = "mode",
    device: torch.device | str | None = None,
    progress: bool = True,
    cap: float = 100.0,
) -> dict[str, ActionSensitivity]:
    """Does a model use its actions? The same rollouts under the real future actions and
    under the future actions of another window (:func:`shuffled_partners`).

    A model that ignores actions gives the same frames either way (``between`` at
    ``cap``) and scores no better with the real actions. Frame C+1 follows the last
    context action, which is kept, so the two rollouts can only differ from step 2 on.
    Same windows, RNG handling and arguments as :func:`rollout_psnr`.

    Returns:
        ``{name: ActionSensitivity}``.
    """
    windows = _windows(data, context + horizon, count, seed)
    partner = shuffled_partners(len(windows), seed)
    future = slice(context, context + horizon - 1)
    shuffled = Batch(
        windows.obs, windows.action.clone(), windows.reward, windows.cont
    )  # only the future actions change
    shuffled.action[:, future] = windows.action[partner, future]
    out: dict[str, ActionSensitivity] = {}
    for name, model in models.items():
        dev = _model_device(model, device)
        real, other, between = [], [], []
        with evaluating(model, seed, dev):
            chunks = windows.chunks(batch_size), shuffled.chunks(batch_size)
            pairs = list(zip(*chunks, strict=True))
            for i, (a, b) in enumerate(tqdm(pairs, desc=name, disable=not progress)):
                a, b = a.to(dev), b.to(dev)
                target = a.obs[:, context : context + horizon]
                pa, pb = (  # with the same sampling noise for both rollouts
                    _imagine_seeded(model, x, context, horizon, mode, seed + i, dev) for x in (a, b)
                )
                real.append(psnr(pa, target, cap=cap).cpu().numpy())
                other.append(psnr(pb, target, cap=cap).cpu().numpy())
                between.append(psnr(pb, pa, cap=cap).cpu().numpy())
        out[name] = ActionSensitivity(
            *(StepStats.from_values(np.concatenate(v)) for v in (real, other, between))
        )
    return out


def reconstruction_psnr(
    model: RolloutModel,
    windows: Batch,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cap: float = 100.0,
) -> float:
    """Mean PSNR (dB) of ``model.reconstruct`` over every frame of ``windows`` ``[B,T,...]``."""
    dev = _model_device(model, device)
    values = []
    with evaluating(model, 0, dev):
        for chunk in windows.chunks(batch_size):
            chunk = chunk.to(dev)
            recon = _reconstruct(model, chunk.obs, chunk.action)
            values.append(psnr(recon, chunk.obs, cap=cap).flatten())
    return float(torch.cat(values).mean())
