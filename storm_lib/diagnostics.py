"""Diagnostics from the course notes, and cost measurements.

* the teacher-forcing gap: one-step PSNR from the real history against free-running PSNR;
* the sliding-window token loss (20 vs 50 steps of context);
* token perplexity of the dynamics prior (GIT-STORM appendix K);
* the notes' rule of thumb (a drop of more than 5 dB within 10 steps);
* step time against sequence length for either backbone, and what it says about
  attention's quadratic cost;
* token churn and per-categorical predictability: how many categoricals change between
  real consecutive frames, and how often the prior predicts each one's next class.

Glossary: B batch, T time, C context, H horizon, S image side.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .config import Config
from .evaluate import (
    Data,
    StepStats,
    _check_model,
    _imagine,
    _model_device,
    _windows,
    psnr,
)
from .models import WorldModel, build_world_model
from .models.vae import draw_index
from .train import TrainStep
from .types import Batch, ImagineMode
from .utils import autocast, default_device, evaluating, median_ms, private_rng

QUADRATIC_SLOPE = 1.5
"""A log-log slope of time against length above this (closer to 2 than to 1) counts as
quadratic growth."""


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
    with evaluating(model, seed, dev):
        for chunk in windows.chunks(batch_size):
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
        with evaluating(model, seed, dev):
            for chunk in tqdm(batch.chunks(batch_size), disable=not progress):
                chunk = chunk.to(dev)
                rows.append(model.token_nll_per_step(chunk.obs, chunk.action).double().cpu())
        nll = torch.cat(rows).numpy()
        out.nll[length] = float(nll.mean())
        out.per_position[length] = nll.mean(axis=0)
    return out


def perplexity(nll_per_frame: float | np.ndarray, categoricals: int) -> float:
    """Token perplexity ``exp(mean NLL per token)`` from NLLs in nats per frame of K tokens.

    A prior that is uniform over V classes has ``nll_per_frame = K log V`` and perplexity V.
    """
    return float(math.exp(float(np.mean(nll_per_frame)) / categoricals))


def token_perplexity(
    model: WorldModel,
    data: Data,
    *,
    length: int = 18,
    count: int = 64,
    seed: int = 1234,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of the dynamics prior on held-out windows (GIT-STORM appendix K).

    ``PPL = exp(-1/N sum_i log p(z_i | z_<i))`` over the N = ``(L - 1) * K`` tokens of the
    posterior-mode latents of frames 2..L of each window, every frame predicted
    teacher-forced from the real history (``token_nll_per_step``). The K tokens of one
    frame are scored against the head's factorised prior given ``h_t``: the MLP prior's
    output, or the MaskGIT prior's all-masked prediction (the distribution its one-round
    draft samples from); neither conditions on other tokens of the same frame, so this is
    the same measurement for every head. Works for any model with ``token_nll_per_step``
    and ``k`` (categoricals), e.g. either STORM head and the RSSM.

    Returns:
        ``perplexity``, ``token_nll`` (mean nats per frame), ``nll_per_token`` (nats),
        ``windows`` and ``length``.
    """
    result = sliding_window_token_loss(
        model, data, windows=(length,), count=count, seed=seed, batch_size=batch_size,
        device=device, progress=progress,
    )  # fmt: skip
    nll = result.nll[length]
    if math.isnan(nll):
        raise ValueError(f"token perplexity not measurable: {'; '.join(result.notes)}")
    k = model.categoricals
    return {
        "perplexity": perplexity(nll, k),
        "token_nll": nll,
        "nll_per_token": nll / k,
        "windows": count if not isinstance(data, Batch) else len(data),
        "length": length,
    }


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


