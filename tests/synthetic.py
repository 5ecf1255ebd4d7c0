"""Stand-ins several test files share: random experience split as training splits it, and
a tiny embedding network in the I3D's place for FVD."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from storm_lib.data import TrajectoryData


def random_split(
    actions: int = 4, episodes: int = 4, episode_length: int = 30, val_fraction: float = 0.34
) -> tuple[TrajectoryData, TrajectoryData]:
    """``episodes x episode_length`` random 64x64 frames with random actions and rewards,
    split into (train, val) by whole episodes (seed 0)."""
    rng = np.random.default_rng(0)
    n = episodes * episode_length
    return TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        action=rng.integers(0, actions, n).astype(np.int64),
        reward=rng.choice([0.0, 1.0], n).astype(np.float32),
        cont=np.ones(n, np.float32),
        episode=np.repeat(np.arange(episodes), episode_length).astype(np.int32),
    ).split(val_fraction, seed=0)


class TinyEmbed(nn.Module):
    """Stand-in for the I3D: per-channel means and spreads over time and space.
    ``[B, 3, T, H, W] -> [B, 9]``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4)), x[:, :, -1].mean((2, 3))], 1)
