"""The steps the notebook and the CLI share: get the data, train or reuse a model.

Kept apart from ``train.py`` so that the loop itself stays free of file policy.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .collect import collect
from .config import Config, get_profile
from .data import DataError, TrajectoryData
from .models import build_world_model
from .train import History, fit
from .types import WorldModel
from .utils import default_device, seed_everything


def data_path(config: Config, root: str | Path = "data") -> Path:
    """Where the profile's trajectories live, e.g. ``data/boxing_30000_seed0.npz``."""
    game = config.data.env_id.split("/")[-1].split("-")[0].lower()
    return Path(root) / f"{game}_{config.data.steps}_seed{config.data.seed}.npz"


def ensure_data(
    config: Config, path: str | Path | None = None, *, progress: bool = True
) -> tuple[TrajectoryData, TrajectoryData]:
    """Load the trajectories at ``path`` if present and matching ``config.data``;
    otherwise collect them from the game. Returns the (train, validation) split by
    whole episodes."""
    cfg = config.data
    path = Path(path) if path is not None else data_path(config)
    data = None
    if path.exists():
        try:
            data = TrajectoryData.load(path)
        except DataError as exc:
            print(f"{path} is unusable ({exc}); collecting it again.")
        else:
            meta = data.meta
            wanted = {"env_id": cfg.env_id, "seed": cfg.seed, "steps": cfg.steps}
            if any(meta.get(k) != v for k, v in wanted.items()):
                print(f"{path} was collected with other settings; collecting again.")
                data = None
    if data is None:
        start = time.perf_counter()
        collect(
            cfg.env_id,
            cfg.steps,
            cfg.seed,
            path,
            image_size=cfg.image_size,
            frameskip=cfg.frameskip,
            sticky_prob=cfg.sticky_prob,
            max_episode_steps=cfg.max_episode_steps,
            progress=progress,
        )
        data = TrajectoryData.load(path)
        print(
            f"Collected {len(data)} steps of {cfg.env_id} in {time.perf_counter() - start:.0f} s."
        )
    else:
        print(f"Reusing {path} ({len(data)} steps, {data.num_episodes} episodes).")
    return data.split(cfg.val_fraction, seed=cfg.seed)


