"""Construction of either world model by name: ``build_world_model("storm" | "rssm", ...)``."""

from __future__ import annotations

from typing import Literal

import torch

from .config import Config
from .types import WorldModel
from .utils import default_device

ModelKind = Literal["storm", "rssm"]


def model_class(kind: str) -> type:
    """The class for ``kind`` (``"storm"`` or ``"rssm"``)."""
    if kind == "storm":
        from .storm import STORMWorldModel

        return STORMWorldModel
    if kind == "rssm":
        from .rssm import RSSMWorldModel

        return RSSMWorldModel
    raise ValueError(f"unknown world model kind {kind!r}; choose 'storm' or 'rssm'")


def build_world_model(
    kind: ModelKind, config: Config, action_dim: int, device: torch.device | str | None = None
) -> WorldModel:
    """A freshly initialised world model of ``kind`` on ``device`` (default: CUDA if present)."""
    if action_dim < 1:
        raise ValueError(f"action_dim must be >= 1, got {action_dim}")
    model = model_class(kind)(config, action_dim)
    return model.to(default_device(device))
