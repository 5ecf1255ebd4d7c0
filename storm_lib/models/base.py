"""``WorldModel``: what STORM and the RSSM share, so each keeps only what differs.

Both learn the same loss (STORM eq. 3-5, DreamerV3's terms):

    total = rec + reward + cont + dyn_scale * dyn + rep_scale * rep

with ``rec`` the per-frame sum of squared pixel errors and ``dyn``/``rep`` the KL terms
clamped at ``free_bits``. They differ in the sequence model that carries the history
(causal Transformer against GRU) and in what the decoder sees (STORM decodes ``z_t``
alone, the RSSM ``(h_t, z_t)``).

One training loop (``train.fit``), one evaluation protocol (``evaluate``) and one
checkpoint format (``checkpoint``) serve every subclass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..losses import token_nll
from ..types import Batch, ImagineMode, Rollout
from ..utils import evaluating
from .heads import PriorLosses

METRICS = (
    "loss/total", "loss/rec", "loss/reward", "loss/cont", "loss/dyn", "loss/rep",
    "kl/dyn_raw", "token_nll",
)  # fmt: skip
"""The metrics ``loss`` returns, in this order."""


class LatentPredictions(NamedTuple):
    """Teacher-forced latents of a window (:meth:`WorldModel.latent_predictions`).

    Shapes:
        posterior: ``[B, T, K, V]`` log-probabilities of ``q(z_t | ...)``.
        prior: ``[B, T-1, K, V]`` log-probabilities of ``p(z_{t+1} | history up to t,
        a_t)``, the prediction of ``posterior[:, 1:]``.
    """

    posterior: Tensor
    prior: Tensor


class WorldModel(nn.Module):
    """Base class of the world models: the shared checks, the loss assembly and the
    interface every part of the library calls.

    Args:
        config: the whole profile.
        action_dim: A, the number of discrete actions.

    Attributes:
        kind: ``"storm"`` or ``"rssm"`` (the checkpoint's ``model`` entry).
        max_length: the longest window in time steps the model accepts (None: any).
        categoricals, classes: K and V of the categorical latents.
    """

    kind: str = ""
    max_length: int | None = None

    def __init__(self, config: Config, action_dim: int) -> None:
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        self.config, self.action_dim = config, int(action_dim)
        self.image_size = config.data.image_size
        self.categoricals, self.classes = config.vae.categoricals, config.vae.classes

    def parts(self) -> dict[str, nn.Module]:
        """Named parts for parameter counts (encoder, sequence model, prior head, ...)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ checks
    def check_obs(self, obs: Tensor, what: str = "obs") -> None:
        """``obs`` must be ``[B, T, 3, S, S]``."""
        s = self.image_size
        if obs.dim() != 5 or tuple(obs.shape[2:]) != (3, s, s):
            raise ValueError(f"{what} must be [B, T, 3, {s}, {s}], got {tuple(obs.shape)}")

    @staticmethod
    def _check_integer(action: Tensor) -> None:
        if action.is_floating_point() or action.dtype == torch.bool:
            raise ValueError(f"actions must be integer indices, got dtype {action.dtype}")

    def check_actions(self, action: Tensor) -> None:
        """Integer indices in ``[0, action_dim)``. Reading the range is a host sync, so it
        runs once per rollout or diagnostic call; ``loss`` skips it (``fit`` checks the
        data once instead)."""
        self._check_integer(action)
        if action.numel() and bool(((action < 0) | (action >= self.action_dim)).any()):
            raise ValueError(
                f"actions must be in [0, {self.action_dim}) for this model (action_dim="
                f"{self.action_dim}); got values in [{int(action.min())}, "
                f"{int(action.max())}]: wrong action count for this model?"
            )

    def check_window(
        self, obs: Tensor, action: Tensor, *, what: str = "obs", values: bool = True
    ) -> None:
        """``obs [B, T, 3, S, S]`` with ``action [B, T]`` integer indices, ``T`` within
        ``max_length``; with ``values``, also the action range (a host sync)."""
        self.check_obs(obs, what)
        if tuple(action.shape) != tuple(obs.shape[:2]):
            raise ValueError(
                f"actions must be [B, T] = {tuple(obs.shape[:2])}, got {tuple(action.shape)}"
            )
        self._check_integer(action)
        if self.max_length is not None and obs.shape[1] > self.max_length:
            raise ValueError(f"{what} has {obs.shape[1]} steps > max_length={self.max_length}")
        if values:
            self.check_actions(action)

    def check_batch(self, batch: Batch) -> tuple[int, int]:
        """A training batch: shapes, ``T >= 2``, no host sync. Returns ``(B, T)``."""
        self.check_window(batch.obs, batch.action, what="batch", values=False)
        b, t = batch.action.shape
        for name in ("reward", "cont"):
            if tuple(getattr(batch, name).shape) != (b, t):
                raise ValueError(f"batch.{name} must be [B, T] = {(b, t)}")
        if t < 2:
            raise ValueError(f"the loss needs windows of at least 2 steps, got T={t}")
        return b, t

    def check_rollout(
        self, context_obs: Tensor, context_actions: Tensor, future_actions: Tensor
    ) -> int:
        """Arguments of :meth:`imagine`; returns the horizon H."""
        self.check_window(context_obs, context_actions, what="context_obs")
        b, c = context_actions.shape
        if future_actions.dim() != 2 or future_actions.shape[0] != b:
            raise ValueError(
                f"future_actions must be [B={b}, H-1], got {tuple(future_actions.shape)}"
            )
        self.check_actions(future_actions)
        horizon = future_actions.shape[1] + 1
        if self.max_length is not None and c + horizon - 1 > self.max_length:
            raise ValueError(
                f"context {c} + horizon {horizon} - 1 = {c + horizon - 1} time steps exceed "
                f"max_length={self.max_length}"
            )
        return horizon

    @staticmethod
    def check_mode(mode: str) -> None:
        if mode not in ("sample", "mode"):
            raise ValueError(f"mode must be 'sample' or 'mode', got {mode!r}")

    # -------------------------------------------------------------------------- loss
    @staticmethod
    def reconstruction_loss(decoded: Tensor, frames: Tensor) -> Tensor:
        """Per-frame sum of squared errors over C, H, W (the paper's ``||o_hat - o||^2`` as
        the reference code computes it), averaged over frames: ``[N, 3, S, S] x 2 -> []``."""
        return (decoded - frames).square().sum((1, 2, 3)).mean()

    def total_loss(
        self, rec: Tensor, reward: Tensor, cont: Tensor, prior: PriorLosses
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the terms and the detached metrics (:data:`METRICS`)."""
        lc = self.config.loss
        total = rec + reward + cont + lc.dyn_scale * prior.dyn + lc.rep_scale * prior.rep
        values = (total, rec, reward, cont, prior.dyn, prior.rep, prior.dyn_raw, prior.token_nll)
        return total, {name: v.detach() for name, v in zip(METRICS, values, strict=True)}

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss and detached 0-d metrics (:data:`METRICS`) on windows
        ``obs [B, T, 3, S, S]``, ``action/reward/cont [B, T]``."""
        raise NotImplementedError

    # --------------------------------------------------------------------- inference
    def reconstruct(
        self, obs: Tensor, action: Tensor | None = None, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Encode, take the posterior's argmax (``"mode"``) or a sample, decode, clamp:
        ``[B, T, 3, S, S] -> same`` in [0, 1]. ``action [B, T]`` for recurrent models."""
        raise NotImplementedError

    def posterior_log_probs(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """``q(z_t | ...)`` as log-probabilities: ``[B, T, 3, S, S] -> [B, T, K, V]``."""
        raise NotImplementedError

    def imagine(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
        use_cache: bool = True,
    ) -> Rollout:
        """Open-loop rollout of H frames after C real ones, feeding back the model's own
        latents. Checks the arguments, then runs the subclass's ``_rollout`` in eval mode
        without gradients (the train/eval mode is restored).

        Args:
            context_obs: ``[B, C, 3, S, S]`` real frames.
            context_actions: ``[B, C]`` the action taken in each of them.
            future_actions: ``[B, H-1]`` the action after each imagined frame but the last.
            mode: ``"sample"`` draws the latents, ``"mode"`` takes each categorical's argmax.
            use_cache: STORM keeps the keys and values of past steps in a KV cache;
                ``False`` re-runs the whole causal forward pass every step (the slow
                reference). A recurrent model's state is its cache; it ignores this.

        Returns:
            :class:`Rollout`: ``obs [B, H, 3, S, S]`` in [0, 1], ``reward [B, H]``,
            ``cont [B, H]`` (probabilities).
        """
        self.check_rollout(context_obs, context_actions, future_actions)
        self.check_mode(mode)
        with evaluating(self):
            return self._rollout(context_obs, context_actions, future_actions, mode, use_cache)

    def _rollout(
        self, obs: Tensor, actions: Tensor, future: Tensor, mode: ImagineMode, use_cache: bool
    ) -> Rollout:
        """:meth:`imagine`'s rollout, after its checks and in eval mode."""
        raise NotImplementedError

    def predict_one_step(
        self, obs: Tensor, action: Tensor, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Teacher-forced predictions of frames 1..T-1: ``[B, T, ...] -> [B, T-1, 3, S, S]``."""
        raise NotImplementedError

    def latent_predictions(self, obs: Tensor, action: Tensor) -> LatentPredictions:
        """Posterior of every frame and the prior's prediction of the next one, from the
        real history with argmax latents (eval mode, no gradients):
        ``obs [B, T, 3, S, S], action [B, T] ->`` :class:`LatentPredictions`."""
        raise NotImplementedError

    def token_nll_per_step(self, obs: Tensor, action: Tensor) -> Tensor:
        """Teacher-forced ``-log p_prior(z_{t+1} | history)`` of the posterior argmax, in
        nats: ``obs [B, T, 3, S, S], action [B, T] -> [B, T-1]``."""
        latents = self.latent_predictions(obs, action)
        target = F.one_hot(latents.posterior[:, 1:].argmax(-1), self.classes)
        return token_nll(target.to(latents.prior.dtype), latents.prior)

    @staticmethod
    def default_actions(obs: Tensor, action: Tensor | None) -> Tensor:
        """``action``, or action 0 (NOOP in ALE) at every step of ``obs [B, T, ...]``."""
        return action if action is not None else obs.new_zeros(obs.shape[:2], dtype=torch.long)
