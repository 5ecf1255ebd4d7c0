"""The real Atari game: ``collect()`` writes one ``.npz`` file of experience, and
``twin_futures()`` measures how predictable the game itself is.

Preprocessing follows STORM / DreamerV3: ``frameskip`` emulator frames per agent step with
the last two max-pooled, sticky actions inside the emulator (ALE v5), the game's minimal
action set, ``image_size`` x ``image_size`` RGB, and life loss recorded as ``cont = 0``
while the episode itself goes on (STORM's "use of life information").

The file layout is described in ``data.py``.

Implementation notes: the hot loop drives ``env.unwrapped.ale`` directly (the same calls
gymnasium's ``AtariEnv.step`` makes with ``frameskip=1``; a test checks the two agree),
stickiness is drawn per emulator frame by ALE as in v5, a life loss does not cut the
frame skip short (only game over does, like STORM's max-and-skip wrapper), and frames are
resized in batches with PyTorch's antialiased bilinear filter, which equals PIL's
``BILINEAR`` within one grey level (``bench/bench_collect.py`` times collection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import FORMAT, DataError, TrajectoryData, write_npz

_CHUNK = 256  # frames resized per batch


def _make_env(env_id: str, frameskip: int, sticky_prob: float) -> Any:
    """A gymnasium ALE env stepping one emulator frame; ``DataError`` for an unknown id."""
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)
    try:
        env = gymnasium.make(
            env_id, frameskip=1, repeat_action_probability=sticky_prob,
            max_num_frames_per_episode=0,
        )  # fmt: skip
    except gymnasium.error.Error as e:
        raise DataError(f"unknown env id {env_id!r}: {e}") from e
    except TypeError as e:
        raise DataError(f"env id {env_id!r} is not an ALE game: {e}") from e
    if not isinstance(env.unwrapped, ale_py.AtariEnv):
        env.close()
        raise DataError(f"env id {env_id!r} is not an ALE game")
    return env


def _resize(raw: np.ndarray, out: np.ndarray) -> None:
    """Bilinear, antialiased resize of ``[n, H, W, 3]`` uint8 into ``out`` ``[n, 3, S, S]``.

    Same filter as PIL's ``BILINEAR`` (within one grey level), as one batched call.
    """
    x = torch.from_numpy(raw).permute(0, 3, 1, 2)  # [n,3,H,W], channels_last view
    y = F.interpolate(x, size=out.shape[-2:], mode="bilinear", antialias=True)
    np.copyto(out, y.permute(0, 2, 3, 1).numpy().transpose(0, 3, 1, 2))  # fast in NumPy


def _check_collect_args(steps: int, image_size: int, frameskip: int, sticky: float, mx: int):
    if steps < 1 or image_size < 1 or frameskip < 1 or mx < 1:
        raise DataError(
            f"steps, image_size, frameskip and max_episode_steps must be >= 1, got "
            f"{steps}, {image_size}, {frameskip}, {mx}"
        )
    if not 0.0 <= sticky <= 1.0:
        raise DataError(f"sticky_prob must be in [0, 1], got {sticky}")


def check_target(path: Path, settings: dict[str, Any], *, overwrite: bool = False) -> bool:
    """True when ``path`` already holds this collection (nothing to do), False when
    ``path`` may be written.

    Raises:
        DataError: ``path`` holds something else: a foreign or unreadable file (never
            overwritten), or our own data with other settings (overwritten only with
            ``overwrite``). The message says what differs.
    """
    if not path.exists():
        return False
    try:
        existing = TrajectoryData.load(path)
    except DataError as exc:
        raise DataError(
            f"{exc}\n  {path} is not a dataset this library can identify as its own, so it "
            "is never overwritten: choose another output file."
        ) from None
    diff = existing.settings_diff(settings)
    if not diff:
        return True
    if not overwrite:
        differs = ", ".join(f"{k} {mine!r} (asked {want!r})" for k, (mine, want) in diff.items())
        raise DataError(
            f"{path} already holds other data: {differs}. It is left as it is: choose "
            "another output file, or pass --force to replace this storm_lib dataset."
        )
    return False


def collect(
    env_id: str,
    steps: int,
    seed: int,
    path: str | Path,
    *,
    image_size: int = 64,
    frameskip: int = 4,
    sticky_prob: float = 0.25,
    max_episode_steps: int = 27_000,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Play ``steps`` agent steps of a uniformly random policy and write them to ``path``.

    ``path`` is written only when it does not exist. When it holds our own dataset with
    the same settings it is kept as it is (nothing is collected); our own dataset with
    other settings is replaced only with ``overwrite``; any other file never is.

    The env is seeded with ``seed`` on its first reset only (later resets carry its RNG on)
    and the policy draws from ``numpy.random.default_rng(seed)``, so a run is a pure
    function of its arguments. Episodes end on game over or after ``max_episode_steps``;
    the last one may be partial. The ``.npz`` is written atomically (temp file + rename).

    Args:
        env_id (str): an ALE id such as ``"ALE/Boxing-v5"``.
        steps (int): agent steps to record (rows N of the file).
        seed (int): seed of the environment and of the policy.
        path (str | Path): the ``.npz`` to write (parent folders are created).
        image_size (int): S, side of the stored frames. Default 64.
        frameskip (int): emulator frames per agent step. Default 4.
        sticky_prob (float): probability that the emulator repeats the previous action.
        max_episode_steps (int): truncation length in agent steps. Default 27000.
        progress (bool): show a tqdm bar. Default True.
        overwrite (bool): replace a dataset of ours collected with other settings.

    Returns:
        Path: ``path``.

    Raises:
        DataError: bad arguments, an unknown game, or a ``path`` that must not be written.
    """
    from tqdm import tqdm

    _check_collect_args(steps, image_size, frameskip, sticky_prob, max_episode_steps)
    path = Path(path)
    settings = dict(
        env_id=env_id, steps=int(steps), seed=int(seed), image_size=int(image_size),
        frameskip=int(frameskip), sticky_prob=float(sticky_prob),
        max_episode_steps=int(max_episode_steps),
    )  # fmt: skip
    if check_target(path, settings, overwrite=overwrite):
        return path
    env = _make_env(env_id, frameskip, sticky_prob)
    try:
        env.reset(seed=seed)
        ale, action_set = env.unwrapped.ale, env.unwrapped._action_set
        meanings = list(env.unwrapped.get_action_meanings())
        height, width = ale.getScreenDims()
        actions = np.random.default_rng(seed).integers(0, len(action_set), size=steps)
        obs = np.empty((steps, 3, image_size, image_size), np.uint8)
        reward = np.empty(steps, np.float32)
        cont = np.empty(steps, np.float32)
        episode = np.empty(steps, np.int32)
        raw = np.empty((_CHUNK, height, width, 3), np.uint8)  # full-size frames awaiting resize
        prev = np.empty((height, width, 3), np.uint8)  # second-to-last frame of a step
        ale.getScreenRGB(raw[0])
        lives, ep, ep_len, c0 = ale.lives(), 0, 0, 0
        bar = tqdm(total=steps, disable=not progress, unit="step", desc=f"collect {env_id}")
        for t in range(steps):
            a, r = action_set[actions[t]], 0.0
            for k in range(frameskip):
                r += ale.act(a)
                if k == frameskip - 2:
                    ale.getScreenRGB(prev)
                if ale.game_over(with_truncation=False):
                    break
            over = ale.game_over(with_truncation=False)
            now = ale.lives()
            reward[t], cont[t], episode[t] = r, 0.0 if over or now < lives else 1.0, ep
            lives, ep_len = now, ep_len + 1
            if t + 1 == steps:
                break
            if t + 1 - c0 == _CHUNK:  # flush a full chunk of raw frames
                _resize(raw, obs[c0 : c0 + _CHUNK])
                bar.update(_CHUNK)
                c0 += _CHUNK
            slot = raw[t + 1 - c0]
            if over or ep_len >= max_episode_steps:
                env.reset()
                ale.getScreenRGB(slot)
                lives, ep, ep_len = ale.lives(), ep + 1, 0
            else:
                ale.getScreenRGB(slot)
                if frameskip > 1:
                    np.maximum(slot, prev, out=slot)
        _resize(raw[: steps - c0], obs[c0:])
        bar.update(steps - c0)
        bar.close()
    finally:
        env.close()
    import ale_py
    import gymnasium

    meta = dict(
        **settings, policy="uniform random", action_dim=len(action_set),
        action_meanings=meanings, episodes=int(episode[-1]) + 1, format=FORMAT,
        versions=dict(gymnasium=gymnasium.__version__, ale_py=ale_py.__version__,
                      numpy=np.__version__),
    )  # fmt: skip
    arrays = dict(obs=obs, action=actions.astype(np.int64), reward=reward, cont=cont)
    return write_npz(path, dict(arrays, episode=episode), meta)


