"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

BOXING = "ALE/Boxing-v5"


@pytest.fixture(scope="session")
def boxing_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ALE Boxing collection: 400 steps, 4 episodes of 100 (truncated), seed 0."""
    from storm_lib.atari import collect

    path = tmp_path_factory.mktemp("data") / "boxing.npz"
    return collect(BOXING, 400, 0, path, max_episode_steps=100, progress=False)
