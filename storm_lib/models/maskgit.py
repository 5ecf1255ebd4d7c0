"""MaskGIT dynamics prior of GIT-STORM (section 3.2, Figure 1, eq. 3-4, Algorithms 1-2).

GIT-STORM replaces STORM's one-Linear prior ``p(z_{t+1} | h_t)`` with a small
*bidirectional* Transformer over the K categorical tokens of the next latent:

* input: the K tokens of ``z_{t+1}``, some of them replaced by a ``[MASK]`` token, embedded
  with a learned codebook of V + 1 entries (row V is ``[MASK]``), plus one conditioning
  token ``Linear(h_t)`` prepended to them, plus learned positions;
* output ``xi`` at the K token positions -> Linear + GELU + LayerNorm (MaskGIT's MLM
  layer) -> logits = ``xi @ codebook[:V].T + bias`` (weight tying, the paper's dot
  product), then the same 1% unimix as STORM's prior.

Training (eq. 3-4): per frame, ``M = ceil(cos(pi/2 * r) * K)`` tokens are masked,
``r ~ U[0, 1)`` (cosine schedule, at least one); the KL terms and the token NLL count only
the masked positions. Sampling: draft-and-revise (Algorithms 1 and 2).

Choices where the paper is ambiguous or departs from this code (documented here once):

* Which tokens are masked. Section 3.2 writes ``z_t o m_t`` but eq. 3-4 mask the posterior
  of the *predicted* frame, ``q(z_t | x_t) o m_t`` against ``p(z_t | h_{t-1})``; as in TECO
  and MaskGIT we feed the masked tokens of the frame being predicted, ``z_{t+1}``, together
  with ``h_t``. "Concatenated" is read as one extra token in the sequence.
* Eq. 4 says the mask "eliminates the masked tokens from the loss", but MaskGIT trains on
  the masked tokens (the unmasked ones are given in the input); we keep the masked ones.
  Their KL (and NLL) is averaged over the masked positions and multiplied by K, so every
  number is "per frame" like the MLP head's and the free-bits floor of 1 nat keeps its
  meaning; the paper does not say how it normalises.
* ``Algorithm 2`` writes ``z o m^i`` for "the positions of ``m^i`` replaced by ``[MASK]``".
* Table 8 fixes ``T_draft = T_revise = M = 1``: the draft fills all K tokens in one pass
  from an all-masked input, and the single revise pass masks all K tokens again, so with
  the paper's settings the revise pass re-draws from the same distribution (it ignores the
  draft). More rounds (``MaskGITConfig``) make the draft/revise passes condition on
  earlier tokens.
* ``forward(h)`` (used for the teacher-forced token NLL and perplexity) is the all-masked
  prediction: the distribution the paper's one-round draft samples from.

Glossary: K categoricals, V classes, D width of ``h``, W MaskGIT width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, MaskGITConfig
from ..losses import free_bits_clamp
from .heads import PriorHead, PriorLosses
from .vae import draw_index, unimix_logits

POS_INIT_STD = 0.02
"""Std of the learned positions and the codebook at initialisation (BERT-style)."""


def cosine_mask(shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """Random training masks with MaskGIT's cosine schedule.

    Each row of K positions gets ``M = ceil(cos(pi/2 * r) * K)`` masked positions, ``r ~
    U[0, 1)``, clamped to ``[1, K]``, at uniformly random places (global RNG).

    Shapes:
        ``shape = (..., K) -> bool [..., K]``, True = masked.
    """
    k = shape[-1]
    ratio = torch.cos(0.5 * math.pi * torch.rand(shape[:-1], device=device))
    count = torch.ceil(ratio * k).clamp(1, k).long()  # [...]
    rank = torch.rand(shape, device=device).argsort(-1).argsort(-1)  # a random order
    return rank < count.unsqueeze(-1)


def random_partition(rows: int, k: int, sets: int, device: torch.device | None = None) -> Tensor:
    """A random partition of K positions into ``sets`` disjoint sets of (nearly) equal size.

    Returns the set index of every position: ``[rows, K]`` int64 in ``[0, sets)``; set ``i``
    holds ``floor(K / sets)`` or one more positions (the paper's ``p_draft``/``p_revise``:
    uniform over such partitions).
    """
    if not 1 <= sets <= k:
        raise ValueError(f"a partition of {k} positions needs 1..{k} sets, got {sets}")
    rank = torch.rand(rows, k, device=device).argsort(-1).argsort(-1)
    return rank * sets // k


class MaskGITPrior(nn.Module):
    """The GIT-STORM prior ``p(z_{t+1} | h_t)``: a bidirectional Transformer over K tokens.

    Args:
        cond_dim: D, width of ``h_t``.
        categoricals: K.
        classes: V.
        unimix: share of the uniform distribution mixed into every categorical.
        cfg: sizes and decoding rounds (:class:`storm_lib.config.MaskGITConfig`).

    Shapes:
        ``forward(h [..., D]) -> [..., K, V]`` log-probs (all tokens masked);
        ``log_probs(h [N, D], tokens [N, K]) -> [N, K, V]``;
        ``sample(h [..., D]) -> [..., K, V]`` one-hot.
    """

    def __init__(
        self, cond_dim: int, categoricals: int, classes: int, unimix: float, cfg: MaskGITConfig
    ) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"MaskGIT width {cfg.width} not divisible by heads {cfg.heads}")
        self.categoricals, self.classes, self.unimix, self.cfg = categoricals, classes, unimix, cfg
        self.mask_id = classes
        w = cfg.width
        self.codebook = nn.Embedding(classes + 1, w)  # row V is [MASK]
        nn.init.normal_(self.codebook.weight, std=POS_INIT_STD)
        self.cond = nn.Linear(cond_dim, w)
        self.pos = nn.Parameter(torch.randn(1, categoricals + 1, w) * POS_INIT_STD)
        layer = nn.TransformerEncoderLayer(
            w, cfg.heads, cfg.ffn_mult * w, cfg.dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.mlm = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w), nn.GELU(), nn.LayerNorm(w))
        self.bias = nn.Parameter(torch.zeros(classes))

    # ------------------------------------------------------------------------ network
    def log_probs(self, h: Tensor, tokens: Tensor) -> Tensor:
        """Prior log-probs of every position given ``h`` and partly masked ``tokens``.

        Args:
            h: ``[N, D]`` hidden states.
            tokens: ``[N, K]`` int64 class indices, ``mask_id`` (= V) where masked.

        Returns:
            ``[N, K, V]`` log-probabilities (with unimix).
        """
        x = torch.cat([self.cond(h)[:, None], self.codebook(tokens).to(h.dtype)], 1)
        xi = self.mlm(self.blocks(x + self.pos)[:, 1:])  # [N, K, W]
        logits = xi @ self.codebook.weight[: self.classes].t().to(xi.dtype) + self.bias  # tying
        return unimix_logits(logits, self.unimix)

    def forward(self, h: Tensor) -> Tensor:
        """All-masked prediction ``[..., D] -> [..., K, V]`` (the one-pass draft's)."""
        flat = h.reshape(-1, h.shape[-1])
        masked = torch.full((flat.shape[0], self.categoricals), self.mask_id, device=h.device)
        return self.log_probs(flat, masked).reshape(*h.shape[:-1], self.categoricals, self.classes)

    # ----------------------------------------------------------------------- training
    def losses(
        self, h: Tensor, post: Tensor, z: Tensor, free_bits: float, mask: Tensor | None = None
    ) -> PriorLosses:
        """Eq. 3-4: dynamics and representation KL, and the token NLL, on masked positions.

        For each frame, the masked positions (``cosine_mask`` unless ``mask`` is given) of
        the sampled posterior ``z`` are replaced by ``[MASK]``; the prior is predicted from
        ``h`` and the rest. Per frame, ``KL = K * mean over masked k of
        KL(post_k || prior_k)`` (``dyn`` with ``sg(post)``, ``rep`` with ``sg(prior)``);
        both are clamped at ``free_bits`` on the batch mean, as STORM does.
        ``token_nll`` is ``K * mean over masked k of -log prior_k(z_k)`` (nats per frame):
        the loss of predicting the masked tokens from the unmasked ones and ``h``.

        Args:
            h: ``[B, T, D]`` hidden states ``h_t``.
            post: ``[B, T, K, V]`` posterior log-probs of ``z_{t+1}``.
            z: ``[B, T, K, V]`` one-hot posterior samples of ``z_{t+1}``.
            free_bits: the KL floor in nats.
            mask: optional ``[B, T, K]`` bool, True = masked (for tests).

        Returns:
            :class:`PriorLosses` (``dyn``, ``rep`` with gradients; ``dyn_raw``, ``token_nll``
            detached scalars).
        """
        lead = h.shape[:-1]
        index = z.detach().argmax(-1)  # [B, T, K]
        if mask is None:
            mask = cosine_mask(tuple(index.shape), h.device)
        tokens = index.masked_fill(mask, self.mask_id)
        prior = self.log_probs(h.reshape(-1, h.shape[-1]), tokens.reshape(-1, self.categoricals))
        prior = prior.reshape(*lead, self.categoricals, self.classes)
        weight = mask.to(prior.dtype)
        weight = weight * self.categoricals / weight.sum(-1, keepdim=True).clamp(min=1.0)  # K / M

        def per_frame(x: Tensor) -> Tensor:  # [B, T, K] -> [B, T]
            return (x * weight).sum(-1)

        dyn_raw = per_frame((post.detach().exp() * (post.detach() - prior)).sum(-1)).mean()
        rep_raw = per_frame((post.exp() * (post - prior.detach())).sum(-1)).mean()
        nll = per_frame(-(z.detach() * prior).sum(-1)).mean()
        return PriorLosses(*free_bits_clamp(dyn_raw, rep_raw, free_bits), nll.detach())

    # ----------------------------------------------------------------------- sampling
    def fill(
        self, h: Tensor, tokens: Tensor, groups: Tensor, mode: str, sets: int | None = None
    ) -> Tensor:
        """Algorithm 2: for each set ``i`` of the partition, mask its positions, predict
        them from ``h`` and the other tokens, and replace them with a draw.

        Args:
            h: ``[N, D]``.
            tokens: ``[N, K]`` current tokens (``mask_id`` where still empty).
            groups: ``[N, K]`` the set index of every position (``random_partition``).
            mode: ``"sample"`` draws, ``"mode"`` takes the argmax.
            sets: the number of sets of ``groups``, as given to ``random_partition`` (it
                gives every row exactly that many, non-empty). Pass it: without it the
                count is read off ``groups``, a host sync that stalls the GPU at every
                imagined step.

        Returns:
            ``[N, K]`` the updated tokens; only positions of set ``i`` change in pass ``i``.
        """
        if sets is None:
            sets = int(groups.max()) + 1
        for i in range(sets):
            chosen = groups == i
            probs = self.log_probs(h, tokens.masked_fill(chosen, self.mask_id)).exp()
            tokens = torch.where(chosen, draw_index(probs, mode), tokens)
        return tokens

    def sample(self, h: Tensor, mode: str = "sample") -> Tensor:
        """Algorithm 1, draft-and-revise: ``h [..., D] -> one-hot z_{t+1} [..., K, V]``.

        Draft: from all-masked tokens, ``fill`` with a random partition into
        ``draft_rounds`` sets. Revise, ``revise_repeats`` times: ``fill`` again with a new
        random partition into ``revise_rounds`` sets. Uses the global RNG.
        """
        cfg, flat = self.cfg, h.reshape(-1, h.shape[-1])
        n = flat.shape[0]
        tokens = torch.full((n, self.categoricals), self.mask_id, device=h.device)
        # The round counts are Python ints from the config: no host sync per imagined step.
        groups = random_partition(n, self.categoricals, cfg.draft_rounds, h.device)
        tokens = self.fill(flat, tokens, groups, mode, cfg.draft_rounds)
        for _ in range(cfg.revise_repeats):
            groups = random_partition(n, self.categoricals, cfg.revise_rounds, h.device)
            tokens = self.fill(flat, tokens, groups, mode, cfg.revise_rounds)
        return (
            F.one_hot(tokens, self.classes)
            .to(h.dtype)
            .reshape(*h.shape[:-1], self.categoricals, self.classes)
        )


def build_prior_head(config: Config, width: int) -> PriorHead | MaskGITPrior:
    """The prior ``p(z_{t+1} | h_t)`` chosen by ``config.heads.dynamics_head``.

    ``"mlp"``: STORM's :class:`PriorHead`; ``"maskgit"``: :class:`MaskGITPrior` sized
    by ``config.maskgit``. Both take ``h [..., D=width]`` and offer ``forward`` (log-probs
    ``[..., K, V]``), ``sample(h, mode)`` and ``losses(h, post, z, free_bits)``.
    """
    vae, head = config.vae, config.heads.dynamics_head
    if head == "mlp":
        return PriorHead(width, vae.categoricals, vae.classes, vae.unimix)
    if head == "maskgit":
        return MaskGITPrior(width, vae.categoricals, vae.classes, vae.unimix, config.maskgit)
    raise ValueError(f"dynamics_head must be 'mlp' or 'maskgit', got {head!r}")
