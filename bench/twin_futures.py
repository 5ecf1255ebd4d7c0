"""How predictable is the game itself? PSNR between twin futures in the real emulator.

From one emulator state, the same H actions are played twice. Sticky actions are drawn
by ALE's own RNG, which ``cloneState`` does not copy, so the two futures differ exactly as
two draws of the real environment do. Frames are preprocessed as ``storm_lib.atari``
stores them (frameskip with the last two frames max-pooled, resized to S x S).

The PSNR between twins is what a perfect *sampling* world model would score against the
truth on average (its rollout is one more draw of the same future); copy-last on the same
states is printed beside it. With ``--sticky 0`` the game is deterministic given the
actions and every twin pair is identical.

    PYTHONPATH=. python bench/twin_futures.py [--count 256] [--horizon 10] [--sticky 0.25]
"""

from __future__ import annotations

import argparse

import numpy as np

from storm_lib.atari import _make_env, _resize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="ALE/Boxing-v5")
    ap.add_argument("--count", type=int, default=256, help="states (twin pairs)")
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--sticky", type=float, default=0.25)
    ap.add_argument("--frameskip", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    env = _make_env(args.env, args.frameskip, args.sticky)
    env.reset(seed=args.seed)
    ale, action_set = env.unwrapped.ale, env.unwrapped._action_set
    rng = np.random.default_rng(args.seed)
    height, width = ale.getScreenDims()
    size, horizon = args.image_size, args.horizon

    def step(action: int) -> np.ndarray:
        prev, cur = np.empty((height, width, 3), np.uint8), np.empty((height, width, 3), np.uint8)
        for k in range(args.frameskip):
            ale.act(action)
            if k == args.frameskip - 2:
                ale.getScreenRGB(prev)
        ale.getScreenRGB(cur)
        return np.maximum(cur, prev) if args.frameskip > 1 else cur

    def frames(raw: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(raw), 3, size, size), np.uint8)
        _resize(np.stack(raw), out)
        return out.astype(np.float32) / 255.0

    def random_action() -> int:
        return action_set[rng.integers(len(action_set))]

    twin_mse = np.zeros((args.count, horizon))
    copy_mse = np.zeros((args.count, horizon))
    for i in range(args.count):
        for _ in range(rng.integers(5, 60)):  # a random policy moves on to a new state
            step(random_action())
            if ale.game_over():
                env.reset()
        last = frames([step(random_action())])[0]
        state = ale.cloneState()
        actions = [random_action() for _ in range(horizon)]
        first = frames([step(a) for a in actions])
        ale.restoreState(state)
        second = frames([step(a) for a in actions])
        twin_mse[i] = ((first - second) ** 2).mean(axis=(1, 2, 3))
        copy_mse[i] = ((first - last) ** 2).mean(axis=(1, 2, 3))
        if ale.game_over():
            env.reset()
    env.close()

    def psnr(mse: np.ndarray) -> np.ndarray:
        return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))

    twin, copy = psnr(twin_mse), psnr(copy_mse)
    differ = twin_mse > 0
    print(f"{args.env}, sticky {args.sticky}, {args.count} states, steps 1..{horizon}")
    print("twins identical (share)     ", " ".join(f"{x:6.2f}" for x in (~differ).mean(0)))
    median = np.median(np.minimum(twin, 100.0), 0)
    print("twin PSNR, median (dB)      ", " ".join(f"{x:6.1f}" for x in median))
    where = [twin[differ[:, k], k].mean() if differ[:, k].any() else np.inf for k in range(horizon)]
    print("twin PSNR, differing twins  ", " ".join(f"{x:6.1f}" for x in where))
    print("copy-last PSNR, mean (dB)   ", " ".join(f"{x:6.2f}" for x in copy.mean(0)))


if __name__ == "__main__":
    main()
