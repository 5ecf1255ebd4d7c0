"""Speed-ups kept off the teaching path: each replaces one plain operation by a faster
one that computes the same function. Read the plain versions in ``vae.py``,
``transformer.py`` and ``rssm.py`` first; this module is where they get faster (and says
which ones there are).

=========================  ==========================================  =====================
plain operation (reads as)  speed-up (what runs when ``enabled()``)     changes results by
=========================  ==========================================  =====================
frames as ``[N, 3, S, S]``  channels_last memory (NHWC): oneDNN's        nothing
                            faster conv kernels on CPU
``layers(x)`` in eval mode  each Conv + BatchNorm pair run as one conv   float rounding
                            with the BatchNorm folded into its weights
``torch.multinomial``       inverse-CDF sampling: one uniform and a      the random draws
                            binary search per row instead of V           (same distribution)
                            exponentials
``softmax(QK^T/sqrt(d))V``  ``F.scaled_dot_product_attention`` (fused    float rounding
                            kernel; the causal flag instead of a mask
                            where the chunk starts at position 0)
RSSM filter, per step:      the action and embedding terms of those      float rounding
``Linear([z, a])`` and      Linears for all T at once, before the loop
``Linear([h, e])``          (``RSSMWorldModel._filter_precomputed``);
                            one ``addmm`` per step for the rest
=========================  ==========================================  =====================

``set_enabled(False)`` (or ``with plain():``) runs the plain versions everywhere; they
are on by default. ``with plain(name, ...):`` turns off only the named ones (:data:`NAMES`,
in the table's order), to compare one speed-up alone. ``tests/test_speedups.py`` and
``tests/test_rssm.py`` check that both paths agree, ``bench/bench_ab.py --what speedups``
times them side by side, and ``bench/bench_launches.py`` counts the RSSM's ops per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAMES = ("channels_last", "folded_bn", "inverse_cdf", "fused_attention", "rssm_inputs")
"""The speed-ups by name, in the order of the table above."""

_enabled = True
_off: frozenset[str] = frozenset()  # the names that ``plain(name, ...)`` turned off


def enabled(name: str | None = None) -> bool:
    """Whether the speed-ups run (True by default); with ``name`` (one of :data:`NAMES`),
    whether that one does."""
    if name is not None and name not in NAMES:
        raise ValueError(f"unknown speed-up {name!r}; choose one of {NAMES}")
    return _enabled and name not in _off


def set_enabled(on: bool) -> None:
    """Turn every speed-up of this module on or off, process-wide."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def plain(*names: str) -> Iterator[None]:
    """Run the plain versions inside the block: of every speed-up, or only of ``names``
    (of :data:`NAMES`). The previous setting is restored afterwards."""
    global _off
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown speed-ups {unknown}; choose from {NAMES}")
    before, before_off = _enabled, _off
    if names:
        _off = _off | frozenset(names)
    else:
        set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)
        _off = before_off


def conv_layout(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` in channels_last memory (the same values) when enabled."""
    return x.contiguous(memory_format=torch.channels_last) if enabled("channels_last") else x


def _folded_conv(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(conv(x))`` in eval mode as one convolution: the BatchNorm's affine map
    ``scale * y + shift`` is folded into the conv's weight and bias."""
    assert bn.running_var is not None and bn.running_mean is not None  # track_running_stats
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if isinstance(conv, nn.ConvTranspose2d):  # weight [in, out, k, k]
        assert isinstance(conv.padding, tuple)  # never "same" for a transposed conv
        weight = conv.weight * scale.view(1, -1, 1, 1)
        return F.conv_transpose2d(
            x, weight, shift, conv.stride, conv.padding, conv.output_padding, conv.groups,
            conv.dilation,
        )  # fmt: skip
    weight = conv.weight * scale.view(-1, 1, 1, 1)  # Conv2d: [out, in, k, k]
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def run_convs(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers(x)``; in eval mode, when enabled, every conv followed by a BatchNorm with
    running statistics runs as one folded convolution (:func:`_folded_conv`)."""
    if layers.training or not enabled("folded_bn"):
        return layers(x)
    mods = list(layers)
    i = 0
    while i < len(mods):
        conv, bn = mods[i], mods[i + 1] if i + 1 < len(mods) else None
        if (
            isinstance(conv, nn.Conv2d | nn.ConvTranspose2d)
            and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
            and bn.affine
        ):
            x = _folded_conv(conv, bn, x)
            i += 2
        else:
            x = conv(x)
            i += 1
    return x


def inverse_cdf_sample(probs: Tensor) -> Tensor:
    """One index per row of ``probs [..., V]`` (need not sum to 1): ``[...]``.

    The distribution of ``torch.multinomial(probs, 1)``, drawn from one uniform per row (a
    cumulative sum and a binary search) instead of V exponentials. Classes of
    probability 0 are never drawn: the search returns the first class whose cumulative
    sum exceeds u.
    """
    cdf = probs.float().cumsum(-1)
    u = torch.rand(*cdf.shape[:-1], 1, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return index.clamp_max_(probs.shape[-1] - 1)  # u rounded up to the total


def sample_index(probs: Tensor) -> Tensor:
    """One class index per row of ``probs [..., V]``: ``[...]`` (multinomial when plain)."""
    if enabled("inverse_cdf"):
        return inverse_cdf_sample(probs)
    flat = probs.float().reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1).view(probs.shape[:-1])


def causal_mask(queries: int, start: int, device: torch.device) -> Tensor:
    """``[queries, start + queries]`` bool, True where key ``j`` may be seen by query ``i``
    at position ``start + i`` (``j <= start + i``)."""
    rows = torch.arange(queries, device=device).unsqueeze(1) + start
    return torch.arange(start + queries, device=device).unsqueeze(0) <= rows


def chunk_mask(n: int, start: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """The cheapest ``(attn_mask, is_causal)`` for ``scaled_dot_product_attention`` for
    ``n`` queries at positions ``start..start+n-1``: a chunk from position 0 uses the fused
    causal kernel, one query attends to everything cached, otherwise :func:`causal_mask`."""
    if start == 0:
        return None, n > 1
    if n == 1:
        return None, False
    return causal_mask(n, start, device), False


def fused_attention(
    queries: Tensor, keys: Tensor, values: Tensor, start: int, dropout: float
) -> Tensor:
    """Causal attention of queries ``[B, h, N, dh]`` at positions ``start..`` over keys and
    values ``[B, h, start+N, dh]`` with PyTorch's fused kernel: ``[B, h, N, dh]``."""
    mask, causal = chunk_mask(queries.shape[2], start, queries.device)
    return F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, is_causal=causal, dropout_p=dropout
    )  # fmt: skip
