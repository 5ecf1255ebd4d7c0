"""Throughput of ``storm_lib.atari.collect`` in agent (env) steps per second.

Usage: ``python bench/bench_collect.py [--steps N] [--env ALE/Boxing-v5]``. Includes the
emulator, max-pooling, resizing and the compressed write; a short warm-up run first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from storm_lib.atari import collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="agent steps to time")
    parser.add_argument("--env", default="ALE/Boxing-v5", help="ALE env id")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best is reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        collect(args.env, 200, 0, Path(tmp) / "warmup.npz", progress=False)
        rates = []
        for i in range(args.repeats):
            start = time.perf_counter()
            path = collect(args.env, args.steps, i, Path(tmp) / f"run{i}.npz", progress=False)
            rates.append(args.steps / (time.perf_counter() - start))
            size_mb = path.stat().st_size / 1e6
        print(f"collect {args.env}: {args.steps} steps, {size_mb:.1f} MB file")
        print(
            f"runs: {', '.join(f'{r:.0f}' for r in rates)} steps/s; best {max(rates):.0f} steps/s"
        )


if __name__ == "__main__":
    main()
