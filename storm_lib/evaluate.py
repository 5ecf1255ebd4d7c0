"""Evaluation: PSNR, the rollout protocol of Section 4, diagnostics and step timings.

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
import copy
import inspect
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import Config
from .models import build_world_model
from .types import Batch, ImagineMode, WorldModel
from .utils import default_device

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


def _chunks(batch: Batch, size: int) -> Iterator[Batch]:
    for i in range(0, len(batch), size):
        s = slice(i, i + size)
        yield Batch(batch.obs[s], batch.action[s], batch.reward[s], batch.cont[s])


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
                chunks = list(_chunks(windows, batch_size))
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
        for chunk in _chunks(windows, batch_size):
            chunk = chunk.to(dev)
            recon = _reconstruct(model, chunk.obs, chunk.action)
            values.append(psnr(recon, chunk.obs, cap=cap).flatten())
    return float(torch.cat(values).mean())


def teacher_forcing_gap(
    model: WorldModel,
    windows: Batch,
    *,
    context: int,
    horizon: int,
    mode: ImagineMode = "sample",
    seed: int = 1234,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cap: float = 100.0,
) -> dict[str, Any]:
    """Teacher-forced one-step PSNR vs free-running PSNR at each horizon step.

    Teacher-forced: ``predict_one_step`` on the whole window; frame ``C+k`` is predicted
    from the real history up to ``C+k-1``. Free-running: ``imagine`` from the ``C``
    context frames. Both use ``mode`` and the same seeded RNG, so at step 1 they agree.
    The whole ``C + H`` window goes through ``predict_one_step``, so ``C + H`` must fit
    in ``max_length``.

    Returns:
        ``steps`` ``[H]`` (1..H), ``teacher_forced`` and ``free_running`` mean PSNR ``[H]``
        with ``*_hw`` 95% half-widths, ``gap`` = teacher_forced - free_running ``[H]``
        (dB lost to feeding back the model's own predictions), and ``n``.
    """
    length = context + horizon
    windows = _windows(windows, length, len(windows), seed)
    _check_model("model", model, steps=length, action_dim=None, windows=windows)
    dev = _model_device(model, device)
    forced, free = [], []
    with torch.inference_mode(), _evaluating(model, seed, dev):
        for chunk in _chunks(windows, batch_size):
            chunk = chunk.to(dev)
            target = chunk.obs[:, context:length]
            one_step = model.predict_one_step(chunk.obs, chunk.action, mode=mode)
            one_step = one_step[:, context - 1 : length - 1].clamp(0.0, 1.0)
            forced.append(psnr(one_step, target, cap=cap).cpu().numpy())
            pred = _imagine(model, chunk, context, horizon, mode)
            free.append(psnr(pred, target, cap=cap).cpu().numpy())
    tf, fr = (
        StepStats.from_values(np.concatenate(forced)),
        StepStats.from_values(np.concatenate(free)),
    )
    return {
        "steps": np.arange(1, horizon + 1),
        "teacher_forced": tf.mean,
        "teacher_forced_hw": tf.half_width,
        "free_running": fr.mean,
        "free_running_hw": fr.half_width,
        "gap": tf.mean - fr.mean,
        "n": tf.n,
    }


@dataclass
class SlidingWindowLoss:
    """Result of :func:`sliding_window_token_loss`; NaN marks a window not measurable."""

    nll: dict[int, float]
    """Window length -> mean teacher-forced token NLL (nats/frame)."""
    per_position: dict[int, np.ndarray] = field(default_factory=dict)
    """Window length -> ``[length - 1]`` mean NLL at each predicted position."""
    notes: list[str] = field(default_factory=list)
    """Why a window is NaN (e.g. ``max_length`` too short)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict."""
        return {
            "nll": dict(self.nll),
            "per_position": {k: v.tolist() for k, v in self.per_position.items()},
            "notes": list(self.notes),
        }


def sliding_window_token_loss(
    model: WorldModel,
    data: Data,
    *,
    windows: Sequence[int] = (20, 50),
    count: int = 64,
    seed: int = 1234,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SlidingWindowLoss:
    """Mean teacher-forced token NLL on held-out windows of each length (the notes' rule).

    A widening gap between short and long windows means prediction degrades with longer
    contexts. A window longer than the model's ``max_length``, or one the data cannot
    supply, is not an error: its entry is NaN and ``notes`` says why.

    Returns:
        :class:`SlidingWindowLoss`.

    Shapes:
        ``token_nll_per_step(obs [b, L, ...], action [b, L]) -> [b, L - 1]``.
    """
    out = SlidingWindowLoss(nll={})
    max_length = getattr(model, "max_length", None)
    dev = _model_device(model, device)
    for length in windows:
        if max_length is not None and length > max_length:
            out.nll[length] = math.nan
            out.notes.append(f"window {length}: not measurable, max_length={max_length}")
            continue
        try:
            batch = _windows(data, length, count, seed)
        except ValueError as err:
            out.nll[length] = math.nan
            out.notes.append(f"window {length}: not measurable, {err}")
            continue
        rows = []
        with torch.inference_mode(), _evaluating(model, seed, dev):
            for chunk in tqdm(list(_chunks(batch, batch_size)), disable=not progress):
                chunk = chunk.to(dev)
                rows.append(model.token_nll_per_step(chunk.obs, chunk.action).double().cpu())
        nll = torch.cat(rows).numpy()
        out.nll[length] = float(nll.mean())
        out.per_position[length] = nll.mean(axis=0)
    return out


def rule_of_thumb(per_step_psnr: np.ndarray, name: str, threshold_db: float = 5.0) -> str:
    """The notes' rule as a sentence: a drop > ``threshold_db`` within 10 steps blames
    the teacher-forcing gap. The drop is step 1 minus the lowest PSNR of steps 1..10."""
    values = np.asarray(per_step_psnr, dtype=np.float64)[:10]
    if values.size < 2:
        return f"{name}: fewer than 2 steps, the rule of thumb needs a curve."
    worst = int(np.argmin(values))
    drop = float(values[0] - values[worst])
    span = f"from step 1 to step {worst + 1} ({values[0]:.1f} -> {values[worst]:.1f} dB)"
    if drop <= 0:
        first = f"step 1: {values[0]:.1f} dB"
        return f"{name}: PSNR does not fall over steps 1-{values.size} ({first})."
    head = f"{name}: PSNR falls {drop:.1f} dB {span}"
    if drop > threshold_db:
        return (
            f"{head}, more than the notes' {threshold_db:g} dB within the first 10 steps: "
            "by their rule of thumb the teacher-forcing gap is the primary cause "
            "(remedies: scheduled sampling or self-forcing)."
        )
    return f"{head}, within the notes' {threshold_db:g} dB rule of thumb."


def step_time_vs_length(
    kind: str,
    config: Config,
    action_dim: int,
    *,
    lengths: Sequence[int] = (16, 32, 64, 128, 256),
    batch_size: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    mode: Literal["train", "infer"] = "train",
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Median time of one step of a fresh ``kind`` model at each sequence length.

    ``"train"``: loss + backward + gradient clipping + Adam step in train mode.
    ``"infer"``: the loss forward in eval mode under ``no_grad``. Inputs are random
    frames and actions: timing does not depend on the values. The config is copied with
    ``transformer.max_length >= max(lengths)`` (the RSSM ignores it).

    Returns:
        ``kind``, ``mode``, ``lengths``, ``ms_per_step`` and ``ms_per_frame``
        (per step / (batch * length)) lists, ``batch_size``, ``device``,
        ``train_length`` (the profile's training sequence length).
    """
    cfg = copy.deepcopy(config)
    cfg.transformer.max_length = max(cfg.transformer.max_length, max(lengths))
    batch = batch_size or cfg.train.batch_size
    dev = default_device(device)
    size = cfg.data.image_size
    ms_step: list[float] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_world_model(kind, cfg, action_dim, dev)  # type: ignore[arg-type]
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        model.train(mode == "train")
        for length in tqdm(lengths, desc=f"step time {kind}", disable=not progress):
            data = Batch(
                obs=torch.rand(batch, length, 3, size, size, device=dev),
                action=torch.randint(0, action_dim, (batch, length), device=dev),
                reward=torch.randn(batch, length, device=dev),
                cont=torch.ones(batch, length, device=dev),
            )
            times = []
            for i in range(warmup + repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
                if mode == "train":
                    loss, _ = model.loss(data)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                    opt.step()
                else:
                    with torch.no_grad():
                        model.loss(data)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            ms_step.append(1000.0 * statistics.median(times))
    return {
        "kind": kind,
        "mode": mode,
        "lengths": list(lengths),
        "ms_per_step": ms_step,
        "ms_per_frame": [ms / (batch * n) for ms, n in zip(ms_step, lengths, strict=True)],
        "batch_size": batch,
        "device": str(dev),
        "train_length": cfg.train.seq_len,
    }


def loglog_slope(lengths: Sequence[float], ms: Sequence[float]) -> float:
    """Least-squares slope of log(ms) against log(length): 1 linear, 2 quadratic."""
    return float(np.polyfit(np.log(lengths), np.log(ms), 1)[0])


def attention_cost_sentence(
    timings_storm: Mapping[str, Any],
    timings_rssm: Mapping[str, Any],
    *,
    quadratic_slope: float = 1.5,
) -> str:
    """Whether attention's quadratic cost shows in measured step times, as a sentence.

    Uses the log-log slope over all lengths for both models, and STORM's slope between
    its two longest lengths: above ``quadratic_slope`` (closer to 2 than to 1) the
    quadratic term is called visible. If the timings carry ``train_length``, the
    sentence also says how STORM scales over the lengths up to twice it.
    """
    ls, ms = timings_storm["lengths"], timings_storm["ms_per_step"]
    if len(ls) < 2:
        raise ValueError("need timings at 2 or more lengths")
    overall = loglog_slope(ls, ms)
    rssm = loglog_slope(timings_rssm["lengths"], timings_rssm["ms_per_step"])
    tail = loglog_slope(ls[-2:], ms[-2:])
    visible = tail > quadratic_slope
    text = (
        f"Step time vs sequence length ({ls[0]}-{ls[-1]} steps), log-log slope "
        f"(1 = linear, 2 = quadratic): STORM {overall:.2f}, RSSM {rssm:.2f}; "
        f"STORM's slope between {ls[-2]} and {ls[-1]} steps is {tail:.2f}, so attention's "
        f"quadratic cost is {'visible' if visible else 'not visible'} at these lengths"
    )
    train_length = timings_storm.get("train_length")
    if train_length:
        near = [i for i, n in enumerate(ls) if n <= 2 * train_length]
        idx = near if len(near) >= 2 else [0, 1]
        local = loglog_slope([ls[i] for i in idx], [ms[i] for i in idx])
        verdict = "quadratic-dominated" if local > quadratic_slope else "not quadratic-dominated"
        text += (
            f"; around the training length of {train_length} steps (lengths "
            f"{ls[idx[0]]}-{ls[idx[-1]]}) STORM's slope is {local:.2f}, {verdict}"
        )
    return text + "."