@dataclass
class CacheTiming:
    """:func:`kv_cache_timing`'s result: one cached and one recomputing ``imagine``."""

    cached_ms: float
    """Median ms of ``imagine(..., use_cache=True)``: one prefill, then one token a step."""
    recomputed_ms: float
    """Median ms of ``imagine(..., use_cache=False)``: the whole sequence every step."""
    max_difference: float
    """Largest pixel difference between the two rollouts (float rounding only)."""
    windows: int
    frames: int
    """B windows, H imagined frames each."""
    repeats: int
    device: str

    def __str__(self) -> str:
        return (
            f"{self.frames} imagined frames for {self.windows} windows: with the KV cache "
            f"{self.cached_ms / 1000:.2f} s, recomputing every step "
            f"{self.recomputed_ms / 1000:.2f} s ({self.recomputed_ms / self.cached_ms:.1f}x); "
            f"largest pixel difference {self.max_difference:.1e} (median of {self.repeats} "
            f"runs after a warm-up, on {self.device})"
        )


def kv_cache_timing(
    model: Any,
    windows: Batch,
    context: int,
    *,
    mode: ImagineMode = "mode",
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> CacheTiming:
    """What the KV cache changes in imagination's cost: STORM's ``imagine`` over the same
    windows with the cache and recomputing every step, each timed by
    :func:`storm_lib.utils.median_ms` (warm-up first, CUDA synchronised around every
    timed call: without it a GPU timer sees only the launches, and the printed speed-up
    can even invert), and the largest difference between the two rollouts.

    Args:
        model: a STORM model (its ``imagine`` takes ``use_cache``).
        windows: ``obs [B, C + H, 3, S, S]``, ``action [B, C + H]``: C context frames, and
            the actions of the H - 1 steps after them.
        context: C.
        mode: ``"mode"`` (argmax: both rollouts are the same sequence) or ``"sample"``.
        repeats: timed calls of each.
        warmup: untimed calls of each first.
        device: where it runs (default the model's device).

    Example (the notebook's "KV cache changes what imagination costs" cell)::

        window = val_data.eval_windows(8, C + 40, seed=2)
        print(dg.kv_cache_timing(storm, window, C, device=device))
    """
    dev = _model_device(model, device)
    windows = windows.to(dev)
    args = windows.obs[:, :context], windows.action[:, :context], windows.action[:, context:-1]
    frames: dict[bool, Tensor] = {}
    ms: dict[bool, float] = {}
    with evaluating(model, 0, dev):
        for use_cache in (True, False):

            def run(use_cache: bool = use_cache) -> None:
                frames[use_cache] = model.imagine(*args, mode=mode, use_cache=use_cache).obs

            ms[use_cache] = median_ms(run, dev, repeats=repeats, warmup=warmup)
    difference = float((frames[True] - frames[False]).abs().max())
    return CacheTiming(
        cached_ms=ms[True], recomputed_ms=ms[False], max_difference=difference,
        windows=windows.obs.shape[0], frames=windows.obs.shape[1] - context, repeats=repeats,
        device=str(dev),
    )  # fmt: skip


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
    part: Literal["model", "sequence"] = "model",
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Median time of one step of a fresh ``kind`` model at each sequence length.

    ``"train"``: the step of ``fit()`` (:class:`storm_lib.train.TrainStep`: autocast by
    ``config.train.precision``, backward, clipping, fused Adam) in train mode.
    ``"infer"``: the loss forward in eval mode under ``no_grad``. Inputs are random
    frames and actions: timing does not depend on the values. The config is copied with
    ``transformer.max_length >= max(lengths)`` (the RSSM ignores it).

    ``part="sequence"`` times the sequence model alone on random inputs (STORM: the
    causal Transformer over the step tokens; RSSM: the GRU recurrence of ``observe``
    over encoder-sized embeddings), forward and backward, so that the cost of
    attention is not hidden behind the per-frame VAE.

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
    with private_rng(seed, dev):
        model = build_world_model(kind, cfg, action_dim, dev)
        step = TrainStep(model, cfg.train, dev)  # fit()'s own step: precision, fused Adam
        model.train(mode == "train")
        for length in tqdm(lengths, desc=f"step time {kind}", disable=not progress):
            data = Batch(
                obs=torch.rand(batch, length, 3, size, size, device=dev),
                action=torch.randint(0, action_dim, (batch, length), device=dev),
                reward=torch.randn(batch, length, device=dev),
                cont=torch.ones(batch, length, device=dev),
            )
            run = _sequence_only(model, kind, data) if part == "sequence" else model.loss

            def once(run=run, data=data) -> None:
                if mode == "train":
                    step(run, data)
                else:
                    with torch.no_grad(), autocast(dev, step.dtype):
                        run(data)

            ms_step.append(median_ms(once, dev, repeats=repeats, warmup=warmup))
    return {
        "kind": kind,
        "mode": mode,
        "part": part,
        "lengths": list(lengths),
        "ms_per_step": ms_step,
        "ms_per_frame": [ms / (batch * n) for ms, n in zip(ms_step, lengths, strict=True)],
        "batch_size": batch,
        "device": str(dev),
        "train_length": cfg.train.seq_len,
    }


def _sequence_only(model: Any, kind: str, data: Batch) -> Any:
    """A ``loss``-like callable that runs only the sequence model of ``model``."""
    b, t = data.action.shape
    if kind == "storm":
        width = model.config.transformer.width
        tokens = torch.randn(b, t * model.embed.tokens_per_step, width, device=data.obs.device)

        def run(_: Batch) -> tuple[torch.Tensor, dict]:
            return model.transformer(tokens).square().mean(), {}

        return run
    embed = torch.randn(b, t, model.encoder.feature_dim, device=data.obs.device)

    def run_rssm(_: Batch) -> tuple[torch.Tensor, dict]:
        posts, _ = model.observe(embed, data.action)
        return posts.deter.square().mean(), {}

    return run_rssm


def loglog_slope(lengths: Sequence[float], ms: Sequence[float]) -> float:
    """Least-squares slope of log(ms) against log(length): 1 linear, 2 quadratic."""
    return float(np.polyfit(np.log(lengths), np.log(ms), 1)[0])


def attention_cost_sentence(
    timings_storm: Mapping[str, Any],
    timings_rssm: Mapping[str, Any],
    *,
    sequence_storm: Mapping[str, Any] | None = None,
    quadratic_slope: float = QUADRATIC_SLOPE,
) -> str:
    """Whether attention's quadratic cost shows in measured step times, as a sentence.

    Describes the log-log slope over all lengths for both models, then judges from the
    slope between the two longest lengths: above ``quadratic_slope`` (closer to 2 than to
    1) the quadratic term is called visible. The verdict is taken from ``sequence_storm``
    (the Transformer timed alone, ``step_time_vs_length(part="sequence")``) when given,
    since a whole step mixes attention with per-frame VAE work that is linear in length;
    otherwise from ``timings_storm``. If the judged timings carry ``train_length``, the
    sentence also says how they scale over the lengths up to twice it.
    """
    ls, ms = timings_storm["lengths"], timings_storm["ms_per_step"]
    if len(ls) < 2:
        raise ValueError("need timings at 2 or more lengths")
    overall = loglog_slope(ls, ms)
    rssm = loglog_slope(timings_rssm["lengths"], timings_rssm["ms_per_step"])
    judged = timings_storm if sequence_storm is None else sequence_storm
    jl, jm = judged["lengths"], judged["ms_per_step"]
    tail = loglog_slope(jl[-2:], jm[-2:])
    who = "STORM" if sequence_storm is None else "the Transformer alone"
    visible = tail > quadratic_slope
    text = (
        f"Step time vs sequence length ({ls[0]}-{ls[-1]} steps), log-log slope "
        f"(1 = linear, 2 = quadratic): STORM {overall:.2f}, RSSM {rssm:.2f}; "
        f"{who} has slope {tail:.2f} between {jl[-2]} and {jl[-1]} steps, so attention's "
        f"quadratic cost is {'visible' if visible else 'not visible'} at these lengths"
    )
    train_length = judged.get("train_length")
    if train_length:
        near = [i for i, n in enumerate(jl) if n <= 2 * train_length]
        idx = near if len(near) >= 2 else [0, 1]
        local = loglog_slope([jl[i] for i in idx], [jm[i] for i in idx])
        verdict = "quadratic-dominated" if local > quadratic_slope else "not quadratic-dominated"
        text += (
            f"; around the training length of {train_length} steps (lengths "
            f"{jl[idx[0]]}-{jl[idx[-1]]}) its slope is {local:.2f}, {verdict}"
        )
    return text + "."


# ------------------------------------------------------------------ the representation
@dataclass
class TokenStatistics:
    """What :func:`token_statistics` measured of one model's latents on real windows.

    Token churn: for every pair of consecutive real frames, how many of the K categoricals
    change their posterior argmax, beside how much of the frame changed. Per-categorical
    predictability: how often the prior's argmax for ``z_{t+1}`` (teacher-forced, from
    the real history) is the posterior's argmax, overall and on the steps where that
    categorical changes (copying the last token is right on none of those).
    """

    pixel_change: np.ndarray
    """``[N]`` share of the pixels of frame t+1 that differ from frame t by more than the
    threshold in some channel (in Boxing, whose ring is static: the moving sprites and the
    clock)."""
    changed: np.ndarray
    """``[N]`` categoricals whose posterior argmax differs between frames t and t+1."""
    resampled: float
    """Mean number of categoricals in which two posterior samples of the same frame differ:
    the churn that sampling alone makes."""
    change_rate: np.ndarray
    """``[K]`` share of the N steps on which each categorical's argmax changes."""
    accuracy: np.ndarray
    """``[K]`` share of steps on which the prior's argmax is the next posterior argmax."""
    accuracy_on_change: np.ndarray
    """``[K]`` the same on the steps where that categorical changes (NaN if it never does)."""
    accuracy_on_stay: np.ndarray
    """``[K]`` the same on the steps where it keeps its class (NaN if it always changes)."""
    entropy: np.ndarray
    """``[K]`` mean entropy of each categorical's posterior, nats (at most ln V): one the
    decoder ignores drifts towards the prior, so it is uncertain, churns and carries noise."""

    @property
    def categoricals(self) -> int:
        return int(self.change_rate.shape[0])

    @property
    def steps(self) -> int:
        return int(self.changed.shape[0])

    @property
    def errors_per_frame(self) -> float:
        """Mean number of categoricals per predicted frame whose argmax the prior misses."""
        return float((1.0 - self.accuracy).sum())

    @property
    def errors_on_change_per_frame(self) -> float:
        """The part of :attr:`errors_per_frame` made on categoricals that change."""
        missed = self.change_rate * (1.0 - np.nan_to_num(self.accuracy_on_change, nan=1.0))
        return float(missed.sum())

    @property
    def accuracy_on_changes(self) -> float:
        """Share of all (step, categorical) changes whose new class the prior predicts."""
        changes = self.change_rate.sum()
        hits = (self.change_rate * np.nan_to_num(self.accuracy_on_change, nan=0.0)).sum()
        return float(hits / changes) if changes > 0 else math.nan

    def churn_by_pixel_change(self, edges: Sequence[float]) -> list[tuple[float, float, int]]:
        """Per bin ``[edges[i], edges[i+1])`` of pixel change with any steps in it: ``(mean
        pixel change, mean changed categoricals, steps)``."""
        out = []
        for low, high in itertools.pairwise(edges):
            inside = (self.pixel_change >= low) & (self.pixel_change < high)
            if inside.any():
                out.append((float(self.pixel_change[inside].mean()),
                            float(self.changed[inside].mean()), int(inside.sum())))  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (the per-step arrays are summarised, not listed)."""
        return {
            "steps": self.steps,
            "categoricals": self.categoricals,
            "mean_changed": float(self.changed.mean()),
            "resampled": self.resampled,
            "change_rate": self.change_rate.tolist(),
            "accuracy": self.accuracy.tolist(),
            "accuracy_on_change": [None if math.isnan(x) else x for x in self.accuracy_on_change],
            "accuracy_on_stay": [None if math.isnan(x) else x for x in self.accuracy_on_stay],
            "entropy": self.entropy.tolist(),
            "errors_per_frame": self.errors_per_frame,
            "errors_on_change_per_frame": self.errors_on_change_per_frame,
            "accuracy_on_changes": self.accuracy_on_changes,
        }


def _share(hits: Tensor, where: Tensor) -> np.ndarray:
    """``[K]`` ``hits.sum / where.sum`` over the steps (dim 0), NaN where ``where`` is empty."""
    count = where.sum(0).double()
    rate = (hits & where).sum(0).double() / count.clamp(min=1)
    return torch.where(count > 0, rate, torch.full_like(rate, math.nan)).numpy()


def token_statistics(
    model: WorldModel,
    windows: Batch,
    *,
    batch_size: int = 64,
    seed: int = 1234,
    threshold: float = 0.1,
    device: torch.device | str | None = None,
) -> TokenStatistics:
    """Token churn and per-categorical predictability of ``model`` on real ``windows``.

    Every window goes through :meth:`WorldModel.latent_predictions` once (argmax latents,
    the real history); each of its ``T - 1`` transitions counts once. Two posterior samples
    of every frame (seeded, the caller's RNG untouched) give the churn of sampling alone.

    Args:
        model: any world model with ``latent_predictions`` (STORM, the RSSM).
        windows: ``obs [N, T, 3, S, S]``, ``action [N, T]`` real windows (T >= 2).
        batch_size: windows per forward pass.
        seed: seed of the two posterior samples.
        threshold: a pixel changes when some channel moves by more than this (of [0, 1]).
        device: where the model runs (default its own device).

    Returns:
        :class:`TokenStatistics` over ``N * (T - 1)`` transitions.
    """
    dev = _model_device(model, device)
    pixel, changed, resampled, hit, change, entropy = [], [], [], [], [], []
    with evaluating(model, seed, dev):
        for chunk in windows.chunks(batch_size):
            chunk = chunk.to(dev)
            latents = model.latent_predictions(chunk.obs, chunk.action)
            post = latents.posterior.argmax(-1)  # [b, T, K]
            moved = (chunk.obs[:, 1:] - chunk.obs[:, :-1]).abs().amax(2) > threshold
            pixel.append(moved.flatten(2).double().mean(-1).flatten().cpu())
            step = post[:, 1:] != post[:, :-1]  # [b, T-1, K]
            changed.append(step.sum(-1).flatten().cpu())
            change.append(step.flatten(0, 1).cpu())
            hit.append((latents.prior.argmax(-1) == post[:, 1:]).flatten(0, 1).cpu())
            probs = latents.posterior.exp()
            entropy.append(torch.special.entr(probs).sum(-1).flatten(0, 1).double().cpu())
            draws = [draw_index(probs, "sample") for _ in range(2)]
            resampled.append((draws[0] != draws[1]).sum(-1).flatten().double().cpu())
    hits, changes = torch.cat(hit), torch.cat(change)  # [N, K]
    return TokenStatistics(
        pixel_change=torch.cat(pixel).numpy(),
        changed=torch.cat(changed).numpy(),
        resampled=float(torch.cat(resampled).mean()),
        change_rate=changes.double().mean(0).numpy(),
        accuracy=hits.double().mean(0).numpy(),
        accuracy_on_change=_share(hits, changes),
        accuracy_on_stay=_share(hits, ~changes),
        entropy=torch.cat(entropy).mean(0).numpy(),
    )


def token_sentence(stats: TokenStatistics, name: str) -> str:
    """What :func:`token_statistics` says of one model, in two sentences."""
    quiet = stats.pixel_change < 0.005
    calm = (
        f" ({stats.changed[quiet].mean():.1f} when under 0.5% of the pixels change)"
        if quiet.any()
        else ""
    )
    return (
        f"{name}: between consecutive real frames {stats.changed.mean():.1f} of the "
        f"{stats.categoricals} categoricals change their argmax"
        f"{calm}, while two posterior samples of the same frame "
        f"differ in {stats.resampled:.1f}. Each categorical changes on "
        f"{stats.change_rate.min():.0%}-{stats.change_rate.max():.0%} of the steps. "
        f"The prior gets {stats.errors_per_frame:.1f} "
        f"categoricals of each next frame wrong, {stats.errors_on_change_per_frame:.1f} of "
        f"them ones that change; of all changes it predicts {stats.accuracy_on_changes:.0%} "
        f"(copying the last token: 0%)."
    )
