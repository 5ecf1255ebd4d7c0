"""Front ends of :class:`storm_lib.play.ImaginedGame`: a notebook widget and a desktop window.

Both are thin: they show the game's frame, predicted reward and continuation, and turn a
button or a key into ``game.step(action)``. ipywidgets (the widget) and a GUI backend of
Matplotlib (the window) are imported only when used, so neither is needed otherwise.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import numpy as np

from .play import ImaginedGame

NOTEBOOK_CELL = (
    "the 'Play inside the world model' cells of Section 4 in p04_transformer_backbone.ipynb "
    "(storm_lib.play_ui.play_widget)"
)
"""Where to play when no desktop window can open."""

DIRECTION_KEYS = {
    "w": "UP", "x": "DOWN", "a": "LEFT", "d": "RIGHT", "s": "NOOP",
    "q": "UPLEFT", "e": "UPRIGHT", "z": "DOWNLEFT", "c": "DOWNRIGHT",
    "up": "UP", "down": "DOWN", "left": "LEFT", "right": "RIGHT", " ": "FIRE",
}  # fmt: skip
"""Keys of the desktop window and the ALE action each plays (where the game has it). The
letters lie around ``s`` as the directions do; with shift, a letter adds FIRE."""
RESET_KEY, QUIT_KEY = "r", "escape"


def key_map(meanings: list[str]) -> dict[str, int]:
    """Key name (as Matplotlib reports it) -> action index, for the actions the game has.

    ``"W"`` (shift+w) plays ``UPFIRE``, ``"S"`` plays ``FIRE``, and so on.
    """
    keys = {}
    for key, meaning in DIRECTION_KEYS.items():
        if meaning in meanings:
            keys[key] = meanings.index(meaning)
        fire = "FIRE" if meaning == "NOOP" else f"{meaning}FIRE"
        if len(key) == 1 and key.isalpha() and fire in meanings:
            keys[key.upper()] = meanings.index(fire)
    return keys


def frame_png(frame: Any, scale: int = 4) -> bytes:
    """A ``[3, S, S]`` frame in [0, 1] as PNG bytes, each pixel a ``scale`` x ``scale`` block."""
    from PIL import Image

    x = np.asarray(frame, dtype=np.float32).clip(0.0, 1.0).transpose(1, 2, 0)
    image = Image.fromarray((x * 255).round().astype(np.uint8))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _status(game: ImaginedGame, reward: float | None = None, cont: float | None = None) -> str:
    head = f"step {game.steps_taken} ({'argmax' if game.mode == 'mode' else 'sampled'} latents)"
    if reward is None or cont is None:
        return f"{head}: the last real context frame; choose an action"
    return f"{head}: predicted reward {reward:+.2f}, continuation probability {cont:.2f}"


def play_widget(game: ImaginedGame, *, scale: int = 4, columns: int = 6) -> Any:
    """The game as ipywidgets: the imagined frame, the predictions, one button per
    action (named by its meaning) and Reset (back to the real context).

    Raises:
        ImportError: ipywidgets is not installed (the message says how to install it).
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        raise ImportError(
            "the play widget needs ipywidgets: pip install ipywidgets "
            "(or pip install -r requirements-notebook.txt)"
        ) from None

    image = widgets.Image(value=frame_png(game.reset(), scale), format="png")
    status = widgets.Label(value=_status(game))

    def take(index: int) -> None:
        frame, reward, cont = game.step(index)
        image.value = frame_png(frame, scale)
        status.value = _status(game, reward, cont)

    def reset(_: Any = None) -> None:
        image.value = frame_png(game.reset(), scale)
        status.value = _status(game)

    buttons = []
    for index, meaning in enumerate(game.action_meanings):
        button = widgets.Button(description=meaning, layout=widgets.Layout(width="105px"))
        button.on_click(lambda _, index=index: take(index))
        buttons.append(button)
    again = widgets.Button(description="Reset", button_style="warning")
    again.on_click(reset)
    grid = widgets.GridBox(
        buttons, layout=widgets.Layout(grid_template_columns=f"repeat({columns}, 110px)")
    )
    return widgets.VBox([image, status, grid, again])


