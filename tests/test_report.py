"""The closing paragraph is computed from the numbers: different numbers, different words."""

from __future__ import annotations

import dataclasses

import numpy as np

from storm_lib.evaluate import ActionSensitivity, RolloutPSNR, StepStats
from storm_lib.report import comparison_paragraph, gap_decomposition
from storm_lib.train import History


def result(storm_db: float, rssm_db: float, spread: float = 0.0) -> RolloutPSNR:
    steps = np.arange(10)
    noise = spread * np.array([[-1.0], [1.0], [-1.0], [1.0]])  # per-window scatter
    row = lambda start: StepStats.from_values(start - 0.5 * steps + noise)  # noqa: E731
    return RolloutPSNR(
        models={"STORM": row(storm_db), "RSSM": row(rssm_db)},
        ceilings={"STORM": row(40.0), "RSSM": row(40.0)},
        baselines={"copy-last": row(28.0)},
        entropy={},
        context=8,
        horizon=10,
        seed=0,
        mode="sample",
    )


def history(ms_per_step: float) -> History:
    val = {"step": 100, "time": ms_per_step / 10, "loss/total": 20.0, "token_nll": 25.0}
    return History(train=[val], val=[val])


def timings(slope: float) -> dict:
    lengths = [16, 32, 64, 128, 256]
    return {"lengths": lengths, "ms_per_step": [float(n) ** slope for n in lengths]}


def test_paragraph_follows_the_numbers():
    hist = {"STORM": history(100.0), "RSSM": history(300.0)}
    text = comparison_paragraph(
        result(30.0, 26.0), hist, {"STORM": timings(1.0), "RSSM": timings(1.0)},
        {"STORM": timings(2.0), "RSSM": timings(1.0)}, fvd={"STORM": 90.0, "RSSM": 200.0},
    )  # fmt: skip
    assert "STORM beats copy-last at every step from 3 to 10" in text
    assert "RSSM does not beat copy-last" in text
    assert "at step 10 STORM is ahead by 4.0 dB" in text
    assert "STORM is above every trivial predictor at every step" in text
    assert "RSSM is matched or beaten by copy-last at steps 1-10" in text
    assert "STORM trained 3.00x faster per step" in text
    assert "quadratic cost shows" in text
    assert "90 for STORM and 200 for RSSM: STORM's imagined motion is closer" in text

    text = comparison_paragraph(
        result(26.0, 30.0), {"STORM": history(300.0), "RSSM": history(100.0)},
        {"STORM": timings(1.0), "RSSM": timings(1.0)},
        {"STORM": timings(1.0), "RSSM": timings(1.0)},
    )  # fmt: skip
    assert "STORM does not beat copy-last" in text and "RSSM is ahead by 4.0 dB" in text
    assert "RSSM trained 3.00x faster" in text and "quadratic cost does not show" in text


def test_overlapping_intervals_are_not_called_a_lead():
    timing = {"STORM": timings(1.0), "RSSM": timings(1.0)}
    text = comparison_paragraph(result(24.5, 24.3, spread=1.0), {}, timing)
    assert "overlap within their 95% intervals (STORM ahead by 0.2 dB)" in text
    text = comparison_paragraph(result(24.5, 24.3), {}, timing)
    assert "at step 10 STORM is ahead by 0.2 dB" in text


def test_both_modes_gap_decomposition_and_actions_follow_the_numbers():
    top = dataclasses.replace(result(30.0, 26.0), mode="mode")
    low = result(29.0, 25.5)  # sampled: 1 dB and 0.5 dB lower
    low.ceilings["STORM"] = StepStats.from_values(np.full((4, 10), 39.5))
    top.entropy["STORM"] = 0.52
    text = gap_decomposition({"mode": top, "sample": low}, "STORM")
    assert "10.0 dB under its argmax ceiling (30.0 vs 40.0 dB" in text
    assert "sampling the prior moves it by -1.0 dB" in text
    assert "moves the ceiling by -0.5 dB (39.5 dB, posterior entropy 0.52 nats" in text
    flat = StepStats.from_values(np.full((4, 10), 25.0))
    sens = {
        "STORM": ActionSensitivity(real=flat, shuffled=flat, between=flat),
        "RSSM": ActionSensitivity(
            real=flat, shuffled=StepStats.from_values(np.full((4, 10), 23.0)), between=flat
        ),
    }
    timing = {"STORM": timings(1.0), "RSSM": timings(1.0)}
    para = comparison_paragraph({"sample": low, "mode": top}, {}, timing, sensitivity=sens)
    assert para.startswith("On 4 held-out windows with argmax latents, STORM's imagined frames")
    assert "With sampled latents they score 29.0 and 24.5 dB (STORM)" in para
    assert "STORM's real-action rollouts score +0.0 dB" in para
    assert "RSSM's real-action rollouts score +2.0 dB" in para


def test_paragraph_says_where_a_baseline_wins_and_what_the_tokens_show():
    from storm_lib.diagnostics import TokenStatistics

    res = result(30.0, 29.0)
    mean = res.baselines["copy-last"].values.copy()
    mean[:, 2:5] = 40.0  # the baseline wins at steps 3-5 only
    res.baselines["context mean"] = StepStats.from_values(mean)
    timing = {"STORM": timings(1.0), "RSSM": timings(1.0)}

    def tokens(hit_on_change: float) -> TokenStatistics:
        k = 4
        return TokenStatistics(
            pixel_change=np.full(10, 0.02), changed=np.full(10, 2.0), resampled=1.0,
            change_rate=np.full(k, 0.5), accuracy=np.full(k, 0.75),
            accuracy_on_change=np.full(k, hit_on_change), accuracy_on_stay=np.ones(k),
            entropy=np.zeros(k),
        )  # fmt: skip

    both = {"STORM": tokens(0.5), "RSSM": tokens(0.25)}
    text = comparison_paragraph(res, {}, timing, tokens=both)
    assert "STORM is matched or beaten by context mean at steps 3-5" in text
    assert "copy-last" not in text.split("STORM is matched")[1].split(", and RSSM")[0]
    assert "STORM's prior predicts 50% of those changes and RSSM's 25%" in text
    assert "2.0 (STORM) and 2.0 (RSSM) of the 4 categoricals" in text
    assert "get 1.0 and 1.0 categoricals of each next frame wrong" in text
