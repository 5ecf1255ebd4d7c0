"""Command line: ``python -m storm_lib collect | train | evaluate | import-data |
compare-priors | compare-results | play``.

Examples::

    python -m storm_lib collect --profile cpu          # data/boxing_30000_seed0.npz
    python -m storm_lib train --model storm --profile cpu   # checkpoints/storm_cpu.pt
    python -m storm_lib train --model rssm --profile cpu    # checkpoints/rssm_cpu.pt
    python -m storm_lib evaluate --storm checkpoints/storm_cpu.pt --rssm their_p03.pt \\
        --data data/boxing_30000_seed0.npz --out figures/
    python -m storm_lib evaluate --storm checkpoints/storm_cpu.pt --rssm their_p03.pt \\
        --rssm-code their_p03_model.py:load --data data/p03.npz     # runs their code
    python -m storm_lib import-data their_replay.npz --env ALE/Boxing-v5 --out data/p03.npz
    python -m storm_lib import-data logdir/train_eps/ --env ALE/Boxing-v5 --out data/p03.npz
    python -m storm_lib compare-priors --profile cpu --data data/boxing_30000_seed0.npz \\
        --mlp checkpoints/storm_cpu.pt --maskgit checkpoints/storm_maskgit_cpu.pt
    python -m storm_lib evaluate ... --json results/mine.json    # every number, as JSON
    python -m storm_lib compare-results results/cpu.json results/gpu.json --out cmp.png
    python -m storm_lib play --storm checkpoints/storm_cpu.pt    # needs a display

Files are never written over unless they are our own and --force asks for it: a data
file or checkpoint from elsewhere is only read. Errors print as one paragraph; --debug
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from .config import get_profile


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _latent(text: str) -> tuple[int, int]:
    k, _, v = text.lower().partition("x")
    try:
        return _positive_int(k), _positive_int(v)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected KxV such as 32x32, got {text!r}") from None


def _collect(args: argparse.Namespace) -> None:
    from .atari import collect
    from .workflow import data_path

    config = get_profile(args.profile)
    cfg = config.data
    cfg.env_id = args.env or cfg.env_id
    cfg.steps = args.steps or cfg.steps
    cfg.seed = cfg.seed if args.seed is None else args.seed
    out = Path(args.out) if args.out else data_path(config)
    start = time.perf_counter()
    collect(
        cfg.env_id,
        cfg.steps,
        cfg.seed,
        out,
        image_size=cfg.image_size,
        frameskip=cfg.frameskip,
        sticky_prob=cfg.sticky_prob,
        max_episode_steps=cfg.max_episode_steps,
        overwrite=args.force,
    )
    seconds = time.perf_counter() - start
    print(f"wrote {out}: {cfg.steps} steps of {cfg.env_id} in {seconds:.1f} s")


def _train(args: argparse.Namespace) -> None:
    from .workflow import checkpoint_path, ensure_data, train_or_load

    config = get_profile(args.profile)
    if args.steps:
        config.train.steps = args.steps
    config.heads.dynamics_head = args.dynamics_head
    config.train.deterministic = config.train.deterministic or args.deterministic
    train_data, val_data = ensure_data(config, args.data, as_is=args.data_as_is)
    out = args.out or checkpoint_path(args.model, config)
    _, history = train_or_load(
        args.model, config, train_data, val_data, out, retrain=args.force, device=args.device
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
        allow_partial=args.allow_partial,
        rssm_latent=args.rssm_latent,
        rssm_code=args.rssm_code,
        rssm_name=args.rssm_name,
        json_path=args.json,
        overwrite_json=args.force,
    )


def _import_data(args: argparse.Namespace) -> None:
    from .importing import import_data

    meanings = args.action_meanings.split(",") if args.action_meanings else None
    out = import_data(
        args.src, args.out, env_id=args.env, image_size=args.image_size,
        action_dim=args.action_dim, action_meanings=meanings, overwrite=args.force,
    )  # fmt: skip
    from .data import TrajectoryData

    data = TrajectoryData.load(out)
    origin = data.meta["imported_from"]
    print(f"wrote {out}: {data}, {data.action_dim} actions, {data.image_size}px frames")
    print(f"  from {len(origin['files'])} file(s); {origin['frames']}; {origin['convention']}")


def _compare_priors(args: argparse.Namespace) -> None:
    from .compare import compare_priors
    from .plots import plot_prior_comparison
    from .workflow import ensure_data

    start = time.perf_counter()
    config = get_profile(args.profile)
    if args.steps:
        config.train.steps = args.steps
    train_data, val_data = ensure_data(config, args.data, as_is=args.data_as_is)
    result = compare_priors(
        config, train_data, val_data, mlp_path=args.mlp, maskgit_path=args.maskgit,
        retrain=args.force, count=args.count, device=args.device,
    )  # fmt: skip
    print(result.table())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_prior_comparison(result).savefig(out / "prior_comparison.png", bbox_inches="tight")
    print(f"wrote {out / 'prior_comparison.png'} in {time.perf_counter() - start:.0f} s")


def _compare_results(args: argparse.Namespace) -> None:
    from .plots import plot_results_comparison, save_figure
    from .results import load

    out = Path(args.out)
    if any(out.resolve() == Path(p).resolve() for p in args.files):
        raise ValueError(f"--out {out} is one of the results files; give a figure file")
    runs: dict[str, dict] = {}
    for path in args.files:
        doc = load(path)
        label = doc["run"]["label"]
        runs[label if label not in runs else f"{label} ({path})"] = doc
    save_figure(plot_results_comparison(runs, mode=args.mode), out)
    for label, doc in runs.items():
        horizon = doc["protocol"]["horizon"]
        for name, model in doc["models"].items():
            s = model["psnr"][args.mode]
            hw = [float("nan") if v is None else v for v in s["half_width"]]
            print(
                f"{label} / {name}: {s['mean'][0]:.2f} ± {hw[0]:.2f} dB at step 1, "
                f"{s['mean'][-1]:.2f} ± {hw[-1]:.2f} dB at step {horizon} (n={s['n']})"
            )
    print(f"wrote {out}")


def _play(args: argparse.Namespace) -> None:
    from .play_ui import NOTEBOOK_CELL, display_problem

    problem = display_problem()  # before anything slow
    if problem:
        raise ValueError(f"{problem}: play in the notebook instead, {NOTEBOOK_CELL}")
    from .checkpoint import load_checkpoint, read_checkpoint
    from .data import TrajectoryData
    from .play import ImaginedGame, held_out_context
    from .play_ui import play_window
    from .workflow import check_trained_on, data_path

    payload = read_checkpoint(args.storm, "cpu")
    config = payload["config"]
    data = TrajectoryData.load(args.data or data_path(config))
    for warning in check_trained_on(payload, data, args.storm):
        print(f"warning: {warning}")
    model = load_checkpoint(args.storm, args.device, kind="storm", action_dim=data.action_dim)
    _, val = data.split(config.data.val_fraction, seed=config.data.seed)
    obs, actions = held_out_context(val, config.eval.context, args.seed)
    game = ImaginedGame(model, obs, actions, mode=args.mode, action_meanings=data.action_meanings)
    print(f"Playing {args.storm} from a held-out context of {data}; close the window to stop.")
    try:
        play_window(game)
    except RuntimeError as exc:  # no window after all: said as one paragraph, like the rest
        raise ValueError(str(exc)) from None


PROFILE_HELP = "smoke | cpu | gpu | paper | auto (default: STORM_PROFILE, else auto)"
DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda if available)"
FORCE_HELP = "replace an existing file of ours with other settings (never a foreign file)"
AS_IS_HELP = "train on --data even though it was collected with other settings than the profile"
DETERMINISTIC_HELP = (
    "deterministic mode (train.deterministic): on CUDA, cuDNN autotuning off and "
    "deterministic algorithms, so a run and its resumption repeat bit for bit (slower)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m storm_lib",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "collect", parents=[common], help="collect trajectories from a real Atari game"
    )
    p.add_argument("--env", help="ALE id (default: the profile's, ALE/Boxing-v5)")
    p.add_argument("--steps", type=_positive_int, help="agent steps (default: the profile's)")
    p.add_argument("--seed", type=int, help="seed of the game and the random policy")
    p.add_argument("--out", help="output .npz (default: data/<game>_<steps>_seed<seed>.npz)")
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=_collect)

    p = sub.add_parser(
        "train", parents=[common], help="train a world model with the one training loop"
    )
    p.add_argument("--model", choices=("storm", "rssm"), required=True)
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument("--data", help="trajectories .npz (collected if missing, else only read)")
    p.add_argument("--data-as-is", action="store_true", help=AS_IS_HELP)
    p.add_argument("--out", help="checkpoint (default: checkpoints/<model>_<profile>.pt)")
    p.add_argument("--steps", type=_positive_int, help="gradient steps (default: the profile's)")
    p.add_argument("--force", "--retrain", action="store_true", help=FORCE_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    p.add_argument(
        "--dynamics-head", choices=("mlp", "maskgit"), default="mlp",
        help="STORM's prior: mlp (STORM) or maskgit (GIT-STORM); default mlp",
    )  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "evaluate", parents=[common], help="PSNR against horizon for STORM and/or the RSSM"
    )
    p.add_argument("--storm", help="STORM checkpoint")
    p.add_argument("--rssm", help="RSSM / P03 checkpoint, or the weights for --rssm-code (read)")
    p.add_argument(
        "--rssm-code", metavar="FILE.py:FUNC",
        help="a student's own model: FUNC(weights, device) in FILE.py builds it from the "
        "--rssm weights. THIS RUNS THEIR CODE (the weights are still loaded weights_only)",
    )  # fmt: skip
    p.add_argument(
        "--rssm-name", metavar="NAME",
        help="the student's model's name in tables and figures (default: the --rssm-code "
        "file's stem, else RSSM)",
    )  # fmt: skip
    p.add_argument(
        "--rssm-latent", type=_latent, metavar="KxV",
        help="categoricals x classes of a bare P03 state dict, e.g. 32x32",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="trajectories .npz (its held-out episodes)")
    p.add_argument("--out", default="figures", help="folder for the PSNR figure")
    p.add_argument("--count", type=_positive_int, help="evaluation windows (default: profile's)")
    p.add_argument("--fvd", action="store_true", help="also FVD on the profile's fvd_count clips")
    p.add_argument("--allow-partial", action="store_true", help="score unfinished checkpoints")
    p.add_argument("--profile", help="profile for the evaluation settings")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument(
        "--json", metavar="PATH",
        help="also write every number to this results file (storm_lib.results; never over a "
        "file that is not one of ours)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace our results file at --json")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "import-data", parents=[common], help="convert a P03 dataset (.npz) into this format"
    )
    p.add_argument(
        "src", nargs="+",
        help=".npz files with obs/image, action(s), reward(s), done/is_first/..., directories "
        "of them (a dreamerv3-torch replay: one .npz per episode) or quoted globs",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="the new data file, e.g. data/p03.npz")
    p.add_argument("--env", required=True, help="the game it was recorded on, e.g. ALE/Boxing-v5")
    p.add_argument("--image-size", type=_positive_int, default=64, help="frame side (default 64)")
    p.add_argument("--action-dim", type=_positive_int, help="A, if the actions do not show it")
    p.add_argument("--action-meanings", help="comma-separated action names, e.g. NOOP,FIRE,...")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=_import_data)

    p = sub.add_parser(
        "compare-priors",
        parents=[common],
        help="STORM with the MLP prior vs the MaskGIT prior (GIT-STORM)",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument("--data", help="trajectories .npz (collected if missing, else only read)")
    p.add_argument("--data-as-is", action="store_true", help=AS_IS_HELP)
    p.add_argument("--mlp", required=True, help="MLP-prior checkpoint (trained if missing)")
    p.add_argument("--maskgit", required=True, help="MaskGIT-prior checkpoint (trained if missing)")
    p.add_argument("--steps", type=_positive_int, help="gradient steps (default: the profile's)")
    p.add_argument("--count", type=_positive_int, help="evaluation windows (default: profile's)")
    p.add_argument("--out", default="figures", help="folder for prior_comparison.png")
    p.add_argument("--force", "--retrain", action="store_true", help=FORCE_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=_compare_priors)

    p = sub.add_parser(
        "compare-results", parents=[common],
        help="PSNR against horizon of saved runs (results JSON files) on one axes",
    )  # fmt: skip
    p.add_argument("files", nargs="+", metavar="RESULTS.json", help="files of evaluate --json")
    p.add_argument(
        "--out", default="figures/results_comparison.png", help="figure (.png/.pdf/.svg)"
    )
    p.add_argument("--mode", choices=("mode", "sample"), default="mode",
                   help="argmax (mode, default) or sampled latents")  # fmt: skip
    p.set_defaults(func=_compare_results)

    p = sub.add_parser(
        "play", parents=[common], help="play inside STORM's imagination in a desktop window"
    )
    p.add_argument("--storm", required=True, help="STORM checkpoint")
    p.add_argument("--data", help="trajectories .npz (default: the checkpoint profile's file)")
    p.add_argument("--mode", choices=("mode", "sample"), default="mode",
                   help="argmax (mode, default) or sampled latents")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="which held-out context (default 0)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=_play)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; our errors print as one paragraph (``--debug``: with traceback).

    Exit codes: 0 done, 1 an error (bad file, data, device, disk), 2 bad arguments
    (argparse), 130 interrupted (the last completed training step is saved).
    """
    from .checkpoint import CheckpointError
    from .data import DataError
    from .outside import OutsideModelError
    from .train import TrainingError

    args = build_parser().parse_args(argv)
    readable = (CheckpointError, DataError, OutsideModelError, TrainingError, ValueError, OSError)
    try:
        if hasattr(args, "device"):  # a command that computes: set the kernels up once, say how
            from .utils import configure_device

            print(configure_device(args.device, getattr(args, "deterministic", False)))
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except readable as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
