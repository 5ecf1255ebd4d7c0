"""What training costs: FLOPs per step, and the run time estimated on this device.

The notebook prints :func:`estimate_training_time` before it trains, so a student knows
what they commit to; the README's GPU table uses :func:`flops_per_step` of the ``gpu``
profile with stated throughput assumptions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .models import build_world_model
from .train import TrainStep
from .types import Batch
from .utils import private_rng


def _random_batch(config: Config, device: torch.device | str) -> Batch:
    b, t, s = config.train.batch_size, config.train.seq_len, config.data.image_size
    return Batch(
        obs=torch.rand(b, t, 3, s, s, device=device),
        action=torch.zeros(b, t, dtype=torch.long, device=device),
        reward=torch.zeros(b, t, device=device),
        cont=torch.ones(b, t, device=device),
    )


def flops_per_step(kind: str, config: Config, action_dim: int) -> int:
    """FLOPs of one training step of ``kind`` (loss forward and backward; the optimizer's
    elementwise work is not counted) at the profile's batch x length, counted by
    ``torch.utils.flop_counter`` on the ``meta`` device: no memory and no arithmetic, so
    any profile's size can be counted on any machine."""
    model = build_world_model(kind, config, action_dim, "meta")
    batch = _random_batch(config, "meta")
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


def estimate_training_time(
    config: Config,
    action_dim: int,
    device: torch.device,
    *,
    kinds: tuple[str, ...] = ("storm", "rssm"),
    seconds: float = 2.0,
) -> RunTimeEstimate:
    """This device's throughput on each model's real training step, measured for about
    ``seconds`` after one warm-up step (:class:`storm_lib.train.TrainStep`: the precision
    and optimizer ``fit()`` uses), times the profile's steps.

    The global RNG is left as it was, so measuring does not change the run that follows.
    """
    gflop, ms = {}, {}
    with private_rng(None, device):
        for kind in kinds:
            gflop[kind] = flops_per_step(kind, config, action_dim) / 1e9
            model = build_world_model(kind, config, action_dim, device).train()
            step, batch = TrainStep(model, config.train, device), _random_batch(config, device)
            step(model.loss, batch)  # warm-up: allocations, cuDNN autotuning
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            count, start = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - start < seconds / len(kinds):
                step(model.loss, batch)
                count += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms[kind] = 1000 * (time.perf_counter() - start) / count
    return RunTimeEstimate(gflop, ms, config.train.steps, str(device))
