"""What training costs: FLOPs per step, and the run time estimated on this device.

The notebook prints :func:`estimate_training_time` before it trains, so a student knows
what they commit to; the README's GPU table uses :func:`flops_per_step` of the ``gpu``
profile with stated throughput assumptions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .data import TrajectoryData
from .graphs import maybe_graphed
from .models import build_world_model
from .opcount import random_batch
from .train import TrainStep
from .utils import configure_device, default_device, private_rng, synchronize


def flops_per_step(kind: str, config: Config, action_dim: int) -> int:
    """FLOPs of one training step of ``kind`` (loss forward and backward; the optimizer's
    elementwise work is not counted) at the profile's batch x length, counted by
    ``torch.utils.flop_counter`` on the ``meta`` device: no memory and no arithmetic, so
    any profile's size can be counted on any machine."""
    model = build_world_model(kind, config, action_dim, "meta")
    batch = random_batch(config, "meta", action_dim)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(batch)
        loss.backward()
    return int(counter.get_total_flops())


@dataclass
class RunTimeEstimate:
    """:func:`estimate_training_time`'s result, per model kind."""

    gflop_per_step: dict[str, float]
    ms_per_step: dict[str, float]
    steps: int
    device: str

    def minutes(self, kind: str) -> float:
        return self.steps * self.ms_per_step[kind] / 60_000

    def __str__(self) -> str:
        lines = [f"Estimated training time on {self.device} ({self.steps} steps per model):"]
        for kind, gflop in self.gflop_per_step.items():
            ms = self.ms_per_step[kind]
            lines.append(
                f"  {kind:<5} {gflop:6.1f} GFLOP/step at {gflop / ms:6.1f} TFLOP/s measured here "
                f"= {ms:6.0f} ms/step -> about {self.minutes(kind):.0f} min"
            )
        total = sum(self.minutes(k) for k in self.gflop_per_step)
        lines.append(f"  both: about {total:.0f} min, before evaluation")
        return "\n".join(lines)


def _stand_in_data(config: Config, action_dim: int, seed: int = 0) -> TrajectoryData:
    """Random uint8 frames of the profile's size, enough for a few hundred windows: what
    the estimate samples from when no data is given (gathering costs the same per batch
    whatever the frames show)."""
    rng = np.random.default_rng(seed)
    t, s = config.train.seq_len, config.data.image_size
    n = 4 * max(t, config.train.batch_size)
    return TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, s, s), dtype=np.uint8),
        action=rng.integers(0, action_dim, n).astype(np.int64),
        reward=np.zeros(n, np.float32),
        cont=np.ones(n, np.float32),
        episode=np.zeros(n, np.int32),
    )


def estimate_training_time(
    config: Config,
    action_dim: int,
    device: torch.device | str | None = None,
    *,
    data: TrajectoryData | None = None,
    kinds: tuple[str, ...] = ("storm", "rssm"),
    seconds: float = 2.0,
    warmup: int = 2,
) -> RunTimeEstimate:
    """This device's time per real training step of each model, times the profile's steps.

    What is timed is :meth:`storm_lib.train.TrainStep.fit_step`, the very call ``fit()``
    makes each step: the step's snapshot, drawing the batch from ``data`` (the training
    split; default random frames of the profile's size) and moving it to the device, the
    loss under ``fit()``'s precision, backward, clipping and the fused Adam update. The
    device is configured first (:func:`storm_lib.utils.configure_device`, with the
    profile's ``train.deterministic``), as ``fit()`` configures it. After ``warmup``
    steps (allocations, cuDNN autotuning) it runs steps for about ``seconds`` in all,
    with CUDA synchronised before the clock starts and after the last step: on a GPU the
    host queues steps ahead as in ``fit()``, so the mean is the pipelined cost.

    The global RNGs (CPU and CUDA) are left as they were, so measuring does not change
    the run that follows. Validation and checkpoints are not included.
    """
    device = default_device(device)
    configure_device(device, config.train.deterministic)
    data = data if data is not None else _stand_in_data(config, action_dim)
    gflop, ms = {}, {}
    with private_rng(None, device):
        for kind in kinds:
            gflop[kind] = flops_per_step(kind, config, action_dim) / 1e9
            model = build_world_model(kind, config, action_dim, device).train()
            # fit()'s own step: on CUDA with train.cuda_graphs, the graphed one
            trainer = maybe_graphed(
                TrainStep(model, config.train, device),
                enabled=config.train.cuda_graphs,
                compiled=config.train.compile,
            )
            generator = torch.Generator().manual_seed(config.train.seed)

            def step(trainer: TrainStep = trainer, generator: torch.Generator = generator) -> None:
                trainer.fit_step(trainer.model.loss, data, generator, config.train.lr)

            for _ in range(warmup):
                step()
            synchronize(device)
            count, start = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - start < seconds / len(kinds):
                step()
                count += 1
            synchronize(device)
            ms[kind] = 1000 * (time.perf_counter() - start) / count
    return RunTimeEstimate(gflop, ms, config.train.steps, str(device))
