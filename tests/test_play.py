"""Playing inside STORM: ImaginedGame without a UI, its front ends, and the scripted demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from storm_lib import play_ui
from storm_lib.config import get_profile
from storm_lib.models import build_world_model
from storm_lib.play import ImaginedGame, scripted_demo
from storm_lib.utils import evaluating

SMOKE = get_profile("smoke")
MEANINGS = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN"]
C = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_world_model("storm", SMOKE, len(MEANINGS), "cpu")


@pytest.fixture(scope="module")
def context() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    obs = torch.rand(C + 12, 3, 64, 64, generator=g)
    return obs, torch.randint(0, len(MEANINGS), (C + 12,), generator=g)


def _game(model, context, **kwargs) -> ImaginedGame:
    obs, actions = context
    return ImaginedGame(model, obs[:C], actions[:C], action_meanings=MEANINGS, **kwargs)


def _play(game: ImaginedGame, actions) -> list[tuple[torch.Tensor, float, float]]:
    return [tuple(game.step(a)) for a in actions]


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b, strict=True))


ACTIONS = [4, 4, "RIGHT", 0, 1, 5]


def test_argmax_games_are_deterministic(model, context) -> None:
    first, second = _game(model, context), _game(model, context)
    assert _same(_play(first, ACTIONS), _play(second, ACTIONS))
    sampled = [_play(_game(model, context, mode="sample", seed=s), ACTIONS) for s in (3, 3, 4)]
    assert _same(sampled[0], sampled[1])  # a seed makes sampled games repeatable
    assert not _same(sampled[0], sampled[2])


@pytest.mark.parametrize("mode", ["mode", "sample"])
def test_reset_equals_a_fresh_game(model, context, mode: str) -> None:
    game = _game(model, context, mode=mode, seed=7)
    _play(game, [1, 2, 3])
    frame = game.reset()
    assert torch.equal(frame, context[0][C - 1]) and game.steps_taken == 0
    assert _same(_play(game, ACTIONS), _play(_game(model, context, mode=mode, seed=7), ACTIONS))


@pytest.mark.parametrize("layout", ["fused", "interleaved"])
def test_cached_steps_equal_the_recomputed_rollout(model, context, layout: str) -> None:
    if layout != "fused":
        config = get_profile("smoke")
        config.transformer.token_layout = layout
        model = build_world_model("storm", config, len(MEANINGS), "cpu")
    obs, actions = context
    horizon = 8
    game = _game(model, context)
    steps = _play(game, actions[C - 1 : C - 1 + horizon])  # the recorded actions
    roll = model.imagine(obs[None, :C], actions[None, :C], actions[None, C : C + horizon - 1],
                         mode="mode", use_cache=False)  # fmt: skip
    torch.testing.assert_close(torch.stack([s[0] for s in steps]), roll.obs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor([s[1] for s in steps]), roll.reward[0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.tensor([s[2] for s in steps]), roll.cont[0], atol=1e-5, rtol=0)


def test_long_games_slide_the_window_and_match_a_full_forward_pass(model, context) -> None:
    game = _game(model, context, window=6)
    for k in range(14):  # slides at steps 3, 6, 9, 12: positions never pass 6
        z, past = game.history
        assert z.shape[1] == past.shape[1] + 1 <= 6
        a = torch.tensor([[k % len(MEANINGS)]])
        with evaluating(model):  # the same step by the uncached causal forward pass
            h = model.sequence(z, torch.cat([past, a], 1))[:, -1]
            want = model.decode(model.prior.sample(h, "mode")[:, None]).clamp(0, 1)[0, 0]
        torch.testing.assert_close(game.step(int(a)).frame, want, atol=1e-5, rtol=0)
    long = _game(model, context, window=model.max_length)
    _play(long, [0] * (model.max_length + 3))  # past max_length: it slides, no error
    assert long.history[0].shape[1] <= model.max_length


@pytest.mark.parametrize("action", [6, -1, "JUMP", 1.5, True, None])
def test_actions_outside_the_game_are_refused(model, context, action) -> None:
    game = _game(model, context)
    _play(game, [2])
    with pytest.raises(ValueError, match="action") as err:
        game.step(action)
    if not isinstance(action, float | type(None)):
        assert "0 NOOP, 1 FIRE" in str(err.value)  # says which actions there are
    assert game.steps_taken == 1  # nothing moved
    fresh = _game(model, context)
    _play(fresh, [2])
    assert _same(_play(game, [3]), _play(fresh, [3]))


def test_bad_setups_are_clear_errors(model, context) -> None:
    obs, actions = context
    with pytest.raises(ValueError, match="at most the model's max_length"):
        _game(model, context, window=model.max_length + 1)
    with pytest.raises(ValueError, match="at least the context"):
        _game(model, context, window=C - 1)
    with pytest.raises(ValueError, match="context_actions"):
        ImaginedGame(model, obs[:C], actions[: C - 1])
    with pytest.raises(ValueError, match="7 action meanings for a model of 6"):
        ImaginedGame(model, obs[:C], actions[:C], action_meanings=[*MEANINGS, "X"])
    rssm = build_world_model("rssm", SMOKE, len(MEANINGS), "cpu")
    with pytest.raises(TypeError, match="plays a STORM model"):
        ImaginedGame(rssm, obs[:C], actions[:C])


# --------------------------------------------------------------------- the front ends
def test_the_play_modules_need_no_ui_package() -> None:
    code = (
        "import sys, storm_lib.play, storm_lib.play_ui; "
        "bad = [m for m in ('ipywidgets', 'matplotlib.pyplot', 'tkinter') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_widget_steps_and_resets_the_game(model, context) -> None:
    pytest.importorskip("ipywidgets")
    game = _game(model, context)
    box = play_ui.play_widget(game)
    image, status, grid, reset = box.children
    start = image.value
    assert start == play_ui.frame_png(context[0][C - 1]) and "real context" in status.value
    assert [b.description for b in grid.children] == MEANINGS
    grid.children[MEANINGS.index("LEFT")].click()
    fresh = _game(model, context)
    frame, reward, cont = fresh.step("LEFT")
    assert image.value == play_ui.frame_png(frame) and game.steps_taken == 1
    assert f"predicted reward {reward:+.2f}" in status.value and f"{cont:.2f}" in status.value
    reset.click()
    assert image.value == start and game.steps_taken == 0


def test_key_map_plays_only_the_game_s_actions() -> None:
    keys = play_ui.key_map(MEANINGS)
    assert {k: MEANINGS[i] for k, i in keys.items()} == {
        "w": "UP", "x": "DOWN", "a": "LEFT", "d": "RIGHT", "s": "NOOP", "S": "FIRE",
        "up": "UP", "down": "DOWN", "left": "LEFT", "right": "RIGHT", " ": "FIRE",
    }  # fmt: skip
    full = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT",
            "DOWNLEFT", "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE",
            "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE"]  # fmt: skip
    keys = play_ui.key_map(full)
    assert full[keys["Q"]] == "UPLEFTFIRE" and full[keys["c"]] == "DOWNRIGHT"
    assert sorted(set(keys.values())) == list(range(18))  # every Boxing action has a key


def test_display_problem_reads_the_environment() -> None:
    assert play_ui.display_problem({}, "linux")
    assert not play_ui.display_problem({"DISPLAY": ":0"}, "linux")
    assert not play_ui.display_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert not play_ui.display_problem({}, "darwin")


def test_play_without_a_display_names_the_notebook_cell(monkeypatch, capsys) -> None:
    from storm_lib import __main__ as cli

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert cli.main(["play", "--storm", "no_such_checkpoint.pt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no display here") and "Traceback" not in err
    assert "'Play inside the world model' cells of Section 4" in err
    assert "p04_transformer_backbone.ipynb" in err


# -------------------------------------------------------------------- the scripted demo
def test_scripted_demo_replays_the_real_game_beside_the_model() -> None:
    torch.manual_seed(0)
    boxing = build_world_model("storm", SMOKE, 18, "cpu")
    kwargs = dict(steps=3, context=4, prefix=5, seed=3)
    demo = scripted_demo(boxing, **kwargs)
    again = scripted_demo(boxing, **kwargs)
    assert list(demo.real) == ["hold LEFT", "hold RIGHT"]
    assert demo.context.shape == (4, 3, 64, 64) and torch.equal(demo.context, again.context)
    for label in demo.real:
        assert demo.real[label].shape == demo.imagined[label].shape == (3, 3, 64, 64)
        assert torch.equal(demo.real[label], again.real[label])  # the same emulator replay
        assert demo.actions[label] == [label.split()[-1]] * 3
    game = ImaginedGame(boxing, demo.context, demo.context_actions, seed=3)
    frames = torch.stack([game.step(4).frame for _ in range(3)])  # Boxing's LEFT is action 4
    assert torch.equal(frames, demo.imagined["hold LEFT"])
    assert "hold LEFT vs hold RIGHT at the last step" in demo.summary()
    from storm_lib.plots import animation_gif_html

    html = animation_gif_html(demo.animation())
    assert html.startswith('<img src="data:image/gif;base64,R0lGOD')  # "GIF8" in base64


def test_the_window_s_keys_step_reset_and_close(model, context) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import KeyEvent

    game = _game(model, context)
    fig = play_ui.game_figure(game, plt)

    def press(key: str) -> None:
        fig.canvas.callbacks.process(
            "key_press_event", KeyEvent("key_press_event", fig.canvas, key)
        )

    image = fig.axes[0].images[0]
    press("a")
    left = _game(model, context).step("LEFT")
    assert game.steps_taken == 1 and "predicted reward" in fig.axes[0].get_title()
    assert np.allclose(image.get_array(), left.frame.numpy().transpose(1, 2, 0))
    press("k")  # no action: nothing happens
    assert game.steps_taken == 1
    press("r")
    assert game.steps_taken == 0 and "real context" in fig.axes[0].get_title()
    press("escape")
    assert not plt.fignum_exists(fig.number)
