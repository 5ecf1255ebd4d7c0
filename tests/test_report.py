"""The closing paragraph is computed from the numbers: different numbers, different words."""

from __future__ import annotations

import numpy as np

from storm_lib.evaluate import RolloutPSNR, StepStats
from storm_lib.report import comparison_paragraph
from storm_lib.train import History


def result(storm_db: float, rssm_db: float, spread: float = 0.0) -> RolloutPSNR:
    steps = np.arange(10)
    noise = spread * np.array([[-1.0], [1.0], [-1.0], [1.0]])  # per-window scatter
    row = lambda start: StepStats.from_values(start - 0.5 * steps + noise)  # noqa: E731
    return RolloutPSNR(
        models={"STORM": row(storm_db), "RSSM": row(rssm_db)},
        ceilings={"STORM": row(40.0), "RSSM": row(40.0)},
        copy_last=row(28.0),
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