@dataclass
class TwinFutures:
    """Two real futures of the same states under the same actions (:func:`twin_futures`).

    Shapes:
        psnr: ``[count, H]`` dB between the twins, ``cap`` where they are identical.
        copy_last: ``[count, H]`` dB of the last frame before the split against the first twin.
    """

    psnr: np.ndarray
    copy_last: np.ndarray
    cap: float

    @property
    def identical(self) -> np.ndarray:
        """``[H]`` share of the states whose twins are still identical at each step."""
        return (self.psnr >= self.cap).mean(0)

    @property
    def mean(self) -> np.ndarray:
        """``[H]`` mean PSNR: what a world model that samples the game's own randomness
        perfectly would score against the truth, in the protocol's units (same cap)."""
        return self.psnr.mean(0)


class Emulator:
    """The real game stepped the way :func:`collect` records it (``frameskip`` emulator
    frames per agent step, the last two max-pooled, sticky actions inside ALE), with its
    state saved and restored for replays (:func:`twin_futures`, the play demo).

    Args:
        env_id: an ALE id such as ``"ALE/Boxing-v5"``.
        seed: seed of the first reset (later resets carry the env's RNG on).
        image_size: S, side of the frames :meth:`frames` returns.
        frameskip: emulator frames per agent step.
        sticky_prob: probability that the emulator repeats the previous action.

    Attributes:
        action_meanings: the minimal action set's names; actions are indices into it.
    """

    def __init__(
        self, env_id: str = "ALE/Boxing-v5", *, seed: int = 0, image_size: int = 64,
        frameskip: int = 4, sticky_prob: float = 0.25,
    ) -> None:  # fmt: skip
        self.env = _make_env(env_id, frameskip, sticky_prob)
        self.env.reset(seed=seed)
        self.ale, self._action_set = self.env.unwrapped.ale, self.env.unwrapped._action_set
        self.action_meanings = list(self.env.unwrapped.get_action_meanings())
        self.image_size, self.frameskip = image_size, frameskip
        height, width = self.ale.getScreenDims()
        self._prev = np.empty((height, width, 3), np.uint8)
        self._cur = np.empty((height, width, 3), np.uint8)

    @property
    def action_dim(self) -> int:
        return len(self._action_set)

    def step(self, action: int) -> tuple[np.ndarray, float]:
        """Play action index ``action`` for one agent step: the full-size frame after it
        ``[H, W, 3]`` uint8 (max of the last two emulator frames) and the reward."""
        reward, code = 0.0, self._action_set[action]
        for k in range(self.frameskip):
            reward += self.ale.act(code)
            if k == self.frameskip - 2:
                self.ale.getScreenRGB(self._prev)
        self.ale.getScreenRGB(self._cur)
        frame = np.maximum(self._cur, self._prev) if self.frameskip > 1 else self._cur.copy()
        return frame, reward

    def frames(self, raw: list[np.ndarray]) -> np.ndarray:
        """Full-size frames as :func:`collect` stores them, in [0, 1]: ``[n, 3, S, S]``."""
        out = np.empty((len(raw), 3, self.image_size, self.image_size), np.uint8)
        _resize(np.stack(raw), out)
        return out.astype(np.float32) / 255.0

    def game_over(self) -> bool:
        return bool(self.ale.game_over())

    def reset(self) -> None:
        self.env.reset()

    def clone_state(self) -> Any:
        """The emulator's state (sticky actions' RNG excluded, so replays differ as two
        draws of the real game do)."""
        return self.ale.cloneState()

    def restore_state(self, state: Any) -> None:
        self.ale.restoreState(state)

    def close(self) -> None:
        self.env.close()


