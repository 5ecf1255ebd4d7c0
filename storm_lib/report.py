"""The notebook's closing paragraph, written from this run's numbers.

Every figure quoted comes from the objects passed in, and every comparison word
("higher", "beats", "faster") is chosen by comparing those numbers, so a re-run with
other results cannot leave a stale claim behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .diagnostics import QUADRATIC_SLOPE, TokenStatistics, loglog_slope
from .evaluate import NO_MODE, ActionSensitivity, RolloutPSNR

HEADLINE_MODE = "mode"
"""Section 4's headline: argmax rollouts, deterministic, so they measure the dynamics alone
(a sampled rollout can be a plausible future and still score below the blurrier mean)."""


def headline(results: RolloutPSNR | Mapping[str, RolloutPSNR]) -> RolloutPSNR:
    """The argmax result of ``{mode: RolloutPSNR}`` (or the one result given)."""
    if isinstance(results, RolloutPSNR):
        return results
    return results.get(HEADLINE_MODE) or next(iter(results.values()))


def _beats_copy_last(result: RolloutPSNR, name: str, from_step: int = 3) -> str:
    mean, base = result.models[name].mean, result.copy_last.mean
    steps = np.arange(1, result.horizon + 1)
    wins = steps[(steps >= from_step) & (mean > base)]
    margin = mean - base
    if len(wins) == int((steps >= from_step).sum()):
        least = float(margin[steps >= from_step].min())
        return (
            f"beats copy-last at every step from {from_step} to {result.horizon} "
            f"(by {margin[0]:+.1f} dB at step 1 and at least {least:.1f} dB from step {from_step})"
        )
    if len(wins) == 0:
        return f"does not beat copy-last at any step from {from_step} on"
    return f"beats copy-last at steps {', '.join(map(str, wins))} only"


def gap_numbers(results: Mapping[str, RolloutPSNR], name: str) -> dict[str, float] | None:
    """The step-1 figures :func:`gap_decomposition` states, in dB (None for a model without
    ceilings): the rollouts and ceilings of both modes, and the three parts, ``dynamics``
    (argmax ceiling - argmax rollout), ``prior_sampling`` (sampled - argmax rollout) and
    ``posterior_sampling`` (sample - argmax ceiling)."""
    top, low = results["mode"], results["sample"]
    if name not in top.ceilings or name not in low.ceilings:
        return None
    ceil_a, ceil_s = float(top.ceilings[name].mean[0]), float(low.ceilings[name].mean[0])
    roll_a, roll_s = float(top.models[name].mean[0]), float(low.models[name].mean[0])
    return {
        "argmax_rollout": roll_a,
        "sampled_rollout": roll_s,
        "argmax_ceiling": ceil_a,
        "sample_ceiling": ceil_s,
        "dynamics": ceil_a - roll_a,
        "prior_sampling": roll_s - roll_a,
        "posterior_sampling": ceil_s - ceil_a,
    }


def gap_decomposition(results: Mapping[str, RolloutPSNR], name: str) -> str:
    """Where a model's step-1 shortfall comes from, from its argmax and sampled results:
    the dynamics (argmax ceiling - argmax rollout), sampling the prior (argmax rollout -
    sampled rollout) and sampling the posterior (argmax ceiling - sample ceiling). For a
    model that takes no mode, only the first, and the reason."""
    gap = gap_numbers(results, name)
    if gap is None:
        return f"{name}: it has no reconstruct(), so no ceiling to split its gap against."
    if name in results["mode"].mode_ignored:
        return (
            f"{name}: at step 1 its rollout is {gap['dynamics']:.1f} dB under its ceiling "
            f"({gap['argmax_rollout']:.1f} vs {gap['argmax_ceiling']:.1f} dB); it takes no "
            f"mode, so {NO_MODE}, and what sampling the prior and the posterior cost it was "
            "not measured."
        )
    entropy = results["mode"].entropy.get(name)
    ent = f", posterior entropy {entropy:.2f} nats per categorical" if entropy is not None else ""
    return (
        f"{name}: at step 1 its argmax rollout is {gap['dynamics']:.1f} dB under its argmax "
        f"ceiling ({gap['argmax_rollout']:.1f} vs {gap['argmax_ceiling']:.1f} dB: the "
        f"dynamics); sampling the prior moves it by {gap['prior_sampling']:+.1f} dB and "
        f"sampling the posterior moves the ceiling by {gap['posterior_sampling']:+.1f} dB "
        f"({gap['sample_ceiling']:.1f} dB{ent})."
    )


MIXED_DISTANCE = (
    "it takes no mode, so where it samples, that distance mixes its sampling noise with "
    "the actions' effect"
)
"""Said of the action-sensitivity distance of a model whose ``imagine`` takes no mode."""


def ms_per_training_step(history: Any) -> float | None:
    """Training milliseconds per step at the last validation of a ``History`` (training
    wall-clock, validation excluded); None for a history without validations."""
    if history is None or not history.val:
        return None
    last = history.val[-1]
    return 1000 * last["time"] / max(last["step"], 1)


def _uses_actions(
    sens: Mapping[str, ActionSensitivity], a: str, b: str, no_mode: tuple[str, ...] = ()
) -> str:
    parts = []
    for name in (a, b):
        s = sens[name]
        gain = float(s.real.mean[-1] - s.shuffled.mean[-1])
        apart = float(s.between.mean[-1])
        parts.append(
            f"{name}'s real-action rollouts score {gain:+.1f} dB against shuffled-action ones "
            f"at the last step, where the two rollouts are {apart:.1f} dB apart"
            + (f" ({MIXED_DISTANCE})" if name in no_mode else "")
        )
    return "Under the future actions of another window, " + "; ".join(parts) + "."


def _under_baselines(result: RolloutPSNR, name: str) -> str:
    """Where a trivial predictor scores at least as well as the model, as a clause."""
    mean, steps = result.models[name].mean, result.steps
    lost = {
        base: [int(k) for k in steps[stats.mean >= mean]]
        for base, stats in result.baselines.items()
        if (stats.mean >= mean).any()
    }
    if not lost:
        return f"{name} is above every trivial predictor at every step"
    where = "; ".join(
        f"{base} at step{'s' * (len(ks) > 1)} {_steps(ks)}" for base, ks in lost.items()
    )
    return f"{name} is matched or beaten by {where}"


def _steps(steps: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for k in steps:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def _tokens_sentence(tokens: Mapping[str, TokenStatistics], a: str, b: str) -> str:
    ta, tb = tokens[a], tokens[b]
    return (
        f"Between consecutive real frames, {ta.changed.mean():.1f} ({a}) and "
        f"{tb.changed.mean():.1f} ({b}) of the {ta.categoricals} categoricals change their "
        f"argmax; teacher-forced, {a}'s prior predicts {ta.accuracy_on_changes:.0%} of those "
        f"changes and {b}'s {tb.accuracy_on_changes:.0%}, so they get "
        f"{ta.errors_per_frame:.1f} and {tb.errors_per_frame:.1f} categoricals of each next "
        "frame wrong: what the moving boxers do next is what neither predicts well."
    )


def _gap_at_last_step(result: RolloutPSNR, a: str, b: str) -> str:
    """Who is ahead at the last step, and whether the 95% intervals separate them."""
    ra, rb = result.models[a], result.models[b]
    diff = float(ra.mean[-1] - rb.mean[-1])
    better = a if diff > 0 else b
    if abs(diff) <= float(ra.half_width[-1] + rb.half_width[-1]):
        return (
            f"at step {result.horizon} the two overlap within their 95% intervals "
            f"({better} ahead by {abs(diff):.1f} dB)"
        )
    return f"at step {result.horizon} {better} is ahead by {abs(diff):.1f} dB"


def comparison_paragraph(
    results: RolloutPSNR | Mapping[str, RolloutPSNR],
    histories: Mapping[str, Any],
    timings: Mapping[str, Mapping[str, Any]],
    sequence_timings: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    fvd: Mapping[str, float] | None = None,
    sensitivity: Mapping[str, ActionSensitivity] | None = None,
    names: tuple[str, str] = ("STORM", "RSSM"),
    timing_names: tuple[str, str] | None = None,
    tokens: Mapping[str, TokenStatistics] | None = None,
) -> str:
    """A paragraph comparing the two architectures from measured results.

    Args:
        results: :func:`storm_lib.evaluate.rollout_psnr` for both models, one result or
            ``{mode: result}`` with the argmax (``"mode"``, the headline) and sampled runs.
        histories: ``{name: History}`` of training (an empty history is allowed for a
            loaded P03 checkpoint without one).
        timings: ``{name: step_time_vs_length(...)}`` for both backbones.
        sequence_timings: the same with ``part="sequence"`` (the sequence model alone).
        fvd: ``{name: FVD}`` on the same windows, if measured.
        sensitivity: :func:`storm_lib.evaluate.action_sensitivity` for both models.
        names: the transformer model's name, then the RSSM's.
        timing_names: the keys of ``timings`` when they are not ``names``: a student's
            model is not timed, so its row is this library's RSSM (and the sentence says so).
        tokens: ``{name: diagnostics.token_statistics(...)}`` for both models, if measured.
    """
    a, b = names
    result = headline(results)
    last = result.horizon
    pa, pb = result.models[a].mean, result.models[b].mean
    ha, hb = result.models[a].half_width, result.models[b].half_width
    cl = result.copy_last.mean
    latents = "argmax" if result.mode == "mode" else "sampled"

    def ceiling(name: str) -> str:
        stats = result.ceilings.get(name)
        return f"ceiling {stats.mean.mean():.1f} dB" if stats else "no ceiling: no reconstruct()"

    parts = [
        f"On {result.copy_last.n} held-out windows with {latents} latents, {a}'s imagined "
        f"frames score {pa[0]:.1f} ± {ha[0]:.1f} dB at step 1 and {pa[-1]:.1f} ± {ha[-1]:.1f} "
        f"dB at step {last} ({ceiling(a)}); {b}'s score {pb[0]:.1f} ± {hb[0]:.1f} and "
        f"{pb[-1]:.1f} ± {hb[-1]:.1f} dB ({ceiling(b)}); copying the last context frame "
        f"gives {cl[0]:.1f} and {cl[-1]:.1f} dB.",
        f"{a} {_beats_copy_last(result, a)}, and {b} {_beats_copy_last(result, b)}; "
        f"{_gap_at_last_step(result, a, b)}.",
        f"{_under_baselines(result, a)}, and {_under_baselines(result, b)}.",
    ]
    if not isinstance(results, RolloutPSNR) and {"mode", "sample"} <= set(results):
        sampled = results["sample"]
        sa, sb = sampled.models[a].mean, sampled.models[b].mean
        parts.append(
            f"With sampled latents they score {sa[0]:.1f} and {sa[-1]:.1f} dB ({a}) and "
            f"{sb[0]:.1f} and {sb[-1]:.1f} dB ({b}); {_gap_at_last_step(sampled, a, b)}."
        )
    if tokens and a in tokens and b in tokens:
        parts.append(_tokens_sentence(tokens, a, b))
    if sensitivity:
        parts.append(_uses_actions(sensitivity, a, b, result.mode_ignored))
    if fvd and a in fvd and b in fvd:  # a model left out of FVD (its code failed): no sentence
        lower = min(fvd, key=fvd.get)
        parts.append(
            f"FVD of the {result.context}+{result.horizon}-frame clips is {fvd[a]:.0f} for {a} "
            f"and {fvd[b]:.0f} for {b}: {lower}'s imagined motion is closer to the real one."
        )
    ha, hb = histories.get(a), histories.get(b)
    if ha is not None and hb is not None and ha.val and hb.val:
        va, vb = ha.val[-1], hb.val[-1]
        ms_a, ms_b = ms_per_training_step(ha), ms_per_training_step(hb)
        faster = a if ms_a < ms_b else b
        parts.append(
            f"Trained for {va['step']} and {vb['step']} steps, their final validation losses "
            f"are {va['loss/total']:.1f} ({a}) and {vb['loss/total']:.1f} ({b}), with token "
            f"prediction losses of {va['token_nll']:.1f} and {vb['token_nll']:.1f} nats per "
            f"frame; a training step took {ms_a:.0f} ms for {a} and {ms_b:.0f} ms for {b}, "
            f"so {faster} trained {max(ms_a, ms_b) / min(ms_a, ms_b):.2f}x faster per step."
        )
    timed = timing_names or names
    cost = _cost_sentence(timings, sequence_timings, *timed)
    if tuple(timed) != tuple(names):
        cost = (
            f"These timings are of this library's {' and '.join(timed)} ({b} was not timed). {cost}"
        )
    parts.append(cost)
    return " ".join(parts)


def _cost_sentence(
    timings: Mapping[str, Mapping[str, Any]],
    sequence_timings: Mapping[str, Mapping[str, Any]] | None,
    a: str,
    b: str,
) -> str:
    ta, tb = timings[a], timings[b]
    lengths = ta["lengths"]
    slope_a = loglog_slope(lengths, ta["ms_per_step"])
    slope_b = loglog_slope(tb["lengths"], tb["ms_per_step"])
    text = (
        f"Over sequence lengths {lengths[0]}-{lengths[-1]}, a whole training step grows with "
        f"log-log slope {slope_a:.2f} for {a} and {slope_b:.2f} for {b} (1 = linear, "
        f"2 = quadratic)"
    )
    if not sequence_timings:
        return text + "."
    sa = sequence_timings[a]
    tail = loglog_slope(sa["lengths"][-2:], sa["ms_per_step"][-2:])
    share = [
        s / w for s, w in zip(sa["ms_per_step"], ta["ms_per_step"], strict=True)
    ]  # the Transformer's share of the whole step, per length
    seen = "shows" if tail > QUADRATIC_SLOPE else "does not show"
    return text + (
        f"; the Transformer alone has slope {tail:.2f} between {sa['lengths'][-2]} and "
        f"{sa['lengths'][-1]} steps and is {100 * share[0]:.0f}% of the step at "
        f"{lengths[0]} steps, {100 * share[-1]:.0f}% at {lengths[-1]}, so attention's "
        f"quadratic cost {seen} at these lengths, while the per-frame VAE work sets the "
        f"price of a step at the training length."
    )
