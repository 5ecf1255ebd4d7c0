"""STORM's sequence model (appendix tables 5-8): token embedding, causal Transformer, KV cache.

Two token layouts (``TransformerConfig.token_layout``):

* ``"fused"`` (STORM, default): one token per step, ``e_t = ActionMixer(z_t, a_t)``.
  The output at token ``t`` is ``h_t``.
* ``"interleaved"`` (the P04 text): ``z_t`` and ``a_t`` are separate tokens, the sequence
  is ``[z_0, a_0, z_1, a_1, ...]`` (2T tokens). ``h_t`` (from which ``z_{t+1}``, ``r_t``
  and ``c_t`` are predicted) is the output at the ``a_t`` token, the first one that has
  seen both ``z_t`` and ``a_t``; the outputs at latent tokens are not used.

The KV cache stores the *projected* keys and values of every layer (not the layer inputs,
which would make each imagination step re-project the whole history, a slip seen in
public implementations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TransformerConfig
from ..utils import evaluating
from . import speedups

POS_INIT_STD = 0.02
"""Std of the learned positional table at initialisation (GPT-style)."""


class ActionMixer(nn.Module):
    """Fused token ``e_t = m(z_t, a_t)`` (table 5).

    concat(flattened z, one-hot a) -> Linear1 + LN1 + ReLU -> Linear2 + LN2. The Linears
    have no bias (a LayerNorm follows each), as in the reference code.

    Args:
        latent_dim: K*V.
        action_dim: A.
        width: D.

    Shapes:
        ``z [B, T, K*V], action [B, T] (int) -> [B, T, D]``.
    """

    tokens_per_step = 1

    def __init__(self, latent_dim: int, action_dim: int, width: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim + action_dim, width, bias=False),
            nn.LayerNorm(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width, bias=False),
            nn.LayerNorm(width),
        )

    def forward(self, z: Tensor, action: Tensor) -> Tensor:
        one_hot = F.one_hot(action, self.action_dim).to(z.dtype)
        return self.net(torch.cat([z, one_hot], -1))

    @staticmethod
    def states(out: Tensor) -> Tensor:
        """Transformer outputs ``[B, T, D]`` -> the states ``h_t`` ``[B, T, D]``: one token
        per step, so every output is one."""
        return out


class InterleavedEmbedding(nn.Module):
    """Separate latent and action tokens ``[z_0, a_0, z_1, a_1, ...]`` (P04 layout).

    Latent token: Linear(K*V -> D) + LN; action token: ``nn.Embedding(A, D)``.

    Shapes:
        ``z [B, T, K*V], action [B, T] (int) -> [B, 2T, D]``.
    """

    tokens_per_step = 2

    def __init__(self, latent_dim: int, action_dim: int, width: int) -> None:
        super().__init__()
        self.latent = nn.Sequential(nn.Linear(latent_dim, width, bias=False), nn.LayerNorm(width))
        self.action = nn.Embedding(action_dim, width)

    def forward(self, z: Tensor, action: Tensor) -> Tensor:
        tokens = torch.stack([self.latent(z), self.action(action).to(z.dtype)], 2)  # [B,T,2,D]
        return tokens.flatten(1, 2)

    @staticmethod
    def states(out: Tensor) -> Tensor:
        """Transformer outputs ``[B, 2T, D]`` -> the states ``h_t`` ``[B, T, D]``, read at
        the action tokens."""
        return out[:, 1::2]


class LayerCache:
    """The projected keys and values one attention layer has seen, preallocated.

    ``keys`` and ``values`` are ``[B, heads, capacity, d_head]``, allocated once and never
    grown; ``length`` positions are filled. The protocol is one call:
    :meth:`append` writes a chunk at ``length``, moves ``length`` on and returns
    everything so far. The cache holds projected keys and values, not layer inputs, so an
    imagination step never re-projects the history.
    """

    def __init__(
        self, batch: int, heads: int, capacity: int, head_dim: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        shape = (batch, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.capacity, self.length = batch, capacity, 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``keys, values [B, heads, n, d_head]`` at positions ``length..length+n-1``;
        return all keys and values so far, ``[B, heads, length, d_head]`` (after the move)."""
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} tokens exceeded: asked to write positions "
                f"{self.length}..{end - 1}"
            )
        if keys.shape[0] != self.batch:
            raise ValueError(f"KV cache holds batch {self.batch}, got batch {keys.shape[0]}")
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache(list[LayerCache]):
    """One :class:`LayerCache` per Transformer layer, made by
    :meth:`CausalTransformer.new_cache`; ``length`` is the number of positions seen."""

    @property
    def length(self) -> int:
        return self[0].length


