"""Estimated training time of a profile on T4-, A100- and H100-class GPUs, from counts.

No GPU is needed: each model's FLOPs per training step and its number of PyTorch ops
(kernel launches) per step are counted on the ``meta`` device, then combined with stated
assumptions. A step takes the longer of its compute time (FLOPs / effective throughput)
and its launch time (ops x per-op host overhead); eager PyTorch launches every op from
Python, so a model with many small ops (the RSSM's step-by-step GRU) is host-bound on a
fast GPU. These are estimates, not measurements: the notebook measures the real device.

    PYTHONPATH=. python bench/bench_gpu_estimate.py [--profile gpu] [--efficiency 0.25]
"""

from __future__ import annotations

import argparse

from storm_lib import get_profile
from storm_lib.costs import flops_per_step
from storm_lib.opcount import loss_step_ops

GPUS = {  # name: (autocast dtype under precision "auto", dense tensor-core peak TFLOP/s)
    "T4": ("fp16", 65.0),
    "A100": ("bf16", 312.0),
    "H100 SXM": ("bf16", 989.0),
}


def ops_per_step(kind: str, profile: str, actions: int = 18) -> int:
    """ATen ops of one loss forward + backward (the fused optimizer adds a handful)."""
    return loss_step_ops(kind, get_profile(profile), action_dim=actions).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--efficiency", type=float, default=0.25, help="share of peak reached")
    parser.add_argument("--us-per-op", type=float, default=10.0, help="host overhead per op")
    args = parser.parse_args()
    config = get_profile(args.profile)
    steps = config.train.steps
    counts = {
        kind: (flops_per_step(kind, config, 18) / 1e9, ops_per_step(kind, args.profile))
        for kind in ("storm", "rssm")
    }
    print(f"profile {args.profile}: {steps} steps per model, batch {config.train.batch_size} x "
          f"{config.train.seq_len}; assumed {100 * args.efficiency:.0f}% of peak and "
          f"{args.us_per_op:.0f} us of host time per op")  # fmt: skip
    for kind, (gflop, ops) in counts.items():
        print(f"  {kind:<5} {gflop:6.1f} GFLOP/step, {ops:5d} ops/step")
    for gpu, (dtype, peak) in GPUS.items():
        rate = peak * args.efficiency  # TFLOP/s = GFLOP/ms
        minutes = {}
        for kind, (gflop, ops) in counts.items():
            ms = max(gflop / rate, ops * args.us_per_op / 1000)
            minutes[kind] = steps * ms / 60_000
        detail = ", ".join(f"{k} {m:.0f} min" for k, m in minutes.items())
        print(
            f"{gpu:<9} ({dtype}, {rate:5.0f} TFLOP/s effective): {detail}; "
            f"both {sum(minutes.values()):.0f} min of training"
        )


if __name__ == "__main__":
    main()
