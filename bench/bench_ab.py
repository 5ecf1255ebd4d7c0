"""Side-by-side timing of two ``storm_lib`` trees (or of the plain path against the
speed-ups of one tree) in one process, runs interleaved.

On a shared machine the load drifts by 2x within minutes, so two benchmark runs made
at different times cannot be compared. This script imports the baseline tree under
another package name, builds the same model from the same seed in both, and alternates
the timed calls (A, B, B, A, ...), so both see the same load; it prints medians and the
ratio baseline/new.

    git worktree add /tmp/base <commit>
    PYTHONPATH=. python bench/bench_ab.py --baseline /tmp/base [--profile cpu] \\
        [--what storm rssm imagine] [--repeats 7]

``--what speedups`` needs no baseline: it times this tree's plain operations
(``storm_lib.models.speedups.plain()``) against its speed-ups, for both models' training
steps and for imagination.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

import storm_lib
from storm_lib.models import speedups

ACTIONS = 18


def load_tree(root: str, alias: str = "storm_lib_baseline") -> ModuleType:
    """Import ``root/storm_lib`` as package ``alias`` (storm_lib uses relative imports)."""
    init = Path(root) / "storm_lib" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        alias, init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def train_step(lib: ModuleType, kind: str, profile: str) -> Callable[[], None]:
    config = lib.get_profile(profile)
    torch.manual_seed(0)
    model = lib.build_world_model(kind, config, ACTIONS, "cpu").train()
    make = getattr(importlib.import_module(f"{lib.__name__}.train"), "make_optimizer", None)
    optimizer = (
        make(model, config.train, torch.device("cpu"))
        if make
        else torch.optim.Adam(model.parameters(), lr=config.train.lr)
    )
    g = torch.Generator().manual_seed(1)
    b, t, s = config.train.batch_size, config.train.seq_len, config.data.image_size
    batch = lib.Batch(
        obs=torch.rand(b, t, 3, s, s, generator=g),
        action=torch.randint(0, ACTIONS, (b, t), generator=g),
        reward=torch.randn(b, t, generator=g),
        cont=torch.ones(b, t),
    )

    def step() -> None:
        loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()

    return step


def imagine(
    lib: ModuleType, profile: str, horizon: int, use_cache: bool, latent: bool
) -> Callable[[], object]:
    config = lib.get_profile(profile)
    config.transformer.max_length = max(config.transformer.max_length, 8 + horizon)
    torch.manual_seed(0)
    model = lib.build_world_model("storm", config, ACTIONS, "cpu").eval()
    g = torch.Generator().manual_seed(1)
    s = config.data.image_size
    obs, act = torch.rand(64, 8, 3, s, s, generator=g), torch.randint(0, ACTIONS, (64, 8))
    future = torch.randint(0, ACTIONS, (64, horizon - 1), generator=g)
    fn = getattr(model, "imagine_latent", model.imagine) if latent else model.imagine
    return lambda: fn(obs, act, future, use_cache=use_cache)


def switched(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the speed-ups of ``storm_lib.models.speedups`` on or off."""

    def run() -> object:
        speedups.set_enabled(on)
        try:
            return fn()
        finally:
            speedups.set_enabled(True)

    return run


def ab(
    name: str, fa: Callable[[], object], fb: Callable[[], object], repeats: int,
    names: tuple[str, str] = ("baseline", "new"),
) -> None:  # fmt: skip
    fa(), fb()  # warm-up
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ma, mb = 1000 * statistics.median(ta), 1000 * statistics.median(tb)
    ratios = sorted(a / b for a, b in zip(ta, tb, strict=True))
    a, b = names
    print(
        f"  {name:<38} {a} {ma:8.1f} ms  {b} {mb:8.1f} ms  {a}/{b} {ma / mb:5.2f}x "
        f"(per-pair ratios {ratios[0]:.2f}..{ratios[-1]:.2f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="root of the baseline tree (not for speedups)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--what", nargs="+", default=["storm", "rssm", "imagine"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; [{args.profile}]")
    if args.what == ["speedups"]:
        pair = ("plain", "speedups")
        for kind in ("storm", "rssm"):
            step = train_step(storm_lib, kind, args.profile)
            ab(f"{kind} training step", switched(False, step), switched(True, step),
               args.repeats, pair)  # fmt: skip
        for latent in (True, False):
            fn = imagine(storm_lib, args.profile, 16, True, latent)
            label = "latent" if latent else "frames"
            ab(f"imagine {label} H=16 cached", switched(False, fn), switched(True, fn),
               args.repeats, pair)  # fmt: skip
        return
    if not args.baseline:
        raise SystemExit("--baseline is required (except for --what speedups)")
    base = load_tree(args.baseline)
    print(f"baseline {args.baseline} vs new {Path(storm_lib.__file__).parent.parent}")
    for what in args.what:
        if what in ("storm", "rssm"):
            fa, fb = (train_step(lib, what, args.profile) for lib in (base, storm_lib))
            ab(f"{what} training step", fa, fb, args.repeats)
        elif what == "imagine":
            for latent in (True, False):
                for horizon, cache in ((16, True), (64, True), (64, False)):
                    fa, fb = (
                        imagine(lib, args.profile, horizon, cache, latent)
                        for lib in (base, storm_lib)
                    )
                    label = "latent" if latent else "frames"
                    kind = "cached" if cache else "uncached"
                    ab(f"imagine {label} H={horizon} {kind}", fa, fb, args.repeats)
        else:
            raise SystemExit(f"unknown --what {what!r}")


if __name__ == "__main__":
    main()
