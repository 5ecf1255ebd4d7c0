"""``import-data``: a P03 dataset in another layout, converted into this library's format.

So that an instructor can train and grade on exactly the data a student's P03 model saw.
:func:`import_data` reads ``.npz`` files (never unpickling): one, several, a directory of
them (dreamerv3-torch's replay, ``logdir/train_eps/``, holds one per episode) or a glob;
each file's episodes stay apart. In each it understands:

* frames under ``obs`` / ``observation(s)`` / ``image(s)`` / ``frames``: ``[N, H, W, 3]``
  or ``[N, 3, H, W]``, or ``[E, T, ...]`` (episodes x time); uint8, or float in [0, 1],
  [-0.5, 0.5] or [0, 255]. Frames of another size are resized to ``image_size`` with the
  antialiased bilinear filter collection uses (PIL's ``BILINEAR`` within one grey level).
* actions under ``action(s)``: indices ``[N]`` or one-hot ``[N, A]``;
* rewards under ``reward(s)`` (zeros if absent);
* episodes from ``episode`` ids, ``is_first``, or ``done(s)`` / ``terminal(s)`` /
  ``is_terminal``; continuation from ``cont``, else the terminal flags, else
  ``discount`` (dreamerv3-torch's ``discount`` is 0 also where a time limit cut the
  episode, which is no terminal state).

Two conventions exist. This library stores with frame t the action *taken in* it and the
reward that followed (STORM's). DreamerV3 replay (recognised by ``is_first``) stores with
frame t the action and reward that *led to* it; those are shifted by one step within each
episode, and each episode's last frame, whose action is unknown, is dropped.
"""

from __future__ import annotations

import glob
import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import FORMAT, DataError, TrajectoryData

OBS_KEYS = ("obs", "observation", "observations", "image", "images", "frames")
ACTION_KEYS = ("action", "actions")
REWARD_KEYS = ("reward", "rewards")
TERMINAL_KEYS = ("is_terminal", "terminal", "terminals", "done", "dones")
CONT_KEYS = ("cont", "discount")


GLOB_CHARACTERS = "*?["


def source_files(src: str | Path | Sequence[str | Path]) -> list[Path]:
    """The ``.npz`` files that ``src`` names, in order, each once: files as they are,
    directories by their ``*.npz`` (sorted), and glob patterns (as a shell expands them,
    for a pattern given in quotes).

    Raises:
        DataError: a path that does not exist, a pattern that matches nothing, or a
            directory without ``.npz`` files.
    """
    items = [src] if isinstance(src, (str, Path)) else list(src)
    if not items:
        raise DataError("no source file given")
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.glob("*.npz") if p.is_file())
            if not found:
                raise DataError(
                    f"{path} is a directory with no .npz files in it (a dreamerv3-torch "
                    "replay directory, e.g. logdir/train_eps, holds one .npz per episode)"
                )
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(item) for c in GLOB_CHARACTERS):
            matches = sorted(glob.glob(str(path)))
            if not matches:
                raise DataError(f"{item}: no file matches this pattern")
            files += source_files(matches)
        else:
            raise DataError(f"{path}: no such file or directory")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def _read(src: Path) -> dict[str, np.ndarray]:
    if src.is_dir():
        raise DataError(f"{src} is a directory, not an .npz file")
    if not src.is_file():
        raise DataError(f"{src}: no such file")
    try:
        with np.load(src, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{src}: not a readable .npz of arrays ({exc})") from None


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in arrays), None)


def _frames_uint8(obs: np.ndarray, src: Path) -> tuple[np.ndarray, str]:
    """``[N, H, W, 3]`` uint8 frames and a note of what was converted."""
    if obs.ndim != 4 or 3 not in (obs.shape[1], obs.shape[-1]):
        raise DataError(f"{src}: frames must be [N, H, W, 3] or [N, 3, H, W], got {obs.shape}")
    layout = "HWC" if obs.shape[-1] == 3 else "CHW"
    hwc = obs if layout == "HWC" else obs.transpose(0, 2, 3, 1)
    if hwc.dtype == np.uint8:
        return np.ascontiguousarray(hwc), f"{layout} uint8"
    if hwc.dtype.kind not in "fiu":
        raise DataError(f"{src}: frames have dtype {hwc.dtype}, expected uint8 or float")
    x = hwc.astype(np.float32)
    low, high = float(x.min()), float(x.max())
    if low >= -0.5 - 1e-3 and high <= 0.5 + 1e-3 and low < -1e-3:
        x, scale = (x + 0.5) * 255.0, "[-0.5, 0.5]"
    elif low >= -1e-3 and high <= 1.0 + 1e-3:
        x, scale = x * 255.0, "[0, 1]"
    elif low >= 0.0 and high <= 255.0:
        scale = "[0, 255]"
    else:
        raise DataError(f"{src}: frame values span [{low:.3g}, {high:.3g}]; no known pixel range")
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out, f"{layout} {hwc.dtype} in {scale}"


