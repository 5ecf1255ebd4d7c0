"""The shared vocabulary: ``Batch``, ``Rollout`` and the ``RolloutModel`` protocol.

``RolloutModel`` is what the evaluation protocol needs of a model. Our world models
(``storm_lib.models.WorldModel``) provide it, and so does a student's own model wrapped
by ``storm_lib.outside``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Batch:
    """Windows of real experience.

    Convention (STORM's): ``reward[t]`` and ``cont[t]`` follow taking ``action[t]`` in
    ``obs[t]``; ``cont`` is 1 while the episode (life) goes on.

    Shapes:
        obs: ``[B, T, 3, 64, 64]`` float32 in [0, 1].
        action: ``[B, T]`` int64.
        reward: ``[B, T]`` float32.
        cont: ``[B, T]`` float32.
    """

    obs: Tensor
    action: Tensor
    reward: Tensor
    cont: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            obs=self.obs.to(device, non_blocking=non_blocking),
            action=self.action.to(device, non_blocking=non_blocking),
            reward=self.reward.to(device, non_blocking=non_blocking),
            cont=self.cont.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return self.obs.shape[0]

    def chunks(self, size: int) -> list[Batch]:
        """Consecutive sub-batches of at most ``size`` windows (views, no copies)."""
        return [
            Batch(self.obs[i : i + size], self.action[i : i + size],
                  self.reward[i : i + size], self.cont[i : i + size])
            for i in range(0, len(self), size)
        ]  # fmt: skip


@dataclass
class Rollout:
    """An open-loop imagined continuation of ``H`` frames.

    ``obs[:, k-1]`` is the prediction of real frame ``C+k``; ``reward[:, k-1]`` and
    ``cont[:, k-1]`` are the predicted reward and continuation of the transition that
    led to it (the action after frame ``C+k-1``).

    Shapes:
        obs: ``[B, H, 3, 64, 64]`` in [0, 1].
        reward: ``[B, H]``.
        cont: ``[B, H]`` (probability that the episode goes on).
    """

    obs: Tensor
    reward: Tensor
    cont: Tensor


ImagineMode = Literal["sample", "mode"]


@runtime_checkable
class RolloutModel(Protocol):
    """What evaluation calls: rollouts and reconstructions."""

    action_dim: int
    max_length: int | None  # longest context + horizon imagine() accepts (None: unbounded)

    def reconstruct(
        self, obs: Tensor, action: Tensor | None = None, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Encode then decode with the posterior's argmax (``"mode"``) or a sample:
        ``[B, T, 3, 64, 64] -> [B, T, 3, 64, 64]``; ``action [B, T]`` for recurrent models."""
        ...

    def imagine(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
    ) -> Rollout:
        """Open-loop rollout: ``[B,C,3,64,64], [B,C], [B,H-1] -> Rollout`` of H frames."""
        ...
