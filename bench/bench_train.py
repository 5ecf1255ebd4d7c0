"""Training-step, imagination and collection cost of both world models, per profile.

Prints, for each profile (default: cpu and paper), each figure the median of repeated
runs after one warm-up run:

* ms per training step (loss + backward + clip + Adam) of STORM and the RSSM, and the
  share spent in the VAE, the sequence model and the heads. Each part is timed alone
  (forward + backward on the same batch, its inputs detached), so the shares are of
  the whole step; the rest is the optimizer, clipping and glue.
* each step's FLOPs (``torch.utils.flop_counter``: matmuls, convs, attention, forward and
  backward) and the achieved GFLOP/s against this machine's fp32 matmul GFLOP/s
  (a 1024^3 ``torch.mm``, measured in the same run).
* ms per STORM imagined rollout of 64 starts, context 8, horizons 16 and 64, with and
  without the KV cache, both for the latent rollout (``imagine_latent``: tokens, h,
  reward, cont; what policy learning uses) and with frames decoded (``imagine``), and
  the ratios uncached/cached and time(H=64)/time(H=16).
* env steps/s of data collection (``storm_lib.atari.collect``, emulator to compressed file).

On a shared machine absolute times drift; compare trees with ``bench/bench_ab.py``,
which interleaves the two in one process.

    python bench/bench_train.py [--profiles cpu paper] [--repeats 5] [--collect-steps 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from storm_lib import Batch, build_world_model, get_profile
from storm_lib.utils import median_ms  # warms up; synchronises a GPU around each call

ACTIONS = 18  # the full Atari action set: the largest mixer input
STARTS, CONTEXT, HORIZONS = 64, 8, (16, 64)
CPU = torch.device("cpu")  # these benchmarks describe the 2-core CPU of the committed run


def matmul_gflops(repeats: int, n: int = 1024) -> float:
    """This machine's fp32 ``torch.mm`` throughput (the ceiling a training step faces)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (
        2 * n**3 / median_ms(lambda: torch.mm(a, b), CPU, repeats=max(repeats, 5), warmup=2) / 1e6
    )


def random_batch(b: int, t: int, size: int) -> Batch:
    return Batch(
        obs=torch.rand(b, t, 3, size, size),
        action=torch.randint(0, ACTIONS, (b, t)),
        reward=torch.randn(b, t),
        cont=torch.ones(b, t),
    )


def _backward(*losses: torch.Tensor) -> None:
    sum(loss.sum() for loss in losses).backward()  # type: ignore[union-attr]


def storm_parts(model, batch: Batch) -> dict[str, Callable[[], None]]:
    """Forward + backward of STORM's three parts, each on detached inputs."""
    with torch.no_grad():
        z0 = model.vae.sample(model.encode(batch.obs))
        h0 = model.sequence(z0, batch.action)

    def vae() -> None:
        z = model.vae.sample(model.encode(batch.obs))
        _backward((model.decode(z) - batch.obs).square())

    def sequence() -> None:
        _backward(model.sequence(z0.requires_grad_(), batch.action))

    def heads() -> None:
        h = h0.detach().requires_grad_()
        prior = model.prior(h[:, :-1])
        _backward(prior, model.reward_head(h), model.cont_head(h))

    return {"VAE": vae, "sequence": sequence, "heads": heads}


def rssm_parts(model, batch: Batch) -> dict[str, Callable[[], None]]:
    """Forward + backward of the RSSM's three parts, each on detached inputs."""
    with torch.no_grad():
        embed0 = model.embed(batch.obs)
        post0, _ = model._observe(embed0, batch.action, None, "sample")
        feat0 = post0.feat

    def vae() -> None:
        embed = model.embed(batch.obs)
        _backward(embed, (model.decode(feat0.detach().requires_grad_()) - batch.obs).square())

    def sequence() -> None:  # GRU, prior and posterior nets over T steps
        post, prior = model._observe(embed0.detach().requires_grad_(), batch.action, None, "sample")
        _backward(post.logits, prior)

    def heads() -> None:
        feat = feat0.detach().requires_grad_()
        _backward(model.reward_head(feat), model.cont_head(feat))

    return {"VAE": vae, "sequence": sequence, "heads": heads}


