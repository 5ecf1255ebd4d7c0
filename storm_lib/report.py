"""The notebook's closing paragraph, written from this run's numbers.

Every figure quoted comes from the objects passed in, and every comparison word
("higher", "beats", "faster") is chosen by comparing those numbers, so a re-run with
other results cannot leave a stale claim behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .diagnostics import QUADRATIC_SLOPE, loglog_slope
from .evaluate import RolloutPSNR


def _beats_copy_last(result: RolloutPSNR, name: str, from_step: int = 3) -> str:
    mean, base = result.models[name].mean, result.copy_last.mean
    steps = np.arange(1, result.horizon + 1)
    wins = steps[(steps >= from_step) & (mean > base)]
    if len(wins) == int((steps >= from_step).sum()):
        return f"beats copy-last at every step from {from_step} to {result.horizon}"
    if len(wins) == 0:
        return f"does not beat copy-last at any step from {from_step} on"
    return f"beats copy-last at steps {', '.join(map(str, wins))} only"


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
    result: RolloutPSNR,
    histories: Mapping[str, Any],
    timings: Mapping[str, Mapping[str, Any]],
    sequence_timings: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    fvd: Mapping[str, float] | None = None,
    names: tuple[str, str] = ("STORM", "RSSM"),
) -> str:
    """A paragraph comparing the two architectures from measured results.

    Args:
        result: :func:`storm_lib.evaluate.rollout_psnr` for both models.
        histories: ``{name: History}`` of training (an empty history is allowed for a
            loaded P03 checkpoint without one).
        timings: ``{name: step_time_vs_length(...)}`` for both backbones.
        sequence_timings: the same with ``part="sequence"`` (the sequence model alone).
        fvd: ``{name: FVD}`` on the same windows, if measured.
        names: the transformer model's name, then the RSSM's.
    """
    a, b = names
    last = result.horizon
    pa, pb = result.models[a].mean, result.models[b].mean
    cl = result.copy_last.mean
    parts = [
        f"On {result.copy_last.n} held-out windows, {a}'s imagined frames score "
        f"{pa[0]:.1f} dB at step 1 and {pa[-1]:.1f} dB at step {last} "
        f"(ceiling {result.ceilings[a].mean.mean():.1f} dB); {b}'s score {pb[0]:.1f} and "
        f"{pb[-1]:.1f} dB (ceiling {result.ceilings[b].mean.mean():.1f} dB); copying the last "
        f"context frame gives {cl[0]:.1f} and {cl[-1]:.1f} dB.",
        f"{a} {_beats_copy_last(result, a)}, and {b} {_beats_copy_last(result, b)}; "
        f"{_gap_at_last_step(result, a, b)}.",
    ]
    if fvd:
        lower = min(fvd, key=fvd.get)
        parts.append(
            f"FVD of the {result.context}+{result.horizon}-frame clips is {fvd[a]:.0f} for {a} "
            f"and {fvd[b]:.0f} for {b}: {lower}'s imagined motion is closer to the real one."
        )
    ha, hb = histories.get(a), histories.get(b)
    if ha is not None and hb is not None and ha.val and hb.val:
        va, vb = ha.val[-1], hb.val[-1]
        ms_a = 1000 * va["time"] / max(va["step"], 1)
        ms_b = 1000 * vb["time"] / max(vb["step"], 1)
        faster = a if ms_a < ms_b else b
        parts.append(
            f"Trained for {va['step']} and {vb['step']} steps, their final validation losses "
            f"are {va['loss/total']:.1f} ({a}) and {vb['loss/total']:.1f} ({b}), with token "
            f"prediction losses of {va['token_nll']:.1f} and {vb['token_nll']:.1f} nats per "
            f"frame; a training step took {ms_a:.0f} ms for {a} and {ms_b:.0f} ms for {b}, "
            f"so {faster} trained {max(ms_a, ms_b) / min(ms_a, ms_b):.2f}x faster per step."
        )
    parts.append(_cost_sentence(timings, sequence_timings, a, b))
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
