"""Every figure function runs headless on tiny inputs and returns a Figure."""

from __future__ import annotations

import io
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib import animation
from matplotlib.figure import Figure

from storm_lib import plots
from storm_lib.diagnostics import SlidingWindowLoss
from storm_lib.evaluate import RolloutPSNR, StepStats

H, S = 4, 8


def _stats(level: float) -> StepStats:
    rng = np.random.default_rng(0)
    return StepStats.from_values(level - np.arange(H) + rng.normal(0, 0.5, (6, H)))


def _history(offset: float) -> SimpleNamespace:
    train = [
        {"step": s, "time": 0.1 * s, "loss/total": 5 - 0.1 * s + offset, "token_nll": 3 - 0.05 * s}
        for s in range(1, 21)
    ]
    val = [
        {"step": s, "time": 0.1 * s, "loss/total": 5.5 - 0.1 * s + offset, "token_nll": 3.1}
        for s in (5, 10, 20)
    ]
    return SimpleNamespace(train=train, val=val)


def _check(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    assert fig.dpi == plots.DPI
    fig.savefig(io.BytesIO(), format="png")  # renders every artist


def _result(mode: str) -> RolloutPSNR:
    return RolloutPSNR(
        models={"STORM": _stats(30), "RSSM": _stats(28)},
        ceilings={"STORM": _stats(33), "RSSM": _stats(32)},
        baselines={"copy-last": _stats(25), "context mean": _stats(20)},
        entropy={"STORM": 0.5},
        context=8,
        horizon=H,
        seed=0,
        mode=mode,
    )


def test_psnr_vs_horizon() -> None:
    fig = plots.plot_psnr_vs_horizon({"mode": _result("mode"), "sample": _result("sample")})
    _check(fig)
    assert len(fig.axes) == 2 and fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    assert "argmax" in fig.axes[0].get_title() and "posterior sample" in fig.axes[1].get_title()
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert {"STORM", "RSSM ceiling", "copy-last", "context mean"} <= set(labels)
    _check(plots.plot_psnr_vs_horizon(_result("mode")))  # one mode, one panel


def test_action_sensitivity() -> None:
    sens = SimpleNamespace(real=_stats(30), shuffled=_stats(28), between=_stats(35))
    fig = plots.plot_action_sensitivity({"STORM": sens, "RSSM": sens})
    _check(fig)
    assert len(fig.axes[0].lines) == 4 and len(fig.axes[1].lines) == 2


def test_history_figures() -> None:
    histories = {"STORM": _history(0.0), "RSSM": _history(0.3)}
    fig = plots.plot_val_loss_vs_time(histories)
    _check(fig)
    assert len(fig.axes[0].lines) == 2
    _check(plots.plot_training_curves(histories["STORM"]))
    fig = plots.plot_training_curves(histories, metrics=("token_nll", "loss/reward"))
    _check(fig)
    assert len(fig.axes) == 2  # a metric with no data still gets its (empty) panel


def test_step_time() -> None:
    lengths = [16, 32, 64]
    timings = {
        "STORM": {"lengths": lengths, "ms_per_step": [10, 21, 45], "mode": "train"},
        "RSSM": {"lengths": lengths, "ms_per_step": [12, 24, 48], "mode": "train"},
    }
    fig = plots.plot_step_time(timings)
    _check(fig)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].lines) == 4


def test_frame_grids() -> None:
    obs = torch.rand(2, 3, 3, S, S)
    _check(plots.plot_reconstructions(obs, obs.flip(-1), n=4))
    truth = torch.rand(H, 3, S, S)
    rollouts = {"STORM": torch.rand(H, 3, S, S), "RSSM": np.random.rand(H, 3, S, S)}
    fig = plots.plot_rollout_grid(truth, rollouts, context=torch.rand(3, S, S))
    _check(fig)
    assert len(fig.axes) == 3 * (H + 1)
    with pytest.raises(ValueError, match=r"\[3, S, S\]"):
        plots.plot_rollout_grid(torch.rand(H, 1, S, S), rollouts)


def test_animation() -> None:
    anim = plots.rollout_animation(torch.rand(2, 3, S, S), {"STORM": torch.rand(2, 3, S, S)})
    assert isinstance(anim, animation.FuncAnimation)
    html = plots.animation_html(anim)
    assert "<script" in html and "img" in html.lower()


def test_attention_token_mask() -> None:
    maps = torch.softmax(torch.randn(2, 1, 2, 5, 5), -1)
    _check(plots.plot_attention(maps))
    fig = plots.plot_attention(maps, per_head=True)
    _check(fig)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    _check(plots.plot_attention(maps[0, 0]))
    token = torch.nn.functional.one_hot(torch.arange(32) % 32, 32).float()
    fig = plots.plot_token(token)
    _check(fig)
    assert len(fig.axes[0].texts) == 32
    _check(plots.plot_token(torch.log_softmax(torch.randn(32, 32), -1)))
    _check(plots.plot_causal_mask(6))


def test_diagnostics() -> None:
    steps = np.arange(1, H + 1)
    gap = {
        "steps": steps,
        "teacher_forced": np.full(H, 30.0),
        "teacher_forced_hw": np.full(H, 0.5),
        "free_running": 30.0 - steps,
        "free_running_hw": np.full(H, 0.5),
        "gap": steps.astype(float),
    }
    _check(plots.plot_teacher_forcing_gap(gap, name="STORM"))
    _check(plots.plot_sliding_window({20: 1.2, 50: float("nan")}))
    result = SlidingWindowLoss(
        nll={20: 1.2, 50: 1.4},
        per_position={20: np.linspace(2, 1, 19), 50: np.linspace(2, 1.3, 49)},
    )
    fig = plots.plot_sliding_window(result)
    _check(fig)
    assert len(fig.axes) == 2


def test_grid_animation_rows_captions_and_equal_lengths() -> None:
    panels = {name: torch.rand(3, 3, S, S) for name in ("a", "b", "c")}
    captions = {name: [f"{name} {k}" for k in range(3)] for name in panels}
    anim = plots.grid_animation(panels, cols=2, captions=captions)
    fig = anim._fig
    assert len(fig.axes) == 4 and not fig.axes[3].axison  # 2 x 2, the spare panel blank
    anim._func(2)
    assert fig.axes[1].get_xlabel() == "b 2" and fig.texts[0].get_text() == "step 3"
    assert "<script" in plots.animation_html(anim)
    with pytest.raises(ValueError, match="same number of frames"):
        plots.grid_animation({"a": torch.rand(2, 3, S, S), "b": torch.rand(3, 3, S, S)})


def test_results_comparison_draws_each_model_of_each_run() -> None:
    def doc(level: float) -> dict:
        stats = {"mean": [level, level - 1, level - 2], "half_width": [0.5, None, 0.5], "n": 4}
        model = {"psnr": {"mode": stats, "sample": stats}}
        return {"models": {"STORM": model, "RSSM": model}}

    fig = plots.plot_results_comparison({"cpu": doc(30), "gpu": doc(31)})
    _check(fig)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["cpu / STORM", "cpu / RSSM", "gpu / STORM", "gpu / RSSM"]
    assert list(fig.axes[0].lines[2].get_ydata()) == [31, 30, 29]