def train_step(kind: str, profile: str, repeats: int, peak: float) -> str:
    config = get_profile(profile)
    torch.manual_seed(0)
    model = build_world_model(kind, config, ACTIONS, "cpu").train()
    try:  # fit()'s optimizer when this tree has the helper, else fit()'s old Adam
        from storm_lib.train import make_optimizer

        optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    except ImportError:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    batch = random_batch(config.train.batch_size, config.train.seq_len, config.data.image_size)

    def step() -> None:
        loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    ms = median_ms(step, CPU, repeats=repeats)
    parts = (storm_parts if kind == "storm" else rssm_parts)(model, batch)
    shares = {name: median_ms(fn, CPU, repeats=repeats) / ms for name, fn in parts.items()}
    optimizer.zero_grad(set_to_none=True)
    gflops = flops / ms / 1e6
    share_text = ", ".join(f"{name} {100 * s:3.0f}%" for name, s in shares.items())
    return (
        f"  {kind:<5} training step: {ms:8.1f} ms ({share_text}); "
        f"{flops / 1e9:6.1f} GFLOP -> {gflops:5.1f} GFLOP/s = {100 * gflops / peak:4.1f}% of mm"
    )


def imagination(profile: str, repeats: int) -> list[str]:
    config = get_profile(profile)
    config.transformer.max_length = max(config.transformer.max_length, CONTEXT + max(HORIZONS))
    torch.manual_seed(0)
    model = build_world_model("storm", config, ACTIONS, "cpu").eval()
    ctx = random_batch(STARTS, CONTEXT, config.data.image_size)
    kinds = {"frames": model.imagine}
    if hasattr(model, "imagine_latent"):
        kinds = {"latent": model.imagine_latent, **kinds}
    lines = []
    for label, fn in kinds.items():
        ms: dict[tuple[int, bool], float] = {}
        for horizon in HORIZONS:
            future = torch.randint(0, ACTIONS, (STARTS, horizon - 1))
            for cache in (True, False):
                ms[horizon, cache] = median_ms(
                    lambda g=fn, f=future, c=cache: g(ctx.obs, ctx.action, f, use_cache=c),
                    CPU,
                    repeats=repeats,
                )
            lines.append(
                f"  imagine {label:<6} {STARTS} starts, C={CONTEXT}, H={horizon:<3}: cached "
                f"{ms[horizon, True]:8.1f} ms, uncached {ms[horizon, False]:8.1f} ms, "
                f"uncached/cached {ms[horizon, False] / ms[horizon, True]:5.2f}x"
            )
        h_lo, h_hi = HORIZONS
        lines.append(
            f"  imagine {label:<6} time(H={h_hi})/time(H={h_lo}): cached "
            f"{ms[h_hi, True] / ms[h_lo, True]:4.2f}, "
            f"uncached {ms[h_hi, False] / ms[h_lo, False]:4.2f}"
        )
    return lines


def collect_rate(steps: int, repeats: int) -> str:
    from storm_lib.atari import collect

    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(1 + repeats):
            start = time.perf_counter()
            collect("ALE/Boxing-v5", steps, i, Path(tmp) / f"{i}.npz", progress=False)
            runs.append(steps / (time.perf_counter() - start))
    rate = statistics.median(runs[1:])
    return f"collect ALE/Boxing-v5: {rate:6.0f} env steps/s (median of {repeats} x {steps} steps)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--collect-steps", type=int, default=1000, help="0 skips collection")
    args = parser.parse_args()
    peak = matmul_gflops(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"fp32 matmul (1024^3 torch.mm): {peak:.1f} GFLOP/s")
    if args.collect_steps:
        print(collect_rate(args.collect_steps, 3))
    for profile in args.profiles:
        config = get_profile(profile)
        repeats = args.repeats if profile != "paper" else max(2, args.repeats // 2)
        print(
            f"\n[{profile}] batch {config.train.batch_size} x {config.train.seq_len}, "
            f"D={config.transformer.width}, VAE stem {config.vae.stem_channels}"
        )
        for kind in ("storm", "rssm"):
            print(train_step(kind, profile, repeats, peak), flush=True)
        for line in imagination(profile, repeats):
            print(line, flush=True)
    print(f"\nfp32 matmul at the end: {matmul_gflops(args.repeats):.1f} GFLOP/s (load drift)")


if __name__ == "__main__":
    main()
