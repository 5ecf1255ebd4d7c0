"""Counting the ATen ops a training step dispatches: the launches a GPU would see.

Eager PyTorch launches (about) one kernel per ATen op that computes something; ops that
only return a view of an input (``view``, ``t``, ``select``, ``unbind``, ``detach``...)
launch none. :class:`OpCounter` counts both kinds with a ``TorchDispatchMode``, which
sees every op of the forward and of the backward pass. On the ``meta`` device nothing is
computed, so a full-size profile's step is counted on any machine in a second.

These are counts, not times: on a GPU some ops launch two kernels and some none. They
show how launch-bound a step is (``bench/bench_launches.py``), and let a test check that
a speed-up removes ops (``tests/test_rssm.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .config import Config
from .models import build_world_model
from .types import Batch


def _only_views(func: Any) -> bool:
    """Whether the op's outputs all alias its inputs without writing (a view, no kernel)."""
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the ``with`` block.

    Attributes:
        total: every op.
        kernels: the ops that compute (not only views): roughly the kernel launches.
        by_name: kernel ops per op name (``mm``, ``addmm``, ``cat``...).
        paused: while True nothing is counted (for a stand-in of one graph launch).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total, self.kernels, self.paused = 0, 0, False
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.paused:
            self.total += 1
            if not _only_views(func):
                self.kernels += 1
                self.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def random_batch(config: Config, device: torch.device | str, action_dim: int) -> Batch:
    """A batch of the profile's ``batch_size x seq_len`` windows, random values."""
    b, t, s = config.train.batch_size, config.train.seq_len, config.data.image_size
    return Batch(
        obs=torch.rand(b, t, 3, s, s, device=device),
        action=torch.randint(0, action_dim, (b, t), device=device),
        reward=torch.zeros(b, t, device=device),
        cont=torch.ones(b, t, device=device),
    )


def loss_step_ops(
    kind: str, config: Config, *, action_dim: int = 18, device: torch.device | str = "meta"
) -> OpCounter:
    """The ops of one ``model.loss`` forward and backward of ``kind`` at the profile's
    batch size and length (the optimizer and clipping add a few more, counted apart)."""
    torch.manual_seed(0)
    model = build_world_model(kind, config, action_dim, device).train()
    batch = random_batch(config, device, action_dim)
    with OpCounter() as counter:
        loss, _ = model.loss(batch)
        loss.backward()
    return counter
