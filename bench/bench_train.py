"""Training-step and imagination cost of both world models, per profile.

Prints, for each profile (default: cpu and paper), the median ms per training step
(loss + backward + clip + Adam) of STORM and the RSSM, and the ms per imagined rollout
of 64 starts (context 8) at horizons 10, 16 and 64, with and without STORM's KV cache,
with the ratios measured side by side in this one run.

    python bench/bench_train.py [--profiles cpu paper] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from storm_lib import Batch, build_world_model, get_profile

ACTIONS = 18  # the full Atari action set: the largest mixer input


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def random_batch(b: int, t: int, size: int) -> Batch:
    return Batch(
        obs=torch.rand(b, t, 3, size, size),
        action=torch.randint(0, ACTIONS, (b, t)),
        reward=torch.randn(b, t),
        cont=torch.ones(b, t),
    )


def train_step_ms(kind: str, profile: str, repeats: int) -> float:
    config = get_profile(profile)
    model = build_world_model(kind, config, ACTIONS, "cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    batch = random_batch(config.train.batch_size, config.train.seq_len, config.data.image_size)

    def step() -> None:
        loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()

    return median_ms(step, repeats)


def imagine_ms(
    profile: str, horizon: int, use_cache: bool, repeats: int, starts: int = 64
) -> float:
    config = get_profile(profile)
    config.transformer.max_length = max(config.transformer.max_length, 8 + horizon)
    model = build_world_model("storm", config, ACTIONS, "cpu").eval()
    ctx = random_batch(starts, 8, config.data.image_size)
    future = torch.randint(0, ACTIONS, (starts, horizon - 1))
    return median_ms(
        lambda: model.imagine(ctx.obs, ctx.action, future, use_cache=use_cache), repeats
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for profile in args.profiles:
        config = get_profile(profile)
        repeats = args.repeats if profile != "paper" else max(2, args.repeats // 2)
        print(
            f"\n[{profile}] batch {config.train.batch_size} x {config.train.seq_len}, "
            f"D={config.transformer.width}, VAE stem {config.vae.stem_channels}"
        )
        for kind in ("storm", "rssm"):
            print(f"  {kind:<5} training step: {train_step_ms(kind, profile, repeats):8.1f} ms")
        for horizon in (10, 16, 64):
            cached = imagine_ms(profile, horizon, True, repeats)
            full = imagine_ms(profile, horizon, False, repeats)
            print(
                f"  imagine 64 starts, C=8, H={horizon:<3}: cached {cached:8.1f} ms, "
                f"uncached {full:8.1f} ms, uncached/cached {full / cached:5.2f}x"
            )


if __name__ == "__main__":
    main()