def _resized(frames: np.ndarray, size: int) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, size, size]`` uint8 (collection's filter)."""
    from .atari import _resize

    n = len(frames)
    out = np.empty((n, 3, size, size), np.uint8)
    if frames.shape[1:3] == (size, size):
        np.copyto(out, frames.transpose(0, 3, 1, 2))
        return out
    for i in range(0, n, 256):
        _resize(np.ascontiguousarray(frames[i : i + 256]), out[i : i + 256])
    return out


def _actions(action: np.ndarray, src: Path, empty_ok: np.ndarray) -> tuple[np.ndarray, int]:
    """Indices ``[N]`` and the action count A (one-hot width, else max + 1). Rows where
    ``empty_ok`` may be all zeros (DreamerV3: no action led to an episode's first frame)."""
    if action.ndim == 2:
        ok = action.dtype.kind in "fiub" and np.all((action == 0) | (action == 1))
        sums = action.sum(1)
        if not ok or not np.all((sums == 1) | ((sums == 0) & empty_ok)):
            raise DataError(f"{src}: 2-d actions {action.shape} are not one-hot rows")
        return action.argmax(1).astype(np.int64), action.shape[1]
    if action.ndim != 1 or action.dtype.kind not in "iu" or (len(action) and action.min() < 0):
        raise DataError(
            f"{src}: actions must be indices [N] (non-negative ints) or one-hot [N, A], "
            f"got {action.shape} {action.dtype}"
        )
    return action.astype(np.int64), int(action.max()) + 1 if len(action) else 1


def _convert(src: Path) -> dict[str, Any]:
    """One file's trajectories in this library's convention (frames still HWC, any size)."""
    arrays = _read(src)
    found = f"keys found: {sorted(f'{k} {tuple(v.shape)}' for k, v in arrays.items())}"
    roles = {
        "obs": _pick(arrays, OBS_KEYS),
        "action": _pick(arrays, ACTION_KEYS),
        "reward": _pick(arrays, REWARD_KEYS),
        "is_first": _pick(arrays, ("is_first",)),
        "terminal": _pick(arrays, TERMINAL_KEYS),
        "cont": _pick(arrays, ("cont",))
        or (None if _pick(arrays, TERMINAL_KEYS) else _pick(arrays, CONT_KEYS)),
        "episode": _pick(arrays, ("episode", "episodes", "episode_id")),
    }
    obs_key, action_key = roles["obs"], roles["action"]
    if obs_key is None or action_key is None:
        role, keys = ("obs", OBS_KEYS) if obs_key is None else ("action", ACTION_KEYS)
        raise DataError(f"{src}: no {role} array (looked for {list(keys)}); {found}")
    episode = None
    lead = arrays[obs_key].shape[:2]
    if arrays[obs_key].ndim == 5:  # [E, T, ...]: one row per episode
        episode = np.repeat(np.arange(lead[0]), lead[1])
        arrays = {k: v.reshape(-1, *v.shape[2:]) if v.shape[:2] == lead else v
                  for k, v in arrays.items()}  # fmt: skip
    obs, action = arrays[obs_key], arrays[action_key]
    n = len(obs)
    for key in roles.values():
        if key is not None and len(arrays[key]) != n:
            raise DataError(f"{src}: {key!r} has {len(arrays[key])} rows, frames have {n}; {found}")

    def column(role: str, default: np.ndarray) -> np.ndarray:
        key = roles[role]
        return default if key is None else np.asarray(arrays[key], np.float64).reshape(n)

    reward = column("reward", np.zeros(n))
    dreamer = roles["is_first"] is not None
    first = column("is_first", np.zeros(n)) > 0
    idx, width = _actions(action, src, empty_ok=first)
    terminal = column("terminal", np.zeros(n)) > 0
    cont = column("cont", 1.0 - terminal)
    if roles["episode"] is not None:
        episode = column("episode", np.zeros(n)).astype(np.int64)
    if dreamer:
        first[0] = True
        episode = np.cumsum(first) - 1
        keep = np.ones(n, bool)  # row t takes the action/reward/cont stored with row t + 1
        keep[-1] = False
        keep[:-1] &= episode[1:] == episode[:-1]
        nxt = np.minimum(np.arange(n) + 1, n - 1)
        idx, reward, cont = idx[nxt], reward[nxt], cont[nxt]
    else:
        if episode is None:  # an episode ends after a terminal row
            episode = np.concatenate([[0], np.cumsum(terminal[:-1])])
        keep = np.ones(n, bool)
    frames, note = _frames_uint8(obs, src)
    return {
        "frames": frames[keep], "action": idx[keep], "reward": reward[keep],
        "cont": cont[keep], "episode": np.unique(episode[keep], return_inverse=True)[1],
        "width": width, "note": note, "dreamer": dreamer,
        "roles": {role: key for role, key in roles.items() if key},
    }  # fmt: skip


def import_data(
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    env_id: str,
    image_size: int = 64,
    action_dim: int | None = None,
    action_meanings: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the trajectories in ``src`` into this library's format at ``out``.

    Args:
        src: ``.npz`` files in the layouts of the module docstring, directories of them
            or glob patterns (:func:`source_files`); the files must agree in layout,
            frame shape and action count. Each file's episodes stay apart.
        out: the new file. An existing one is replaced only with ``overwrite`` and only
            when it is a dataset of ours; a foreign file never is, nor a source.
        env_id: the game it was recorded on (checked against checkpoints at evaluation).
        image_size: S of the stored frames.
        action_dim: A, when the file's actions do not show it (indices that never
            reach the largest action).
        action_meanings: names of the A actions, if known.
        overwrite: replace an existing dataset of ours.

    Returns:
        ``out``. It records where it came from (``meta["imported_from"]``): the sources
        as given, every file with its SHA-256, which key played which role, and the
        conversions made.

    Raises:
        DataError: what cannot be mapped, listing the keys found; or ``out`` must not be
            written.
    """
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out} is a directory; give the new file's name, e.g. {out / 'p03.npz'}")
    files = source_files(src)
    if out.resolve() in {f.resolve() for f in files}:
        raise DataError(f"{out} is one of the sources; give the new file another name")
    if out.exists():
        try:
            TrajectoryData.load(out)
        except DataError as exc:
            raise DataError(f"{exc}\n  {out} is not ours, so it is never overwritten") from None
        if not overwrite:
            raise DataError(f"{out} exists and was left as it is; pass --force to replace it")
    parts = [_convert(f) for f in files]
    first = parts[0]
    for f, part in zip(files, parts, strict=True):
        for what in ("dreamer", "roles"):
            if part[what] != first[what]:
                raise DataError(
                    f"{f} differs from {files[0]} in {what} ({part[what]!r} vs "
                    f"{first[what]!r}): import files of one layout together"
                )
        if part["frames"].shape[1:] != first["frames"].shape[1:]:
            raise DataError(
                f"{f} has frames {part['frames'].shape[1:]}, {files[0]} has "
                f"{first['frames'].shape[1:]}: import files of one frame size together"
            )
    offsets = np.cumsum([0] + [int(p["episode"].max()) + 1 if len(p["episode"]) else 0
                               for p in parts])  # fmt: skip
    frames = np.concatenate([p["frames"] for p in parts])
    note = first["note"]
    if frames.shape[1:3] != (image_size, image_size):
        note += f" {frames.shape[1]}x{frames.shape[2]}, resized to {image_size}x{image_size} "
        note += "with antialiased bilinear"
    data = TrajectoryData.from_arrays(
        obs=_resized(frames, image_size),
        action=np.concatenate([p["action"] for p in parts]),
        reward=np.concatenate([p["reward"] for p in parts]).astype(np.float32),
        cont=np.clip(np.concatenate([p["cont"] for p in parts]), 0.0, 1.0).astype(np.float32),
        episode=np.concatenate(
            [p["episode"] + o for p, o in zip(parts, offsets, strict=False)]
        ).astype(np.int32),
        meta={
            "env_id": env_id,
            "action_dim": int(action_dim or max(p["width"] for p in parts)),
            **({"action_meanings": list(action_meanings)} if action_meanings else {}),
            "steps": len(frames),
            "format": FORMAT,
            "imported_from": {
                "path": str(src) if isinstance(src, (str, Path)) else " ".join(map(str, src)),
                "files": [
                    {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                    for f in files
                ],
                "keys": first["roles"],
                "convention": "action led to the frame (DreamerV3), shifted"
                if first["dreamer"]
                else "action taken in the frame (as stored here)",
                "frames": note,
            },
        },
    )
    return data.save(out)
