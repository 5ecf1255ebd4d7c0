"""STORM's sequence model (appendix tables 5-8): token embedding, causal Transformer, KV cache.

Two token layouts (``TransformerConfig.token_layout``):

* ``"fused"`` (STORM, default): one token per step, ``e_t = ActionMixer(z_t, a_t)``.
  The output at token ``t`` is ``h_t``.
* ``"interleaved"`` (the P04 text): ``z_t`` and ``a_t`` are separate tokens, the sequence
  is ``[z_0, a_0, z_1, a_1, ...]`` (2T tokens). ``h_t`` (from which ``z_{t+1}``, ``r_t``
  and ``c_t`` are predicted) is the output at the ``a_t`` token, the first one that has
  seen both ``z_t`` and ``a_t``; the outputs at latent tokens are not used.

The KV cache stores the *projected* keys and values of every layer (not the layer inputs,
which would make each imagination step re-project the whole history; PITFALLS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TransformerConfig

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
    def hidden(out: Tensor) -> Tensor:
        """Transformer outputs ``[B, T, D]`` -> per-step ``h_t`` ``[B, T, D]`` (identity)."""
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
    def hidden(out: Tensor) -> Tensor:
        """Outputs ``[B, 2T, D]`` -> ``h_t`` read at the action tokens ``[B, T, D]``."""
        return out[:, 1::2]


class KVCache:
    """Preallocated projected keys and values of every layer, with a fill ``length``.

    Tensors are allocated once, ``[B, heads, capacity, d_head]`` per layer, and never grow.
    :class:`CausalTransformer` writes a chunk of ``n`` tokens at ``length`` in every layer
    (:meth:`append`) and then moves ``length`` on by ``n`` (:meth:`advance`).
    Create one with :meth:`CausalTransformer.new_cache`.
    """

    def __init__(
        self,
        *,
        layers: int,
        batch: int,
        heads: int,
        capacity: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.batch, self.capacity, self.length = batch, capacity, 0

    def check(self, n: int) -> None:
        """Raise ``ValueError`` unless ``n`` more tokens fit."""
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} tokens exceeded: asked to write positions "
                f"{self.length}..{self.length + n - 1}"
            )

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, heads, n, d_head]`` at ``length``; return all ``[.., length+n, ..]``."""
        n = k.shape[2]
        self.check(n)
        if k.shape[0] != self.batch:
            raise ValueError(f"KV cache holds batch {self.batch}, got batch {k.shape[0]}")
        end = self.length + n
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (after every layer has appended them)."""
        self.check(n)
        self.length += n


def chunk_mask(n: int, start: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """Attention mask for ``n`` queries at positions ``start..start+n-1``.

    Returns ``(mask, is_causal)`` for ``scaled_dot_product_attention``: a chunk from
    position 0 uses the fused causal kernel; one query attends to everything cached;
    otherwise a boolean ``[n, start+n]`` mask, True where key ``j <= start + i``.
    """
    if start == 0:
        return None, n > 1
    if n == 1:
        return None, False
    rows = torch.arange(n, device=device).unsqueeze(1) + start
    return torch.arange(start + n, device=device).unsqueeze(0) <= rows, False


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with bias-free Q/K/V projections (reference code)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.heads, self.head_dim, self.dropout = cfg.heads, cfg.width // cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)  # [B, N, 3, h, dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, N, dh]
        return q, k, v

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``[B, N, D] -> [B, N, D]`` (heads concatenated, before the output projection)."""
        b, n, d = x.shape
        q, k, v = self._split(x)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.append(layer, k, v)  # [B, h, start+N, dh]
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask, causal = chunk_mask(n, start, x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, h, N, dh]
        return out.transpose(1, 2).reshape(b, n, d)

    def weights(self, x: Tensor) -> Tensor:
        """Explicit causal attention weights ``[B, N, D] -> [B, h, N, N]`` (for figures)."""
        q, k, _ = self._split(x)
        n = x.shape[1]
        scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim**0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)


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

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = self.ln1(x + self.drop(self.proj(self.attn(x, cache, layer))))
        return self.ln2(x + self.drop(self.ffn(x)))


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
        """An empty cache for ``batch`` sequences of up to ``max_tokens``, on the model's device."""
        return KVCache(
            layers=self.cfg.layers,
            batch=batch,
            heads=self.cfg.heads,
            capacity=self.max_tokens,
            head_dim=self.cfg.width // self.cfg.heads,
            device=self.pos.device,
            dtype=self.pos.dtype,
        )

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
        start = 0 if cache is None else cache.length
        x = self._embed(x, start)
        if cache is not None:
            cache.check(x.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> Tensor:
        """Attention weights of every layer for a full sequence from position 0, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            x = self._embed(x, 0)
            maps = []
            for block in self.blocks:
                maps.append(block.attn.weights(x))
                x = block(x)
            return torch.stack(maps)
        finally:
            self.train(was_training)
