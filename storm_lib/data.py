"""Atari experience on disk and in memory: :class:`TrajectoryData` (``atari.py`` writes it).

Stored layout, one row per agent step (frame after an episode's last transition dropped):
``obs`` uint8 ``[N, 3, S, S]``, ``action`` int64 ``[N]``, ``reward`` float32 ``[N]``,
``cont`` float32 ``[N]``, ``episode`` int32 ``[N]`` and ``meta`` (a JSON string).
``reward[t]`` and ``cont[t]`` follow taking ``action[t]`` in ``obs[t]``.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device_data import DeviceExperience, room_on_device
from .files import atomic_write, file_sha256
from .types import Batch

FORMAT = "storm_lib.data/1"
KEYS = ("obs", "action", "reward", "cont", "episode")
_DTYPES = {"obs": np.uint8, "action": np.int64, "reward": np.float32, "cont": np.float32}
_DTYPES["episode"] = np.int32
_KINDS = {"obs": "u", "action": "iu", "reward": "fiu", "cont": "fiu", "episode": "iu"}


class DataError(ValueError):
    """Bad experience data or arguments: missing, corrupt, inconsistent or unusable."""


SETTINGS = ("env_id", "steps", "seed", "image_size", "frameskip", "sticky_prob")
SETTINGS += ("max_episode_steps",)
"""Meta entries that define a collection: two files agreeing on all of them hold the same data."""


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """``np.savez_compressed`` through :func:`storm_lib.files.atomic_write`."""
    return atomic_write(
        path, lambda f: np.savez_compressed(f, **arrays, meta=np.array(json.dumps(meta)))
    )


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in KEYS:
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The ``KEYS`` and ``meta`` arrays of an ``.npz`` (never unpickles), CRC-checked.

    ``np.load`` stops reading a member at the array's last byte, so when the size in the
    zip directory is damaged too, zipfile never reaches the end of the stream and never
    checks the CRC-32: corrupt frames load silently. Reading one byte more forces the check.
    """
    with zipfile.ZipFile(path) as archive:
        names = {name.removesuffix(".npy"): name for name in archive.namelist()}
        missing = [k for k in (*KEYS, "meta") if k not in names]
        if missing:
            raise DataError(f"{path}: missing arrays {missing} (has {sorted(names)})")
        arrays = {}
        for key in (*KEYS, "meta"):
            with archive.open(names[key]) as member:
                arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                if member.read(1):
                    raise DataError(f"{path}: stray bytes after the array {key!r}")
    return arrays


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
    [0, 1] only in the sampled batch, on the target device. On CUDA, :meth:`sample` keeps
    a copy of the arrays on the GPU when they fit (:meth:`device_copy`) and gathers the
    batches there.

    Shapes:
        obs: ``[N, 3, S, S]`` uint8; action, reward, cont, episode: ``[N]``.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], meta: dict[str, Any], path: Path | None, sha256: str
    ):
        """Internal: use :meth:`load` or :meth:`from_arrays` (arrays already validated)."""
        self.obs, self.action = arrays["obs"], arrays["action"]
        self.reward, self.cont, self.episode = arrays["reward"], arrays["cont"], arrays["episode"]
        self._meta, self.path, self._sha256 = meta, path, sha256
        self._steps = len(self.obs)  # of the whole file: a split keeps its parent's count
        self._tensors = {k: torch.from_numpy(arrays[k]) for k in KEYS[:4]}  # zero-copy views
        self._starts: dict[int, torch.Tensor] = {}
        self._device_copies: dict[torch.device, DeviceExperience | None] = {}

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryData:
        """Read and validate a file written by :func:`collect` (never unpickles)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        try:
            arrays = _read_npz(path)
        except DataError:
            raise
        except MemoryError as e:  # sizes come from the file's headers: huge ones are refused
            raise DataError(f"{path}: its arrays do not fit in memory ({e})") from e
        except Exception as e:  # zipfile, zlib and numpy raise many types (OSError, ValueError,
            # BadZipFile, zlib.error, even tokenize.TokenError) for bad files: all mean unusable
            raise DataError(f"{path}: truncated or corrupt data file ({e})") from e
        raw = arrays.pop("meta")
        try:
            meta = json.loads(str(raw[()])) if raw.dtype.kind == "U" and raw.ndim == 0 else None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: meta is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise DataError(f"{path}: meta must be a JSON object stored as a 0-d string")
        return cls(*_validate(arrays, meta, str(path)), path, file_sha256(path))

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
        checked, meta = _validate(arrays, meta, "arrays")
        return cls(checked, meta, None, _arrays_sha256(checked))

    def save(self, path: str | Path) -> Path:
        """Write this data to ``path`` in :func:`collect`'s format (atomically)."""
        arrays = {k: getattr(self, k) for k in KEYS}
        return write_npz(Path(path), arrays, self._meta)

    def __len__(self) -> int:
        return len(self.obs)

    def __repr__(self) -> str:
        return f"TrajectoryData({self.env_id!r}, steps={len(self)}, episodes={self.num_episodes})"

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata dict."""
        return json.loads(json.dumps(self._meta))

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on (a split records the
        whole file it came from): env id, steps, seed, image size, action meanings and
        the first 16 hex digits of the file's SHA-256 (of the arrays, for in-memory data)."""
        return {
            "env_id": self.env_id,
            "steps": int(self._meta.get("steps", self._steps)),
            "seed": self._meta.get("seed"),
            "image_size": self.image_size,
            "action_meanings": self.action_meanings,
            "sha256": self._sha256[:16],
        }

    def settings_diff(self, wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{name: (this file's value, wanted value)}`` for each of :data:`SETTINGS` in
        ``wanted`` that differs (a setting the file does not record counts as differing)."""
        return {
            k: (self._meta.get(k), v)
            for k, v in wanted.items()
            if k in SETTINGS and self._meta.get(k) != v
        }

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
            raise DataError(
                f"{self.path or 'arrays'}: cannot split {len(ids)} episode(s) into training and "
                "validation: whole episodes are held out, so it needs at least 2. Collect more "
                "steps, or import more episodes (import-data takes several files, a directory "
                "such as dreamerv3-torch's logdir/train_eps/, or a glob)"
            )
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = min(max(round(val_fraction * len(ids)), 1), len(ids) - 1)
        val_ids = np.random.default_rng(seed).permutation(ids)[:n_val]
        is_val = np.isin(self.episode, val_ids)
        return self._subset(~is_val), self._subset(is_val)

    def _subset(self, mask: np.ndarray) -> TrajectoryData:
        part = {k: getattr(self, k)[mask] for k in KEYS}
        subset = TrajectoryData(part, self._meta, self.path, self._sha256)
        subset._steps = self._steps
        return subset

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
            device: where the batch goes (default CPU). On CUDA the windows are gathered
                from :meth:`device_copy` when the arrays fit on the GPU: only the B starts
                cross. Otherwise (and on other devices) they are gathered on the host and
                the uint8 frames are moved, pinned and non-blocking for CUDA, and converted
                to float there. Both paths draw the same starts from ``generator``.

        Returns:
            Batch: obs ``[B, T, 3, S, S]`` float32 in [0, 1]; action, reward, cont ``[B, T]``.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        starts = self.valid_starts(length)
        pick = torch.randint(len(starts), (batch_size,), generator=generator)
        target = None if device is None else torch.device(device)
        kept = self.device_copy(target) if target is not None and target.type == "cuda" else None
        if kept is not None:
            return kept.gather(starts[pick], length)
        return self._gather(starts[pick], length, target)

    def device_copy(self, device: torch.device | str) -> DeviceExperience | None:
        """The arrays kept on ``device`` for :meth:`sample`, uploaded on first use if they
        fit there with room left for training (:func:`storm_lib.device_data.room_on_device`),
        else None (the host path). The first call for a device prints which path it is.
        :meth:`drop_device_copies` frees them."""
        device = torch.device(device)
        if device not in self._device_copies:
            fits, line = room_on_device(DeviceExperience.size_of(self._tensors), device)
            print(line, flush=True)
            self._device_copies[device] = DeviceExperience(self._tensors, device) if fits else None
        return self._device_copies[device]

    def drop_device_copies(self) -> None:
        """Free the device copies made by :meth:`device_copy` (the next sample makes one again)."""
        self._device_copies.clear()

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
