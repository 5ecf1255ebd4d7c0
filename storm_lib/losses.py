"""Loss building blocks: symlog/symexp, symlog two-hot, categorical KL with free bits.

Pure functions and one small module (:class:`TwoHot`), shared by STORM, the RSSM and the
MaskGIT prior.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def symlog(x: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|) (DreamerV3). Differentiable, unlike the reference code's."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: Tensor) -> Tensor:
    """Inverse of :func:`symlog`: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(x.abs())


class TwoHot(nn.Module):
    """Symlog two-hot encoding over fixed bins (DreamerV3; STORM eq. 4b).

    The bins are one buffer made from ``(low, high, count)``; the bin index and the
    interpolation weights both come from it, so they cannot disagree. Targets outside
    the range are clipped to the end bins (never asserted); a target that hits a bin
    exactly puts all its weight on that bin.

    Args:
        count: number of bins (255 in the paper).
        low: lowest bin, in symlog space.
        high: highest bin, in symlog space.
    """

    bins: Tensor

    def __init__(self, count: int = 255, low: float = -20.0, high: float = 20.0) -> None:
        super().__init__()
        if count < 2 or not high > low:
            raise ValueError(f"need count >= 2 and high > low, got {count}, {low}, {high}")
        self.register_buffer("bins", torch.linspace(low, high, count), persistent=False)

    def encode(self, x: Tensor) -> Tensor:
        """Real values ``[...]`` -> two-hot targets ``[..., count]`` over symlog bins."""
        y = symlog(x.float()).clamp(self.bins[0], self.bins[-1])
        upper = torch.searchsorted(self.bins, y.contiguous(), right=False)  # first bin >= y
        upper = upper.clamp(1, len(self.bins) - 1)
        lower = upper - 1
        lo_v, hi_v = self.bins[lower], self.bins[upper]
        w_hi = ((y - lo_v) / (hi_v - lo_v)).clamp(0.0, 1.0)
        target = torch.zeros(*y.shape, len(self.bins), device=y.device, dtype=y.dtype)
        target.scatter_(-1, lower.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
        target.scatter_add_(-1, upper.unsqueeze(-1), w_hi.unsqueeze(-1))
        return target

    def decode(self, logits: Tensor) -> Tensor:
        """Logits ``[..., count]`` -> expected value ``[...]`` (symexp of the mean bin)."""
        return symexp((logits.float().softmax(-1) * self.bins).sum(-1))

    def loss(self, logits: Tensor, x: Tensor) -> Tensor:
        """Cross-entropy of logits ``[..., count]`` against two-hot(x ``[...]``): ``[...]``."""
        return -(self.encode(x) * logits.float().log_softmax(-1)).sum(-1)


def categorical_kl(post_log_probs: Tensor, prior_log_probs: Tensor) -> Tensor:
    """KL(post || prior) summed over K categoricals of V classes: ``[..., K, V] -> [...]``."""
    return (post_log_probs.exp() * (post_log_probs - prior_log_probs)).sum((-2, -1))


def kl_losses(
    post_log_probs: Tensor, prior_log_probs: Tensor, free_bits: float
) -> tuple[Tensor, Tensor, Tensor]:
    """STORM's dynamics and representation losses (eq. 5a, 5b).

    ``dyn = max(free_bits, mean KL[sg(post) || prior])`` trains the prior;
    ``rep = max(free_bits, mean KL[post || sg(prior)])`` trains the encoder. The clamp
    is on the batch mean, as in STORM (DreamerV3 clamps per element instead); when the
    mean is below ``free_bits`` the term has no gradient.

    Args:
        post_log_probs: posterior log-probabilities ``[..., K, V]``.
        prior_log_probs: prior log-probabilities ``[..., K, V]``.
        free_bits: nats below which a term is not optimised.

    Returns:
        ``(dyn, rep, raw)``: the two clamped scalars and the unclamped mean KL.
    """
    dyn_raw = categorical_kl(post_log_probs.detach(), prior_log_probs).mean()
    rep_raw = categorical_kl(post_log_probs, prior_log_probs.detach()).mean()
    return free_bits_clamp(dyn_raw, rep_raw, free_bits)


def free_bits_clamp(
    dyn_raw: Tensor, rep_raw: Tensor, free_bits: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(max(free_bits, dyn_raw), max(free_bits, rep_raw), dyn_raw detached)`` for two
    scalar mean KLs: below ``free_bits`` nats a term has no gradient.

    ``clamp(min=)`` takes the floor as a kernel argument: building it as a tensor on the
    device (``torch.tensor(free_bits, device=...)``) would be a blocking host-to-device
    copy in every training step. Same values and gradients as ``torch.maximum`` with a
    floor tensor (only at an exact tie does clamp pass the whole gradient, not half).
    """
    free_bits = float(free_bits)
    return dyn_raw.clamp(min=free_bits), rep_raw.clamp(min=free_bits), dyn_raw.detach()


def token_nll(sample: Tensor, prior_log_probs: Tensor) -> Tensor:
    """-log p_prior(z) of one-hot samples ``[..., K, V]``, summed over K: ``[...]`` nats."""
    return -(sample.detach() * prior_log_probs).sum((-2, -1))