def train_or_load(
    kind: str,
    config: Config,
    train_data: TrajectoryData,
    val_data: TrajectoryData,
    path: str | Path,
    *,
    retrain: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[WorldModel, History]:
    """Reuse the finished checkpoint at ``path``, or train ``kind`` for
    ``config.train.steps`` steps (resuming a partial checkpoint) and save it there."""
    device = default_device(device)
    path = Path(path)
    steps = config.train.steps
    resume = False
    if path.exists() and not retrain:
        try:
            payload = read_checkpoint(path, device)
        except CheckpointError as exc:
            print(f"{exc}\nTraining a new {kind} model instead.")
        else:
            same = payload["model"] == kind and _training_fields(payload["config"]) == (
                _training_fields(config)
            )
            if same and payload["step"] >= steps:
                model = load_checkpoint(path, device, kind=kind, action_dim=train_data.action_dim)
                print(f"Loaded {kind} from {path} (step {payload['step']}).")
                return model, History.from_dict(payload["history"])
            resume = same
            if not same:
                print(f"{path} holds a model with other settings; training a new one.")
    seed_everything(config.train.seed)  # initial weights depend on the seed alone
    model = build_world_model(kind, config, train_data.action_dim, device)  # type: ignore[arg-type]
    history = fit(
        model,
        train_data,
        val_data,
        steps=steps,
        config=config.train,
        device=device,
        checkpoint_path=path,
        resume=resume,
        progress=progress,
    )
    return model, history


def _training_fields(config: Config) -> dict:
    """The parts of a config that define a training run, except its length: a checkpoint
    that matches them and has fewer steps is resumed, one with enough steps is reused.
    The ``maskgit`` section counts only for a model with the MaskGIT prior."""
    raw = config.to_dict()
    raw["train"].pop("steps")
    if raw["heads"]["dynamics_head"] == "mlp":  # the MaskGIT sizes do not matter then
        raw.pop("maskgit")
    return {k: v for k, v in raw.items() if k not in ("name", "eval")}


def evaluate_checkpoints(
    *,
    storm: str | Path | None,
    rssm: str | Path | None,
    data: str | Path,
    out: str | Path = "figures",
    count: int | None = None,
    profile: str | None = None,
    device: torch.device | str | None = None,
    fvd: bool = False,
) -> dict:
    """The instructor's re-run: PSNR against horizon on the held-out episodes of ``data``.

    Loads the STORM checkpoint and/or the RSSM (P03) checkpoint, scores both on the same
    fixed evaluation windows, prints the table of steps 1, 3, 5, 10 (with each model's
    reconstruction ceiling and the copy-last-frame baseline) and writes
    ``out/psnr_vs_horizon.png``. With ``fvd``, also the FVD of each model's clips on
    the profile's ``eval.fvd_count`` windows (skipped with a sentence when the I3D
    weights are not installed). Returns ``RolloutPSNR.to_dict()`` (plus ``"fvd"``).
    """
    from .evaluate import rollout_psnr
    from .p03 import load_rssm_checkpoint
    from .plots import plot_psnr_vs_horizon

    if storm is None and rssm is None:
        raise ValueError("give --storm and/or --rssm")
    start = time.perf_counter()
    device = default_device(device)
    config = get_profile_for_eval(storm, profile, device)
    all_data = TrajectoryData.load(data)
    _, val_data = all_data.split(config.data.val_fraction, seed=config.data.seed)
    models: dict[str, WorldModel] = {}
    if storm is not None:
        models["STORM"] = load_checkpoint(
            storm, device, kind="storm", action_dim=val_data.action_dim
        )
    if rssm is not None:
        models["RSSM"] = load_rssm_checkpoint(rssm, device, action_dim=val_data.action_dim)
    ev = config.eval
    result = rollout_psnr(
        models,
        val_data,
        context=ev.context,
        horizon=ev.horizon,
        count=count or ev.count,
        seed=ev.seed,
        batch_size=ev.batch_size,
        device=device,
    )
    print(result.table())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_psnr_vs_horizon(result)
    figure.savefig(out / "psnr_vs_horizon.png", dpi=100, bbox_inches="tight")
    print(f"wrote {out / 'psnr_vs_horizon.png'} in {time.perf_counter() - start:.0f} s")
    summary = result.to_dict()
    if fvd and ev.fvd_count:
        from .fvd import fvd_for_models
        from .nets.i3d import FVDWeightsError

        windows = val_data.eval_windows(ev.fvd_count, ev.context + ev.horizon, ev.seed)
        try:
            scores = fvd_for_models(
                models, windows, context=ev.context, horizon=ev.horizon, seed=ev.seed,
                device=device,
            )  # fmt: skip
        except FVDWeightsError as exc:
            print(f"FVD skipped: {exc}")
        else:
            values = ", ".join(f"{k} {v:.0f}" for k, v in scores["fvd"].items())
            print(f"FVD over {scores['clips']} clips ({scores['seconds']:.0f} s): {values}")
            summary["fvd"] = scores
    return summary


def get_profile_for_eval(
    storm: str | Path | None, profile: str | None, device: torch.device
) -> Config:
    """The evaluation settings: the profile's, with the data split of the STORM checkpoint's
    config when one is given (so the held-out episodes are the ones it never trained on)."""
    config = get_profile(profile)
    if storm is not None:
        stored = read_checkpoint(storm, device)["config"]
        config.data = stored.data
    return config


def load_p03(
    path: str | Path, device: torch.device | str | None = None, *, action_dim: int | None = None
) -> tuple[WorldModel, History]:
    """A P03 (RSSM) checkpoint and its training history (empty for a bare state dict)."""
    from .p03 import load_rssm_checkpoint

    model = load_rssm_checkpoint(path, device, action_dim=action_dim)
    try:
        history = History.from_dict(read_checkpoint(path, "cpu").get("history"))
    except CheckpointError:  # a bare state dict: the model loaded, but there is no history
        history = History()
    return model, history
