"""fp32 against bf16 autocast: the training step ``fit()`` runs, timed side by side.

Builds each model of a profile (with optional ``--set section.field=value`` variants,
e.g. ``vae.stem_channels=32``) and times :class:`storm_lib.train.TrainStep` under
``precision=fp32`` and ``precision=bf16`` in interleaved pairs (A, B, B, A, ...), so
both see the same machine load. Prints medians and the ratio fp32/bf16, and whether this
CPU has native bf16 (``avx512_bf16`` or AMX), which is what ``precision="auto"`` reads.

    PYTHONPATH=. python bench/bench_precision.py [--profile cpu] [--repeats 15] \\
        [--variant "stem32: vae.stem_channels=32"] [--variant "4 layers: transformer.layers=4"]

Whether bf16 also *trains* as well as fp32 is a separate question, answered by
``bench/quality_study.py --set train.precision=bf16`` (docs/precision.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_study import apply_overrides

from storm_lib.config import get_profile
from storm_lib.models import build_world_model
from storm_lib.train import TrainStep
from storm_lib.types import Batch
from storm_lib.utils import cpu_bf16_support

ACTIONS = 18


def make_step(kind: str, profile: str, overrides: list[str], precision: str):
    config = get_profile(profile)
    apply_overrides(config, overrides)
    config.train.precision = precision
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_world_model(kind, config, ACTIONS, device).train()
    step = TrainStep(model, config.train, device)
    g = torch.Generator().manual_seed(1)
    b, t, s = config.train.batch_size, config.train.seq_len, config.data.image_size
    batch = Batch(
        obs=torch.rand(b, t, 3, s, s, generator=g),
        action=torch.randint(0, ACTIONS, (b, t), generator=g),
        reward=torch.randn(b, t, generator=g),
        cont=torch.ones(b, t),
    )
    return lambda: step(model.loss, batch)


def pair(name: str, fp32, bf16, repeats: int) -> None:
    fp32(), bf16(), fp32(), bf16()  # warm-up (oneDNN picks its kernels on first calls)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        order = ((fp32, ta), (bf16, tb)) if i % 2 == 0 else ((bf16, tb), (fp32, ta))
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ma, mb = 1000 * statistics.median(ta), 1000 * statistics.median(tb)
    ratios = sorted(a / b for a, b in zip(ta, tb, strict=True))
    print(
        f"  {name:<34} fp32 {ma:7.1f} ms  bf16 {mb:7.1f} ms  fp32/bf16 {ma / mb:5.2f}x "
        f"(pairs {ratios[0]:.2f}..{ratios[-1]:.2f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=["storm", "rssm"])
    parser.add_argument(
        "--variant", action="append", default=[],
        help='"label: section.field=value section.field=value" (repeatable)',
    )  # fmt: skip
    args = parser.parse_args()
    native, why = cpu_bf16_support()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, profile {args.profile}")
    print(f"native bf16 on this CPU: {native} ({why})")
    variants = [("profile as is", [])]
    for raw in args.variant:
        label, _, sets = raw.partition(":")
        variants.append((label.strip(), sets.split()))
    for label, overrides in variants:
        print(f"{label}:")
        for kind in args.models:
            pair(
                f"{kind} training step",
                make_step(kind, args.profile, overrides, "fp32"),
                make_step(kind, args.profile, overrides, "bf16"),
                args.repeats,
            )


if __name__ == "__main__":
    main()
