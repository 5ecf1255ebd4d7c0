"""Stand-in for NM512/dreamerv3-torch's tools.py: the distributions its networks return,
and ``save_episodes``, which writes the replay directory (one ``.npz`` per episode, named
``{episode id}-{length}.npz``). The original also imports tensorboard at the top (its
Logger); this stand-in does not, and a test checks the error a missing dependency gives.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import torch
import torch.nn.functional as F


def symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    return torch.sign(x) * torch.expm1(x.abs())


class OneHotDist(torch.distributions.OneHotCategorical):
    """One-hot categorical with a uniform mix and straight-through samples and mode."""

    def __init__(self, logits=None, probs=None, unimix_ratio=0.0):
        if logits is not None and unimix_ratio > 0.0:
            mixed = logits.softmax(-1) * (1 - unimix_ratio) + unimix_ratio / logits.shape[-1]
            logits = mixed.log()
        super().__init__(logits=logits, probs=probs)

    def mode(self):
        hard = F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).to(self.logits.dtype)
        return hard + self.logits - self.logits.detach()

    def sample(self, sample_shape=()):
        hard = super().sample(sample_shape).detach()
        return hard + self.probs - self.probs.detach()


class MSEDist:
    """The image "distribution" of an MSE decoder: its mode is the (unbounded) mean."""

    def __init__(self, mode):
        self._mode = mode

    def mode(self):
        return self._mode

    def log_prob(self, value):
        return -(self._mode - value).square().sum(tuple(range(2, value.ndim)))


class DiscDist:
    """Reward head: a mean in symlog space from 255 bin logits (a simplification)."""

    def __init__(self, logits):
        bins = torch.linspace(-20.0, 20.0, logits.shape[-1], device=logits.device)
        self._mean = (logits.softmax(-1) * bins).sum(-1, keepdim=True)

    def mode(self):
        return symexp(self._mean)

    def log_prob(self, value):
        return -(self._mean - symlog(value)).square().sum(-1)


class Bernoulli:
    def __init__(self, logits):
        self._logits = logits

    def mode(self):
        return (self._logits > 0).float()

    def log_prob(self, value):
        return -F.binary_cross_entropy_with_logits(self._logits, value, reduction="none").sum(-1)


def save_episodes(directory, episodes):
    directory = pathlib.Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for name, episode in episodes.items():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **episode)
        (directory / f"{name}-{len(episode['reward'])}.npz").write_bytes(buffer.getvalue())
    return True
