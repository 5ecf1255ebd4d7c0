"""Prediction heads (STORM appendix table 9): the prior of the next latent (the paper's
"dynamics predictor"), reward and continuation."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from ..config import HeadsConfig
from ..losses import TwoHot, kl_losses, token_nll
from .vae import straight_through_sample, unimix_logits


class PriorLosses(NamedTuple):
    """What a dynamics head contributes to the world-model loss (all scalars)."""

    dyn: Tensor
    """Clamped dynamics KL (trains the prior), with gradients."""
    rep: Tensor
    """Clamped representation KL (trains the encoder), with gradients."""
    dyn_raw: Tensor
    """Unclamped mean dynamics KL, detached."""
    token_nll: Tensor
    """Mean ``-log p_prior(z_{t+1})`` of the posterior sample, nats per frame, detached."""


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers; hidden ones are Linear(no bias) + LayerNorm + ReLU."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, out_dim))
    return nn.Sequential(*mods)


class PriorHead(nn.Module):
    """h ``[..., D]`` -> prior log-probs ``[..., K, V]`` with unimix (one Linear, table 9)."""

    def __init__(self, in_dim: int, categoricals: int, classes: int, unimix: float) -> None:
        super().__init__()
        self.categoricals, self.classes, self.unimix = categoricals, classes, unimix
        self.linear = nn.Linear(in_dim, categoricals * classes)

    def forward(self, h: Tensor) -> Tensor:
        logits = self.linear(h).unflatten(-1, (self.categoricals, self.classes))
        return unimix_logits(logits, self.unimix)

    def sample(self, h: Tensor, mode: str = "sample") -> Tensor:
        """One-hot ``z_{t+1}`` ``[..., K, V]`` drawn (or argmax) from ``forward(h)``."""
        return straight_through_sample(self(h), mode)

    def losses(self, h: Tensor, post: Tensor, z: Tensor, free_bits: float) -> PriorLosses:
        """STORM eq. 5: KL terms of ``post [B, T, K, V]`` against ``forward(h [B, T, D])``
        and the token NLL of the samples ``z [B, T, K, V]`` over all K categoricals."""
        prior = self(h)
        dyn, rep, dyn_raw = kl_losses(post, prior, free_bits)
        return PriorLosses(dyn, rep, dyn_raw, token_nll(z, prior).mean().detach())


class RewardHead(nn.Module):
    """h ``[..., D]`` -> reward logits ``[..., bins]`` over symlog two-hot bins.

    The output layer is zero-initialised, so early predictions are exactly 0.
    """

    def __init__(self, in_dim: int, hidden: int, cfg: HeadsConfig) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden, cfg.reward_bins, cfg.mlp_layers)
        out = self.net[-1]
        assert isinstance(out, nn.Linear)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.two_hot = TwoHot(cfg.reward_bins, cfg.reward_low, cfg.reward_high)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)

    def loss(self, logits: Tensor, reward: Tensor) -> Tensor:
        """Mean symlog two-hot cross-entropy."""
        return self.two_hot.loss(logits, reward).mean()

    def predict(self, logits: Tensor) -> Tensor:
        """Expected reward ``[...]``."""
        return self.two_hot.decode(logits)


class ContinueHead(nn.Module):
    """h ``[..., D]`` -> continuation logit ``[...]`` (Bernoulli, BCE with logits)."""

    def __init__(self, in_dim: int, hidden: int, cfg: HeadsConfig) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden, 1, cfg.mlp_layers)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h).squeeze(-1)
