"""Prediction heads (STORM appendix table 9): dynamics prior, reward, continuation."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import HeadsConfig
from ..losses import TwoHot, unimix_logits


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers; hidden ones are Linear(no bias) + LayerNorm + ReLU."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, out_dim))
    return nn.Sequential(*mods)


class DynamicsHead(nn.Module):
    """h ``[..., D]`` -> prior log-probs ``[..., K, V]`` with unimix (one Linear, table 9)."""

    def __init__(self, in_dim: int, categoricals: int, classes: int, unimix: float) -> None:
        super().__init__()
        self.k, self.v, self.unimix = categoricals, classes, unimix
        self.linear = nn.Linear(in_dim, categoricals * classes)

    def forward(self, h: Tensor) -> Tensor:
        logits = self.linear(h).unflatten(-1, (self.k, self.v))
        return unimix_logits(logits, self.unimix)


class RewardHead(nn.Module):
    """h ``[..., D]`` -> reward logits ``[..., bins]`` over symlog two-hot bins.

    The output layer is zero-initialised, so early predictions are exactly 0.
    """

    def __init__(self, in_dim: int, hidden: int, cfg: HeadsConfig) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden, cfg.reward_bins, cfg.mlp_layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
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