def attention(queries: Tensor, keys: Tensor, values: Tensor, start: int, dropout: float) -> Tensor:
    """Causal scaled dot-product attention: ``softmax(Q K^T / sqrt(d_head)) V``.

    Queries ``[B, h, N, d_head]`` sit at positions ``start..start+N-1``; keys and values
    ``[B, h, start+N, d_head]`` cover positions ``0..start+N-1``; query ``i`` sees keys
    ``j <= start + i``. Returns ``[B, h, N, d_head]``. With the speed-ups on, PyTorch's
    fused kernel computes the same (``speedups.fused_attention``).
    """
    if speedups.enabled("fused_attention"):
        return speedups.fused_attention(queries, keys, values, start, dropout)
    scores = queries @ keys.transpose(-1, -2) / queries.shape[-1] ** 0.5
    visible = speedups.causal_mask(queries.shape[2], start, queries.device)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return F.dropout(probs, dropout) @ values


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with bias-free Q/K/V projections (reference code)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.heads, self.head_dim, self.dropout = cfg.heads, cfg.width // cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, D]`` -> queries, keys, values, each ``[B, heads, N, d_head]``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)  # [B, N, 3, h, dh]
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return queries, keys, values

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """``[B, N, D] -> [B, N, D]`` (heads concatenated, before the output projection).
        With a cache, ``x`` continues the cached positions and is appended to it."""
        b, n, d = x.shape
        queries, keys, values = self._project(x)
        start = 0
        if cache is not None:
            start = cache.length
            keys, values = cache.append(keys, values)  # [B, h, start+N, dh]
            keys, values = keys.to(queries.dtype), values.to(queries.dtype)
        out = attention(queries, keys, values, start, self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, d)

    def attention_probs(self, x: Tensor) -> Tensor:
        """Causal attention probabilities ``[B, N, D] -> [B, h, N, N]`` (for figures)."""
        queries, keys, _ = self._project(x)
        scores = (queries.float() @ keys.float().transpose(-1, -2)) / self.head_dim**0.5
        visible = speedups.causal_mask(x.shape[1], 0, x.device)
        return scores.masked_fill(~visible, float("-inf")).softmax(-1)


class Block(nn.Module):
    """Post-LN Transformer block (table 7).

    x1 -> MHSA -> Linear + Dropout -> +x1 -> LN1 (= x2) -> Linear(D, ffn_mult*D) + ReLU
    -> Linear(ffn_mult*D, D) + Dropout -> +x2 -> LN2.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.width
        self.attn = CausalSelfAttention(cfg)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_mult * d), nn.ReLU(inplace=True), nn.Linear(cfg.ffn_mult * d, d)
        )
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """``[B, N, D] -> [B, N, D]``; with a cache, ``x`` continues the cached positions."""
        attended = self.proj(self.attn(x, cache))
        x = self.ln1(x + self.drop(attended))
        transformed = self.ffn(x)
        return self.ln2(x + self.drop(transformed))


class CausalTransformer(nn.Module):
    """Learned positional encoding + LN (table 6), then post-LN causal blocks (tables 7-8).

    Departure: the positional table is initialised N(0, 0.02) (GPT-style; the paper does
    not say, the reference code uses N(0, 1)), so positions never seen in training stay
    close to neutral.

    Args:
        cfg: widths, depth, heads, dropout and ``max_length`` (in time steps).

    Shapes:
        forward: ``x [B, N, D] -> [B, N, D]``; with a cache, positions start at ``cache.length``.
        attention_maps: ``x [B, N, D] -> [layers, B, heads, N, N]``.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens_per_step = 2 if cfg.token_layout == "interleaved" else 1
        self.max_tokens = cfg.max_length * self.tokens_per_step
        self.pos = nn.Parameter(torch.randn(self.max_tokens, cfg.width) * POS_INIT_STD)
        self.pos_ln = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache, one :class:`LayerCache` per block, for ``batch`` sequences of up
        to ``max_tokens``, on the model's device."""
        cfg = self.cfg
        return KVCache(
            LayerCache(batch, cfg.heads, self.max_tokens, cfg.width // cfg.heads,
                       self.pos.device, self.pos.dtype)
            for _ in self.blocks
        )  # fmt: skip

    def _embed(self, x: Tensor, start: int) -> Tensor:
        n = x.shape[1]
        if start + n > self.max_tokens:
            raise ValueError(
                f"sequence of {start + n} tokens (positions {start}..{start + n - 1}) exceeds the "
                f"{self.max_tokens} learned positions (max_length={self.cfg.max_length} steps "
                f"x {self.tokens_per_step} tokens per step)"
            )
        return self.pos_ln(x + self.pos[start : start + n])

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Tokens ``[B, N, D] -> [B, N, D]``; with a cache, they continue its positions."""
        x = self._embed(x, 0 if cache is None else cache.length)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return x

    def attention_maps(self, x: Tensor) -> Tensor:
        """Attention probabilities of every layer for a full sequence from position 0, in
        eval mode: ``[B, N, D] -> [layers, B, heads, N, N]``."""
        with evaluating(self):
            x = self._embed(x, 0)
            maps = []
            for block in self.blocks:
                assert isinstance(block, Block)
                maps.append(block.attn.attention_probs(x))
                x = block(x)
            return torch.stack(maps)
