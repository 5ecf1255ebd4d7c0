"""Command line: ``python -m storm_lib collect | train | evaluate | compare-priors``.

Examples::

    python -m storm_lib collect --env ALE/Boxing-v5 --steps 30000 --seed 0 --out data/boxing.npz
    python -m storm_lib train --model storm --profile cpu --data data/boxing.npz \\
        --out checkpoints/storm.pt
    python -m storm_lib train --model rssm --profile cpu --data data/boxing.npz \\
        --out checkpoints/p03_rssm.pt
    python -m storm_lib evaluate --storm checkpoints/storm.pt --rssm checkpoints/p03_rssm.pt \\
        --data data/boxing.npz --out figures/
    python -m storm_lib compare-priors --profile cpu --data data/boxing.npz \\
        --mlp checkpoints/storm_cpu.pt --maskgit checkpoints/storm_maskgit_cpu.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import get_profile


def _collect(args: argparse.Namespace) -> None:
    from .collect import collect
    from .workflow import data_path

    config = get_profile(args.profile)
    cfg = config.data
    env_id = args.env or cfg.env_id
    steps = args.steps or cfg.steps
    seed = cfg.seed if args.seed is None else args.seed
    if args.out:
        out = Path(args.out)
    else:
        config.data.env_id, config.data.steps, config.data.seed = env_id, steps, seed
        out = data_path(config)
    start = time.perf_counter()
    collect(
        env_id,
        steps,
        seed,
        out,
        image_size=cfg.image_size,
        frameskip=cfg.frameskip,
        sticky_prob=cfg.sticky_prob,
        max_episode_steps=cfg.max_episode_steps,
    )
    seconds = time.perf_counter() - start
    print(f"wrote {out}: {steps} steps of {env_id} in {seconds:.1f} s ({steps / seconds:.0f}/s)")


def _train(args: argparse.Namespace) -> None:
    from .workflow import ensure_data, train_or_load

    config = get_profile(args.profile)
    if args.steps:
        config.train.steps = args.steps
    config.heads.dynamics_head = args.dynamics_head
    train_data, val_data = ensure_data(config, args.data)
    out = args.out or f"checkpoints/{'p03_rssm' if args.model == 'rssm' else 'storm'}.pt"
    _, history = train_or_load(
        args.model, config, train_data, val_data, out, retrain=args.retrain, device=args.device
    )
    if history.val:
        first, last = history.val[0], history.val[-1]
        print(
            f"{args.model}: validation loss {first['loss/total']:.1f} (step {first['step']}) -> "
            f"{last['loss/total']:.1f} (step {last['step']}) in {last['time']:.0f} s of training"
        )
    print(f"checkpoint: {out}")


def _evaluate(args: argparse.Namespace) -> None:
    from .workflow import evaluate_checkpoints

    evaluate_checkpoints(
        storm=args.storm,
        rssm=args.rssm,
        data=args.data,
        out=args.out,
        count=args.count,
        profile=args.profile,
        device=args.device,
        fvd=args.fvd,
    )


def _compare_priors(args: argparse.Namespace) -> None:
    from .compare import compare_priors
    from .plots import plot_prior_comparison
    from .workflow import ensure_data

    start = time.perf_counter()
    config = get_profile(args.profile)
    if args.steps:
        config.train.steps = args.steps
    train_data, val_data = ensure_data(config, args.data)
    result = compare_priors(
        config, train_data, val_data, mlp_path=args.mlp, maskgit_path=args.maskgit,
        retrain=args.retrain, count=args.count, device=args.device,
    )  # fmt: skip
    print(result.table())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_prior_comparison(result).savefig(out / "prior_comparison.png", bbox_inches="tight")
    print(f"wrote {out / 'prior_comparison.png'} in {time.perf_counter() - start:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m storm_lib",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect trajectories from a real Atari game")
    p.add_argument("--env", help="ALE id (default: the profile's, ALE/Boxing-v5)")
    p.add_argument("--steps", type=int, help="agent steps (default: the profile's)")
    p.add_argument("--seed", type=int, help="seed of the game and the random policy")
    p.add_argument("--out", help="output .npz (default: data/<game>_<steps>_seed<seed>.npz)")
    p.add_argument("--profile", help="smoke | cpu | gpu | paper | auto (default: STORM_PROFILE)")
    p.set_defaults(func=_collect)

    p = sub.add_parser("train", help="train a world model with the one training loop")
    p.add_argument("--model", choices=("storm", "rssm"), required=True)
    p.add_argument("--profile", help="smoke | cpu | gpu | paper | auto (default: STORM_PROFILE)")
    p.add_argument("--data", help="trajectories .npz (collected if missing)")
    p.add_argument("--out", help="checkpoint path (default: checkpoints/storm.pt or p03_rssm.pt)")
    p.add_argument("--steps", type=int, help="gradient steps (default: the profile's)")
    p.add_argument("--retrain", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dynamics-head", choices=("mlp", "maskgit"), default="mlp",
        help="STORM's prior: mlp (STORM) or maskgit (GIT-STORM); default mlp",
    )  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="PSNR against horizon for STORM and/or the RSSM")
    p.add_argument("--storm", help="STORM checkpoint")
    p.add_argument("--rssm", help="RSSM / P03 checkpoint")
    p.add_argument("--data", required=True, help="trajectories .npz (its held-out episodes)")
    p.add_argument("--out", default="figures", help="folder for the PSNR figure")
    p.add_argument("--count", type=int, help="evaluation windows (default: the profile's)")
    p.add_argument("--fvd", action="store_true", help="also FVD on the profile's fvd_count clips")
    p.add_argument("--profile", help="profile for the evaluation settings")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "compare-priors", help="STORM with the MLP prior vs the MaskGIT prior (GIT-STORM)"
    )
    p.add_argument("--profile", help="smoke | cpu | gpu | paper | auto (default: STORM_PROFILE)")
    p.add_argument("--data", help="trajectories .npz (collected if missing)")
    p.add_argument("--mlp", required=True, help="MLP-prior checkpoint (trained if missing)")
    p.add_argument("--maskgit", required=True, help="MaskGIT-prior checkpoint (trained if missing)")
    p.add_argument("--steps", type=int, help="gradient steps (default: the profile's)")
    p.add_argument("--count", type=int, help="evaluation windows (default: the profile's)")
    p.add_argument("--out", default="figures", help="folder for prior_comparison.png")
    p.add_argument("--retrain", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_compare_priors)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # our errors carry readable messages
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
