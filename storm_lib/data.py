"""Atari experience: ``collect()`` writes one ``.npz``; :class:`TrajectoryData` reads it.

Preprocessing follows STORM / DreamerV3: ``frameskip`` emulator frames per agent step with
the last two max-pooled, sticky actions inside the emulator (ALE v5), the game's minimal
action set, ``image_size`` x ``image_size`` RGB, and life loss recorded as ``cont = 0``
while the episode itself goes on (STORM's "use of life information").

Stored layout, one row per agent step (frame after an episode's last transition dropped):
``obs`` uint8 ``[N, 3, S, S]``, ``action`` int64 ``[N]``, ``reward`` float32 ``[N]``,
``cont`` float32 ``[N]``, ``episode`` int32 ``[N]`` and ``meta`` (a JSON string).
``reward[t]`` and ``cont[t]`` follow taking ``action[t]`` in ``obs[t]``.

Implementation notes: the hot loop drives ``env.unwrapped.ale`` directly (the same calls
gymnasium's ``AtariEnv.step`` makes with ``frameskip=1``; a test checks the two agree),
stickiness is drawn per emulator frame by ALE as in v5, a life loss does not cut the
frame skip short (only game over does, like STORM's max-and-skip wrapper), and frames are
resized in batches with PyTorch's antialiased bilinear filter, which equals PIL's
``BILINEAR`` within one grey level and is about 5x faster.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .types import Batch

FORMAT = "storm_lib.data/1"
KEYS = ("obs", "action", "reward", "cont", "episode")
_DTYPES = {"obs": np.uint8, "action": np.int64, "reward": np.float32, "cont": np.float32}
_DTYPES["episode"] = np.int32
_KINDS = {"obs": "u", "action": "iu", "reward": "fiu", "cont": "fiu", "episode": "iu"}
_CHUNK = 256  # frames resized per batch in collect()


class DataError(ValueError):
    """Bad experience data or arguments: missing, corrupt, inconsistent or unusable."""


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

    Same filter as PIL's ``BILINEAR`` (within one grey level), about 5x faster as a batch.
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
) -> Path:
    """Play ``steps`` agent steps of a uniformly random policy and write them to ``path``.

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

    Returns:
        Path: ``path``.
    """
    from tqdm.auto import tqdm

    _check_collect_args(steps, image_size, frameskip, sticky_prob, max_episode_steps)
    path = Path(path)
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
        env_id=env_id, seed=int(seed), steps=int(steps), policy="uniform random",
        action_dim=len(action_set), action_meanings=meanings, image_size=int(image_size),
        frameskip=int(frameskip), sticky_prob=float(sticky_prob),
        max_episode_steps=int(max_episode_steps),
        episodes=int(episode[-1]) + 1, format=FORMAT,
        versions=dict(gymnasium=gymnasium.__version__, ale_py=ale_py.__version__,
                      numpy=np.__version__),
    )  # fmt: skip
    arrays = dict(obs=obs, action=actions.astype(np.int64), reward=reward, cont=cont)
    return _write_npz(path, dict(arrays, episode=episode), meta)


def _write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """``np.savez_compressed`` to a temp file next to ``path``, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _validate(arrays: dict[str, Any], meta: dict[str, Any] | None, where: str) -> tuple:
    """Checked, canonical-dtype arrays and meta; ``DataError`` naming ``where`` otherwise."""
    out: dict[str, np.ndarray] = {}
    for key in KEYS:
        a = np.asarray(arrays[key])
        if a.dtype.kind not in _KINDS[key]:
            raise DataError(f"{where}: {key!r} has dtype {a.dtype}, expected {_DTYPES[key]}")
        out[key] = a.astype(_DTYPES[key], copy=False)
    obs = out["obs"]
    if obs.ndim != 4 or obs.shape[1] != 3 or obs.shape[2] != obs.shape[3] or len(obs) == 0:
        raise DataError(f"{where}: 'obs' must be uint8 [N, 3, S, S] with N >= 1, got {obs.shape}")
    for key in KEYS[1:]:
        if out[key].shape != (len(obs),):
            shapes = {k: tuple(v.shape) for k, v in out.items()}
            raise DataError(f"{where}: arrays must all have length N = {len(obs)}, got {shapes}")
    if not np.isfinite(out["reward"]).all() or ((out["cont"] < 0) | (out["cont"] > 1)).any():
        raise DataError(f"{where}: rewards must be finite and cont values in [0, 1]")
    ep = out["episode"]
    if len(np.unique(ep)) != 1 + int(np.count_nonzero(ep[1:] != ep[:-1])):
        raise DataError(f"{where}: each episode id must occupy one contiguous run of rows")
    act = out["action"]
    meta = {
        "env_id": "synthetic", "action_dim": int(act.max()) + 1, "image_size": obs.shape[-1],
        "format": FORMAT, **(meta or {}),
    }  # fmt: skip
    dim = meta["action_dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise DataError(f"{where}: meta action_dim must be a positive int, got {dim!r}")
    if meta["format"] != FORMAT:
        raise DataError(f"{where}: unknown format {meta['format']!r}, expected {FORMAT!r}")
    if act.min() < 0 or act.max() >= dim:
        raise DataError(f"{where}: actions span [{act.min()}, {act.max()}], outside [0, {dim})")
    if meta["image_size"] != obs.shape[-1]:
        raise DataError(f"{where}: meta image_size {meta['image_size']} != frames {obs.shape}")
    return out, meta


class TrajectoryData:
    """Validated experience with episode-aware splitting and window sampling.

    Build it with :meth:`load` (a file from :func:`collect`) or :meth:`from_arrays`.
    Frames stay uint8 in RAM (30k frames of 3x64x64 = 370 MB) and become float32 in
    [0, 1] only in the sampled batch, on the target device.

    Shapes:
        obs: ``[N, 3, S, S]`` uint8; action, reward, cont, episode: ``[N]``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], path: Path | None):
        """Internal: use :meth:`load` or :meth:`from_arrays` (arrays already validated)."""
        self.obs, self.action = arrays["obs"], arrays["action"]
        self.reward, self.cont, self.episode = arrays["reward"], arrays["cont"], arrays["episode"]
        self._meta, self.path = meta, path
        self._tensors = {k: torch.from_numpy(arrays[k]) for k in KEYS[:4]}  # zero-copy views
        self._starts: dict[int, torch.Tensor] = {}

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryData:
        """Read and validate a file written by :func:`collect` (never unpickles)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in (*KEYS, "meta") if k not in npz.files]
                if missing:
                    raise DataError(f"{path}: missing arrays {missing} (has {npz.files})")
                arrays = {k: npz[k] for k in (*KEYS, "meta")}
        except DataError:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt data file ({e})") from e
        raw = arrays.pop("meta")
        try:
            meta = json.loads(str(raw[()])) if raw.dtype.kind == "U" and raw.ndim == 0 else None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: meta is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise DataError(f"{path}: meta must be a JSON object stored as a 0-d string")
        return cls(*_validate(arrays, meta, str(path)), path)

    @classmethod
    def from_arrays(
        cls,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        cont: np.ndarray,
        episode: np.ndarray,
        meta: dict[str, Any] | None = None,
    ) -> TrajectoryData:
        """In-memory data with the same checks as :meth:`load`.

        ``meta`` defaults to ``{"env_id": "synthetic", "action_dim": max(action) + 1}``.
        """
        arrays = dict(obs=obs, action=action, reward=reward, cont=cont, episode=episode)
        return cls(*_validate(arrays, meta, "arrays"), None)

    def save(self, path: str | Path) -> Path:
        """Write this data to ``path`` in :func:`collect`'s format (atomically)."""
        arrays = {k: getattr(self, k) for k in KEYS}
        return _write_npz(Path(path), arrays, self._meta)

    def __len__(self) -> int:
        return len(self.obs)

    def __repr__(self) -> str:
        return f"TrajectoryData({self.env_id!r}, steps={len(self)}, episodes={self.num_episodes})"

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata dict."""
        return json.loads(json.dumps(self._meta))

    @property
    def action_dim(self) -> int:
        return int(self._meta["action_dim"])

    @property
    def action_meanings(self) -> list[str]:
        default = [f"action_{i}" for i in range(self.action_dim)]
        return list(self._meta.get("action_meanings", default))

    @property
    def env_id(self) -> str:
        return str(self._meta["env_id"])

    @property
    def image_size(self) -> int:
        return int(self.obs.shape[-1])

    @property
    def num_steps(self) -> int:
        return len(self.obs)

    @property
    def episode_ids(self) -> np.ndarray:
        """Sorted unique episode ids."""
        return np.unique(self.episode)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ids)

    @property
    def episode_lengths(self) -> np.ndarray:
        """Steps of each episode, in the order of :attr:`episode_ids`."""
        return np.unique(self.episode, return_counts=True)[1]

    def split(self, val_fraction: float, seed: int = 0) -> tuple[TrajectoryData, TrajectoryData]:
        """Train / validation by whole episodes (a seeded permutation of the episode ids).

        ``round(val_fraction * episodes)`` episodes, clamped to [1, episodes - 1], go to
        validation. Both parts keep the original episode ids, meta and ``path``.
        """
        ids = self.episode_ids
        if len(ids) < 2:
            raise DataError(f"{self.path or 'arrays'}: cannot split {len(ids)} episode(s)")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = min(max(round(val_fraction * len(ids)), 1), len(ids) - 1)
        val_ids = np.random.default_rng(seed).permutation(ids)[:n_val]
        is_val = np.isin(self.episode, val_ids)
        return self._subset(~is_val), self._subset(is_val)

    def _subset(self, mask: np.ndarray) -> TrajectoryData:
        return TrajectoryData({k: getattr(self, k)[mask] for k in KEYS}, self._meta, self.path)

    def valid_starts(self, length: int) -> torch.Tensor:
        """Rows where a window of ``length`` steps stays in one episode (cached), int64 [M]."""
        if length < 1:
            raise DataError(f"window length must be >= 1, got {length}")
        if length not in self._starts:
            ep = self.episode
            ok = ep[: len(ep) - length + 1] == ep[length - 1 :]
            if not ok.any():
                raise DataError(
                    f"{self.path or 'arrays'}: episodes shorter than the window asked for: the "
                    f"longest episode has {self.episode_lengths.max()} steps, asked for {length}"
                )
            self._starts[length] = torch.from_numpy(np.flatnonzero(ok))
        return self._starts[length]

    def _gather(self, starts: torch.Tensor, length: int, device: torch.device | None) -> Batch:
        rows = starts[:, None] + torch.arange(length)  # [B, T]
        parts = {k: v[rows] for k, v in self._tensors.items()}  # uint8 obs [B,T,3,S,S]
        if device is not None and device.type == "cuda":
            parts = {k: v.pin_memory().to(device, non_blocking=True) for k, v in parts.items()}
        elif device is not None:
            parts = {k: v.to(device) for k, v in parts.items()}
        obs = parts.pop("obs").float().div_(255.0)
        return Batch(obs=obs, **parts)

    def sample(
        self,
        batch_size: int,
        length: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> Batch:
        """``batch_size`` uniformly random windows of ``length`` steps inside single episodes.

        Args:
            batch_size (int): B.
            length (int): T.
            generator (torch.Generator): the source of randomness (a CPU generator).
            device: where the batch goes (default CPU). uint8 frames are moved first and
                converted to float there; pinned and non-blocking for CUDA.

        Returns:
            Batch: obs ``[B, T, 3, S, S]`` float32 in [0, 1]; action, reward, cont ``[B, T]``.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        starts = self.valid_starts(length)
        pick = torch.randint(len(starts), (batch_size,), generator=generator)
        return self._gather(starts[pick], length, None if device is None else torch.device(device))

    def eval_windows(self, count: int, length: int, seed: int) -> Batch:
        """A fixed set of distinct windows (CPU), the same for the same ``(count, length, seed)``.

        Uses its own generator, not the global RNG. When fewer than ``count`` valid starts
        exist, all of them are returned (so the batch may hold fewer than ``count`` windows).
        """
        if count < 1:
            raise DataError(f"count must be >= 1, got {count}")
        starts = self.valid_starts(length)
        order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))
        return self._gather(starts[order[:count]], length, None)
