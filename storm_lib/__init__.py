"""storm_lib: STORM (a transformer world model) and a DreamerV3-style RSSM, side by side.

Public names (classes, then functions)::

    from storm_lib import (Batch, CheckpointError, Config, DataError, History, Rollout,
                           TrajectoryData, WorldModel,
                           build_world_model, collect, fit, get_profile, load_checkpoint,
                           load_rssm_checkpoint, psnr, rollout_psnr, save_checkpoint)

The models are in ``storm_lib.models`` (``vae``, ``transformer``, ``heads``, ``maskgit``,
``storm``, ``rssm``); ``python -m storm_lib --help`` lists the command line.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, get_profile
from .models import WorldModel, build_world_model
from .types import Batch, Rollout

__all__ = [
    "Batch",
    "CheckpointError",
    "Config",
    "DataError",
    "History",
    "Rollout",
    "TrajectoryData",
    "WorldModel",
    "build_world_model",
    "collect",
    "fit",
    "get_profile",
    "load_checkpoint",
    "load_rssm_checkpoint",
    "psnr",
    "rollout_psnr",
    "save_checkpoint",
]

_LAZY = {
    "DataError": "data",
    "TrajectoryData": "data",
    "collect": "atari",
    "History": "train",
    "fit": "train",
    "load_rssm_checkpoint": "p03",
    "psnr": "evaluate",
    "rollout_psnr": "evaluate",
}


def __getattr__(name: str) -> Any:
    """Import the heavier modules (gymnasium, matplotlib) only when used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'storm_lib' has no attribute {name!r}")
