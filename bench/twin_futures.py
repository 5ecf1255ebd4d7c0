"""How predictable is the game itself? PSNR between twin futures in the real emulator.

Prints ``storm_lib.atari.twin_futures``: from one emulator state the same H actions are
played twice; sticky actions make the twins differ as two draws of the real game do.
Their PSNR is what a world model that samples the game's randomness perfectly would
score against the truth. With ``--sticky 0`` the game is deterministic given the actions.

    PYTHONPATH=. python bench/twin_futures.py [--count 256] [--horizon 10] [--sticky 0.25]
"""

from __future__ import annotations

import argparse

import numpy as np

from storm_lib.atari import twin_futures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="ALE/Boxing-v5")
    ap.add_argument("--count", type=int, default=256, help="states (twin pairs)")
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--sticky", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    t = twin_futures(
        args.env, count=args.count, horizon=args.horizon, seed=args.seed, sticky_prob=args.sticky
    )
    differ = t.psnr < t.cap
    print(f"{args.env}, sticky {args.sticky}, {args.count} states, steps 1..{args.horizon}")
    rows = {
        "twins identical (share)": t.identical,
        "twin PSNR, mean, cap 100": t.mean,
        "twin PSNR, median": np.median(t.psnr, 0),
        "twin PSNR, differing twins": [
            t.psnr[differ[:, k], k].mean() if differ[:, k].any() else np.inf
            for k in range(args.horizon)
        ],
        "copy-last PSNR, mean": t.copy_last.mean(0),
    }
    for name, values in rows.items():
        print(f"{name:<28}", " ".join(f"{x:6.2f}" for x in values))


if __name__ == "__main__":
    main()
