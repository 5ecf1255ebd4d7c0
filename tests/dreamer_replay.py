"""dreamerv3-torch's replay directory, for tests: ``data``'s episodes as its simulate()
records them, written by the stand-in checkout's own ``tools.save_episodes``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from storm_lib.data import TrajectoryData

STANDIN = Path(__file__).resolve().parent / "dreamerv3_standin"


def standin_tools() -> ModuleType:
    """The stand-in's tools.py under a name of its own (no clash with other ``tools``)."""
    spec = importlib.util.spec_from_file_location("standin_tools", STANDIN / "tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dreamer_episodes(data: TrajectoryData) -> dict[str, dict[str, np.ndarray]]:
    """Frame t with the action (one-hot) and reward that led to it, zeros on the first;
    ``is_last`` and ``discount`` 0 on the last frame (a time limit, not a terminal state)."""
    out = {}
    hot = np.eye(data.action_dim, dtype=np.float32)
    for ep in data.episode_ids:
        idx = np.flatnonzero(data.episode == ep)
        n, last = len(idx), np.arange(len(idx)) == len(idx) - 1
        out[f"2024{ep:04d}T000000-ep{ep}"] = {
            "image": data.obs[idx].transpose(0, 2, 3, 1),
            "action": np.concatenate([np.zeros_like(hot[:1]), hot[data.action[idx[:-1]]]]),
            "reward": np.concatenate([[0.0], data.reward[idx[:-1]]]).astype(np.float32),
            "discount": (1.0 - last).astype(np.float32),
            "is_first": np.arange(n) == 0,
            "is_last": last,
            "is_terminal": np.concatenate([[False], data.cont[idx[:-1]] == 0]),
            "logprob": np.full(n, -np.log(data.action_dim), np.float32),
        }
    return out


def write_replay(directory: Path, data: TrajectoryData) -> list[Path]:
    """``directory`` as dreamerv3-torch's ``logdir/train_eps``; its files, sorted."""
    standin_tools().save_episodes(directory, dreamer_episodes(data))
    return sorted(Path(directory).glob("*.npz"))
