"""Play inside the world model: STORM's imagination driven one action at a time.

:class:`ImaginedGame` is the logic, with no UI: it starts from a real context (frames and
the actions taken in them), and each :meth:`ImaginedGame.step` feeds one action through
the KV cache and returns the imagined next frame, the predicted reward and the predicted
continuation. The front ends are thin wrappers over it (``storm_lib/play_ui.py``: a
notebook widget and a desktop window). :func:`scripted_demo` plays fixed action sequences
beside the real emulator, for an executed notebook, where widgets do not run.

Glossary: C context, K categoricals, V classes, A actions, S image side.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .types import ImagineMode
from .utils import evaluating, model_device, private_rng


class GameStep(NamedTuple):
    """What one :meth:`ImaginedGame.step` returns (unpacks as ``frame, reward, cont``)."""

    frame: Tensor
    """``[3, S, S]`` the imagined next frame in [0, 1], on the CPU."""
    reward: float
    """The predicted reward for the action just taken."""
    cont: float
    """The predicted probability that the episode (life) goes on after it."""


class ImaginedGame:
    """A STORM world model played one action at a time from a real context.

    ``reset()`` shows the last real context frame. Each ``step(action)`` takes ``action``
    in the current frame: its token goes through the Transformer with the KV cache (the
    context is prefilled in one pass), the prior gives the next latent, the decoder its
    frame, and the heads the reward and continuation, exactly as ``imagine`` does. The
    recorded action of the last context frame is therefore not used: the player's first
    action takes its place (``step(context_actions[-1])`` replays the recording).

    Beyond ``window`` steps of history the game slides: the older half of it is dropped
    and the rest re-encoded from position 0 in one pass, so the learned positional table
    is never read past ``window``; the default ``window`` is the training sequence length
    (positions the model has seen), at most ``max_length``.

    Args:
        model: a STORM world model (:class:`storm_lib.models.storm.STORMWorldModel`).
        context_obs: ``[C, 3, S, S]`` real frames in [0, 1].
        context_actions: ``[C]`` the action taken in each of them.
        mode: ``"mode"`` (argmax latents: the same actions give the same game) or
            ``"sample"``.
        action_meanings: the names of the A actions (the data's ``action_meanings``);
            default ``"0"``, ``"1"``, ...
        window: the most time steps the Transformer attends to (see above).
        seed: makes ``"sample"`` games repeatable: every reset reseeds, and the caller's
            RNG is left alone. None draws from the global RNG.
    """

    def __init__(
        self,
        model: Any,
        context_obs: Tensor,
        context_actions: Tensor,
        *,
        mode: ImagineMode = "mode",
        action_meanings: Sequence[str] | None = None,
        window: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not all(hasattr(model, a) for a in ("transformer", "tokens", "prior", "decode")):
            kind = getattr(model, "kind", type(model).__name__)
            raise TypeError(f"ImaginedGame plays a STORM model (its KV cache); got {kind!r}")
        model.check_mode(mode)
        if context_obs.dim() != 4 or context_actions.shape != context_obs.shape[:1]:
            raise ValueError(
                f"context_obs must be [C, 3, S, S] and context_actions [C]; got "
                f"{tuple(context_obs.shape)} and {tuple(context_actions.shape)}"
            )
        model.check_window(context_obs[None], context_actions[None], what="context_obs")
        self.model, self.mode, self.seed = model, mode, seed
        self.action_dim = int(model.action_dim)
        meanings = list(action_meanings or map(str, range(self.action_dim)))
        if len(meanings) != self.action_dim:
            raise ValueError(f"{len(meanings)} action meanings for a model of {self.action_dim}")
        self.action_meanings = meanings
        trained = model.config.train.seq_len
        self.window = window if window is not None else min(trained, model.max_length)
        context = context_obs.shape[0]
        if not context <= self.window <= model.max_length or self.window < 2:
            raise ValueError(
                f"window must be at least the context ({context}) and 2, and at most the "
                f"model's max_length ({model.max_length}); got {self.window}"
            )
        self.device = model_device(model)
        self.context_obs = context_obs.to(self.device, torch.float32)
        self.context_actions = context_actions.to(self.device, torch.long)
        self.reset()

    # ------------------------------------------------------------------- the game
    def reset(self) -> Tensor:
        """Back to the real context: encode it and prefill the cache with all but its
        last frame. Returns that last real frame ``[3, S, S]`` (CPU)."""
        m = self.model
        self.steps_taken = 0
        with evaluating(m), self._rng(self.seed):
            z = m.vae.sample(m.encode(self.context_obs[None]), self.mode)  # [1, C, K, V]
            self._past_z, self._past_a = z[:, :-1], self.context_actions[None, :-1]
            self._current = z[:, -1]  # [1, K, V] the latent of the frame on screen
            self._prefill()
        self.frame = self.context_obs[-1].cpu()
        return self.frame

    def step(self, action: int | str) -> GameStep:
        """Take ``action`` (an index or a meaning such as ``"LEFT"``) in the current frame.

        Raises:
            ValueError: ``action`` is not one of this game's actions.
        """
        index = self.action_index(action)
        m = self.model
        seed = None if self.seed is None else self.seed + 1 + self.steps_taken
        with evaluating(m), self._rng(seed):
            a = torch.tensor([[index]], device=self.device)
            out = m.transformer(m.tokens(self._current[:, None], a), self._cache)
            h = m.embed.states(out)[:, -1]  # [1, D]
            z_next = m.prior.sample(h, self.mode)  # [1, K, V]
            frame = m.decode(z_next[:, None]).clamp(0.0, 1.0)[0, 0]
            reward = m.reward_head.predict(m.reward_head(h))[0]
            cont = torch.sigmoid(m.cont_head(h))[0]
            self._past_z = torch.cat([self._past_z, self._current[:, None]], 1)
            self._past_a = torch.cat([self._past_a, a], 1)
            self._current = z_next
            if self._past_a.shape[1] + 1 > self.window:  # the next step would not fit
                self._slide()
        self.steps_taken += 1
        self.frame = frame.cpu()
        return GameStep(self.frame, float(reward), float(cont))

    def action_index(self, action: int | str) -> int:
        """The index of ``action`` (an index or a meaning); ValueError when the game has
        no such action."""
        names = ", ".join(f"{i} {n}" for i, n in enumerate(self.action_meanings))
        if isinstance(action, str):
            if action not in self.action_meanings:
                raise ValueError(f"this game has no action {action!r}; its actions: {names}")
            return self.action_meanings.index(action)
        try:
            index = operator.index(action)
        except TypeError:
            raise ValueError(f"an action is an index or a name, got {action!r}") from None
        if isinstance(action, bool) or not 0 <= index < self.action_dim:
            raise ValueError(
                f"action {action!r} is not one of this game's {self.action_dim} actions "
                f"(0..{self.action_dim - 1}: {names})"
            )
        return index

    @property
    def history(self) -> tuple[Tensor, Tensor]:
        """What the next step attends to: latents ``[1, n, K, V]`` (the last one is the
        frame on screen) and the actions taken in all but that frame, ``[1, n - 1]``."""
        return torch.cat([self._past_z, self._current[:, None]], 1), self._past_a

    def _rng(self, seed: int | None) -> Any:
        """A private RNG seeded with ``seed``; without a seed, the global RNG itself (a
        forked one would give every step the same draws)."""
        return contextlib.nullcontext() if seed is None else private_rng(seed, self.device)

    # ---------------------------------------------------------------- the KV cache
    def _prefill(self) -> None:
        """A new cache holding the tokens of the past steps, in one pass."""
        m = self.model
        self._cache = m.transformer.new_cache(1)
        if self._past_a.shape[1]:
            m.transformer(m.tokens(self._past_z, self._past_a), self._cache)

    def _slide(self) -> None:
        """Keep the newer half of the window and re-encode it from position 0."""
        keep = self.window // 2
        self._past_z, self._past_a = self._past_z[:, -keep:], self._past_a[:, -keep:]
        self._prefill()


def held_out_context(data: Any, context: int, seed: int) -> tuple[Tensor, Tensor]:
    """A real context from held-out data: ``[C, 3, S, S]`` frames and ``[C]`` actions of
    the first of ``data.eval_windows(1, C, seed)`` (pass the validation split)."""
    window = data.eval_windows(1, context, seed)
    return window.obs[0], window.action[0]


# ------------------------------------------------------------------ the scripted demo
@dataclass
class PlayDemo:
    """:func:`scripted_demo`'s result: each action sequence played in the real emulator
    and in the model from the same context.

    Shapes:
        ``real[label]``, ``imagined[label]``: ``[H, 3, S, S]``; ``reward[label]``,
        ``cont[label]``, ``psnr[label]``: ``[H]``.
    """

    context: Tensor
    """``[C, 3, S, S]`` the real context frames (from the emulator)."""
    context_actions: Tensor
    """``[C]`` the actions taken in them (the last one is each sequence's first)."""
    actions: dict[str, list[str]]
    real: dict[str, Tensor]
    imagined: dict[str, Tensor]
    reward: dict[str, np.ndarray]
    cont: dict[str, np.ndarray]
    psnr: dict[str, np.ndarray]
    """Imagined against real frames, dB per step."""

    def animation(self, *, interval: int = 250) -> Any:
        """Rows: the action sequences; columns: the real game, the model (with its
        predicted reward and continuation). Render with :func:`storm_lib.plots.animation_html`."""
        from .plots import grid_animation

        panels, captions = {}, {}
        for label in self.real:
            panels[f"real game, {label}"] = self.real[label]
            panels[f"model, {label}"] = self.imagined[label]
            captions[f"real game, {label}"] = [""] * len(self.real[label])
            captions[f"model, {label}"] = [
                f"r {r:+.2f}  cont {c:.2f}"
                for r, c in zip(self.reward[label], self.cont[label], strict=True)
            ]
        return grid_animation(panels, cols=2, captions=captions, interval=interval,
                              panel_size=1.5, title="step {k} after the real context")  # fmt: skip

    def summary(self) -> str:
        """What the demo shows, in numbers: how close each imagined future is to the real
        one, and how far apart the sequences' futures are in the model and in the game."""
        from .evaluate import psnr

        lines = [
            f"{label}: imagined vs real {self.psnr[label].mean():.1f} dB on average over "
            f"{len(self.psnr[label])} steps ({self.psnr[label][-1]:.1f} dB at the last)"
            for label in self.real
        ]
        if len(self.real) == 2:
            a, b = self.real
            real = float(psnr(self.real[a][-1], self.real[b][-1]))
            imagined = float(psnr(self.imagined[a][-1], self.imagined[b][-1]))
            lines.append(
                f"{a} vs {b} at the last step: {real:.1f} dB apart in the real game, "
                f"{imagined:.1f} dB in the model (100 = identical: the actions changed nothing)"
            )
        return "\n".join(lines)


def scripted_demo(
    model: Any,
    *,
    env_id: str = "ALE/Boxing-v5",
    sequences: dict[str, Sequence[str]] | None = None,
    steps: int = 16,
    context: int = 8,
    prefix: int = 60,
    seed: int = 1234,
    mode: ImagineMode = "mode",
    image_size: int = 64,
    frameskip: int = 4,
    sticky_prob: float = 0.25,
) -> PlayDemo:
    """The same real context played under several action sequences, in the real emulator
    and in the model, for an executed notebook (where widgets cannot run).

    The context comes from the emulator, not from a data file: replaying the real game
    needs its state at the context's last frame, which a data file does not keep. The
    game is reset with ``seed`` and a uniformly random policy seeded with ``seed`` plays
    ``prefix`` steps, then ``context`` more whose frames and actions form the context
    (preprocessed as ``collect`` stores them; with a seed other than the data's, frames
    the model never trained on). From the emulator state at the last context frame each
    sequence is replayed in the game, and played in an :class:`ImaginedGame`.

    Args:
        model: a STORM world model trained on ``env_id``.
        sequences: label -> ``steps`` action meanings (default: hold LEFT, hold RIGHT).
        steps: actions per sequence (for the default sequences).
        context, prefix, seed: see above.
        mode: the game's latents (``"mode"``: argmax).
        image_size, frameskip, sticky_prob: the data's preprocessing (``config.data``).
    """
    from .atari import Emulator
    from .evaluate import psnr

    sequences = sequences or {f"hold {a}": [a] * steps for a in ("LEFT", "RIGHT")}
    game = Emulator(env_id, seed=seed, image_size=image_size, frameskip=frameskip,
                    sticky_prob=sticky_prob)  # fmt: skip
    try:
        if game.action_dim != model.action_dim:
            raise ValueError(
                f"{env_id} has {game.action_dim} actions but the model {model.action_dim}"
            )
        rng = np.random.default_rng(seed)
        for _ in range(prefix):
            game.step(rng.integers(game.action_dim))
            if game.game_over():
                game.reset()
        actions = rng.integers(game.action_dim, size=context + 1)
        raw = [game.step(actions[0])[0]]
        raw += [game.step(a)[0] for a in actions[1:context]]  # actions[i] taken in frame i-1
        obs, taken = torch.from_numpy(game.frames(raw)), torch.from_numpy(actions[1:])
        play = ImaginedGame(model, obs, taken, mode=mode, action_meanings=game.action_meanings,
                            seed=seed)  # fmt: skip
        state = game.clone_state()
        out = PlayDemo(obs, taken, {}, {}, {}, {}, {}, {})
        for label, names in sequences.items():
            index = [play.action_index(a) for a in names]
            game.restore_state(state)
            out.real[label] = torch.from_numpy(game.frames([game.step(i)[0] for i in index]))
            play.reset()
            moves = [play.step(i) for i in index]
            out.actions[label] = list(names)
            out.imagined[label] = torch.stack([m.frame for m in moves])
            out.reward[label] = np.array([m.reward for m in moves])
            out.cont[label] = np.array([m.cont for m in moves])
            out.psnr[label] = psnr(out.imagined[label], out.real[label]).numpy()
    finally:
        game.close()
    return out
