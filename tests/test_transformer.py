"""Causal Transformer, token embeddings and KV cache (storm_lib.models.transformer)."""

from __future__ import annotations

import pytest
import torch

from storm_lib.config import TransformerConfig
from storm_lib.models.speedups import chunk_mask
from storm_lib.models.transformer import ActionMixer, CausalTransformer, InterleavedEmbedding

LAYOUTS = ("fused", "interleaved")


def make(layout: str = "fused", max_length: int = 8) -> CausalTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        width=32, layers=2, heads=4, dropout=0.1, max_length=max_length, token_layout=layout
    )
    return CausalTransformer(cfg).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_steps_equals_full_forward(layout: str) -> None:
    net = make(layout)
    per_step = net.tokens_per_step
    x = torch.randn(3, net.max_tokens, 32)
    with torch.no_grad():
        full = net(x)
        cache = net.new_cache(3)
        prefill = 3 * per_step
        outs = [net(x[:, :prefill], cache)]  # one pass from position 0 (is_causal)
        for p in range(prefill, net.max_tokens, per_step):  # 1 or 2 tokens per step
            outs.append(net(x[:, p : p + per_step], cache))
    assert cache.length == net.max_tokens
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_multi_token_chunk_at_offset_uses_causal_mask() -> None:
    net = make(max_length=10)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        full = net(x)
        cache = net.new_cache(2)
        out = torch.cat([net(x[:, :4], cache), net(x[:, 4:7], cache), net(x[:, 7:], cache)], 1)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)


def test_chunk_mask_values() -> None:
    assert chunk_mask(4, 0, torch.device("cpu")) == (None, True)
    assert chunk_mask(1, 5, torch.device("cpu")) == (None, False)
    mask, causal = chunk_mask(2, 3, torch.device("cpu"))
    assert not causal
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_cache_is_preallocated_and_bounded() -> None:
    net = make(max_length=6)
    cache = net.new_cache(2)
    tensors = [t for layer in cache for t in (layer.keys, layer.values)]  # one cache per layer
    ptrs, shapes = [t.data_ptr() for t in tensors], [t.shape for t in tensors]
    assert shapes[0] == (2, 4, 6, 8)  # [B, heads, max_tokens, d_head]
    assert len(cache) == 2 and cache[0].keys.dtype == net.pos.dtype
    with torch.no_grad():
        net(torch.randn(2, 4, 32), cache)
        net(torch.randn(2, 1, 32), cache)
        net(torch.randn(2, 1, 32), cache)
    assert cache.length == 6 and all(layer.length == 6 for layer in cache)
    tensors = [t for layer in cache for t in (layer.keys, layer.values)]
    assert [t.data_ptr() for t in tensors] == ptrs and [t.shape for t in tensors] == shapes
    with pytest.raises(ValueError, match="exceeds the 6 learned positions"):
        net(torch.randn(2, 1, 32), cache)
    with pytest.raises(ValueError, match=r"capacity 6 .*positions 6\.\.6"):
        cache[0].append(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))
    assert cache.length == 6


def test_too_long_sequence_is_a_clear_error() -> None:
    net = make(max_length=4)
    with pytest.raises(ValueError, match="max_length=4"):
        net(torch.randn(1, 5, 32))
    cache = net.new_cache(1)
    net(torch.randn(1, 3, 32), cache)
    with pytest.raises(ValueError, match=r"positions 3\.\.4"):
        net(torch.randn(1, 2, 32), cache)


def test_cache_rejects_other_batch_size() -> None:
    net = make()
    cache = net.new_cache(2)
    with pytest.raises(ValueError, match="batch 2"):
        net(torch.randn(3, 2, 32), cache)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causality(layout: str) -> None:
    net = make(layout)
    x = torch.randn(2, net.max_tokens, 32)
    for t in (0, 3, net.max_tokens - 2):
        y = x.clone()
        y[:, t + 1 :] += torch.randn_like(y[:, t + 1 :])
        with torch.no_grad():
            a, b = net(x), net(y)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
        assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-3


def test_dropout_only_in_training() -> None:
    net = make()
    x = torch.randn(2, 8, 32)
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x), atol=0, rtol=0)


def test_attention_maps_are_causal_distributions() -> None:
    net = make().train()
    maps = net.attention_maps(torch.randn(2, 8, 32))
    assert net.training  # mode restored
    assert maps.shape == (2, 2, 4, 8, 8)  # [layers, B, heads, N, N]
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 4, 8))
    assert maps.triu(1).abs().max() == 0


def test_embeddings() -> None:
    z, a = torch.rand(2, 5, 12), torch.randint(0, 3, (2, 5))
    assert ActionMixer(12, 3, 16)(z, a).shape == (2, 5, 16)
    emb = InterleavedEmbedding(12, 3, 16)
    tokens = emb(z, a)
    assert tokens.shape == (2, 10, 16)
    torch.testing.assert_close(tokens[:, 1::2], emb.action(a))  # a_t at odd positions
    torch.testing.assert_close(tokens[:, 0::2], emb.latent(z))
    assert torch.equal(emb.states(tokens), tokens[:, 1::2])
