"""Loss building blocks: symlog/symexp, symlog two-hot, categorical KL with free bits.

Pure functions and one small module (:class:`TwoHot`), shared by STORM and the RSSM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Mix ``unimix`` of the uniform distribution into categorical logits ``[..., V]``.

    Returns log-probabilities, so ``softmax`` of the result is the mixed distribution.
    """
    if unimix <= 0.0:
        return logits.log_softmax(-1)
    probs = logits.float().softmax(-1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return probs.log()


def sample_categorical(probs: Tensor) -> Tensor:
    """One index per row of ``probs [..., V]`` (need not sum to 1), by inverse CDF: ``[...]``.

    The same distribution as ``torch.multinomial(probs, 1)``, drawn from one uniform per
    row (a cumulative sum and a binary search) instead of the V exponentials
    multinomial draws: sampling 2048 rows of 32 classes took 0.28 ms here against 2.9
    ms, which was a quarter of a KV-cached imagination step on the cpu profile. The
    draws differ from multinomial's for the same seed. Classes of probability 0 are
    never drawn: the search returns the first class whose cumulative sum exceeds u.
    """
    cdf = probs.float().cumsum(-1)
    u = torch.rand(*cdf.shape[:-1], 1, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return index.clamp_max_(probs.shape[-1] - 1)  # u rounded up to the total


def draw_index(probs: Tensor, mode: str) -> Tensor:
    """``probs [..., V] -> [...]`` class indices: ``"sample"`` draws
    (:func:`sample_categorical`), ``"mode"`` takes the argmax."""
    if mode == "sample":
        return sample_categorical(probs)
    if mode == "mode":
        return probs.argmax(-1)
    raise ValueError(f"mode must be 'sample' or 'mode', got {mode!r}")


def straight_through_sample(log_probs: Tensor, mode: str = "sample") -> Tensor:
    """One-hot sample ``[..., K, V]`` with straight-through gradients to ``log_probs``.

    ``mode`` is as in :func:`draw_index`. The forward value is one-hot; the gradient is that
    of the probabilities. With autograd the value is ``one_hot + p - p``, one-hot up to
    float rounding; without (imagination, evaluation) the exact one-hot is returned,
    skipping the two straight-through ops.
    """
    probs = log_probs.exp()
    one_hot = F.one_hot(draw_index(probs, mode), probs.shape[-1]).to(probs.dtype)
    if not probs.requires_grad:
        return one_hot
    return one_hot + probs - probs.detach()


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
    floor = torch.tensor(free_bits, device=dyn_raw.device, dtype=dyn_raw.dtype)
    return torch.maximum(floor, dyn_raw), torch.maximum(floor, rep_raw), dyn_raw.detach()


def token_nll(sample: Tensor, prior_log_probs: Tensor) -> Tensor:
    """-log p_prior(z) of one-hot samples ``[..., K, V]``, summed over K: ``[...]`` nats."""
    return -(sample.detach() * prior_log_probs).sum((-2, -1))
