"""The world models, in the order P04 reads them.

=================  ==================================================================
``vae.py``         categorical VAE: encoder, straight-through sampling, decoder
``transformer.py`` action mixer, causal self-attention, blocks, the KV cache
``heads.py``       prior (dynamics) head, reward and continuation heads
``maskgit.py``     GIT-STORM's MaskGIT prior, an alternative prior head
``base.py``        ``WorldModel``: the checks, loss assembly and interface both share
``storm.py``       ``STORMWorldModel``: VAE + Transformer + heads
``rssm.py``        ``RSSMWorldModel``: the DreamerV3-style baseline (GRU)
``speedups.py``    faster versions of plain operations, behind one switch
=================  ==================================================================

``build_world_model("storm" | "rssm", config, action_dim)`` makes either.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..utils import default_device
from .base import WorldModel
from .rssm import RSSMWorldModel
from .storm import STORMWorldModel

MODEL_CLASSES: dict[str, type[WorldModel]] = {"storm": STORMWorldModel, "rssm": RSSMWorldModel}

__all__ = ["RSSMWorldModel", "STORMWorldModel", "WorldModel", "build_world_model", "model_class"]


def model_class(kind: str) -> type[WorldModel]:
    """The class for ``kind`` (``"storm"`` or ``"rssm"``)."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown world model kind {kind!r}; choose 'storm' or 'rssm'")
    return MODEL_CLASSES[kind]


def build_world_model(
    kind: str, config: Config, action_dim: int, device: torch.device | str | None = None
) -> WorldModel:
    """A freshly initialised world model of ``kind`` on ``device`` (default: CUDA if present)."""
    if action_dim < 1:
        raise ValueError(f"action_dim must be >= 1, got {action_dim}")
    return model_class(kind)(config, action_dim).to(default_device(device))