def twin_futures(
    env_id: str = "ALE/Boxing-v5",
    *,
    count: int = 256,
    horizon: int = 10,
    seed: int = 7,
    image_size: int = 64,
    frameskip: int = 4,
    sticky_prob: float = 0.25,
    cap: float = 100.0,
) -> TwinFutures:
    """How predictable is the game itself, given the actions?

    A uniformly random policy plays from ``env.reset(seed)``; at ``count`` states along the
    way, the same ``horizon`` random actions are played twice from one emulator state.
    Sticky actions are drawn by ALE's own RNG, which ``cloneState`` does not copy, so the
    twins differ exactly as two draws of the real game do. Frames are preprocessed as
    :func:`collect` stores them. With ``sticky_prob=0`` every pair is identical.
    """
    if count < 1 or horizon < 1:
        raise DataError(f"count and horizon must be >= 1, got {count}, {horizon}")
    game = Emulator(
        env_id, seed=seed, image_size=image_size, frameskip=frameskip, sticky_prob=sticky_prob
    )
    rng = np.random.default_rng(seed)

    def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        mse = ((a - b) ** 2).mean(axis=(-3, -2, -1))
        return np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-30)), cap)

    def play(actions: np.ndarray) -> np.ndarray:
        return game.frames([game.step(a)[0] for a in actions])

    twins, copies = np.empty((count, horizon)), np.empty((count, horizon))
    try:
        for i in range(count):
            for _ in range(rng.integers(5, 60)):  # move on to a new state
                game.step(rng.integers(game.action_dim))
                if game.game_over():
                    game.reset()
            last = play(rng.integers(game.action_dim, size=1))[0]
            state = game.clone_state()
            actions = rng.integers(game.action_dim, size=horizon)
            first = play(actions)
            game.restore_state(state)
            second = play(actions)
            twins[i], copies[i] = psnr(first, second), psnr(first, last)
            if game.game_over():
                game.reset()
    finally:
        game.close()
    return TwinFutures(psnr=twins, copy_last=copies, cap=cap)