def display_problem(environ: dict[str, str] | None = None, platform: str | None = None) -> str:
    """Why no desktop window can open here, or ``""`` when one can (macOS and Windows
    always have a display; elsewhere X11 or Wayland must be named in the environment)."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if platform.startswith(("darwin", "win")) or environ.get("DISPLAY"):
        return ""
    if environ.get("WAYLAND_DISPLAY"):
        return ""
    return "no display here (neither DISPLAY nor WAYLAND_DISPLAY is set)"


NON_INTERACTIVE = ("agg", "pdf", "ps", "svg", "cairo", "template", "inline")
"""Matplotlib backends (names containing these) that cannot open a window."""


def _interactive_pyplot() -> Any:
    """``matplotlib.pyplot`` on a backend that opens windows: the configured one when it
    can, else TkAgg (it ships with most Pythons), else QtAgg."""
    import matplotlib

    current = matplotlib.get_backend().lower()
    if not any(name in current for name in NON_INTERACTIVE):
        import matplotlib.pyplot as plt

        return plt
    for backend in ("TkAgg", "QtAgg"):
        try:
            matplotlib.use(backend, force=True)
        except (ImportError, ValueError):
            continue
        import matplotlib.pyplot as plt

        return plt
    raise RuntimeError(
        f"no Matplotlib backend here can open a window (tried TkAgg, QtAgg): play in the "
        f"notebook instead, {NOTEBOOK_CELL}"
    )


def play_window(game: ImaginedGame, *, scale: float = 5.0) -> None:
    """Play in a desktop Matplotlib window until it is closed (Esc closes it).

    Keys: :data:`DIRECTION_KEYS` (arrows, space, and the letters around ``s``; shift adds
    FIRE), ``r`` resets to the real context.

    Raises:
        RuntimeError: no display, or no interactive Matplotlib backend; the message names
            the notebook cell to play in instead.
    """
    problem = display_problem()
    if problem:
        raise RuntimeError(f"{problem}: play in the notebook instead, {NOTEBOOK_CELL}")
    plt = _interactive_pyplot()
    quiet = {name: [] for name in plt.rcParams if name.startswith("keymap.")}
    with plt.rc_context(quiet):  # our keys, not Matplotlib's shortcuts (s saves, q quits...)
        game_figure(game, plt, scale=scale)
        plt.show()


def game_figure(game: ImaginedGame, plt: Any, *, scale: float = 5.0) -> Any:
    """The window's figure (made with ``plt``, i.e. ``matplotlib.pyplot``), its keys
    connected to ``game``: the frame, the predictions in the title, the keys below."""
    keys = key_map(game.action_meanings)
    side = scale * game.frame.shape[-1] / 100
    fig, ax = plt.subplots(figsize=(side, side + 0.8))
    shown = ax.imshow(np.asarray(game.reset()).transpose(1, 2, 0), interpolation="nearest")
    ax.set_axis_off()
    title = ax.set_title(_status(game), fontsize=8)
    help_text = ", ".join(f"{k!r} {game.action_meanings[i]}" for k, i in keys.items())
    fig.text(0.01, 0.01, f"keys: {help_text}; r reset, Esc quit", fontsize=6, wrap=True)

    def on_key(event: Any) -> None:
        if event.key == QUIT_KEY:
            plt.close(fig)
            return
        if event.key == RESET_KEY:
            frame, text = game.reset(), _status(game)
        elif event.key in keys:
            frame, reward, cont = game.step(keys[event.key])
            text = _status(game, reward, cont)
        else:
            return
        shown.set_data(np.asarray(frame).transpose(1, 2, 0))
        title.set_text(text)
        fig.canvas.draw_idle()

    fig.canvas.mpl_connect("key_press_event", on_key)
    return fig
