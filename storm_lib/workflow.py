"""The steps the notebook and the CLI share: get the data, train or reuse a model.

Kept apart from ``train.py`` so that the loop itself stays free of file policy.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .atari import collect
from .checkpoint import (
    CheckpointError,
    describe_checkpoint,
    is_partial,
    load_checkpoint,
    read_checkpoint,
)
from .config import Config, get_profile
from .data import DataError, TrajectoryData
from .models import WorldModel, build_world_model
from .train import History, fit
from .types import RolloutModel
from .utils import default_device, seed_everything


def data_path(config: Config, root: str | Path = "data") -> Path:
    """Where the profile's trajectories live, e.g. ``data/boxing_30000_seed0.npz``."""
    game = config.data.env_id.split("/")[-1].split("-")[0].lower()
    return Path(root) / f"{game}_{config.data.steps}_seed{config.data.seed}.npz"


def checkpoint_path(kind: str, config: Config, root: str | Path = "checkpoints") -> Path:
    """Where our own training of ``kind`` on this profile goes, e.g.
    ``checkpoints/storm_cpu.pt``, ``checkpoints/rssm_cpu.pt`` or, for STORM with the
    MaskGIT prior, ``checkpoints/storm_maskgit_cpu.pt``. A student's P03 file never
    lives at one of these names: it is only read, from wherever ``P03_CHECKPOINT`` says."""
    head = config.heads.dynamics_head if kind == "storm" else "mlp"
    name = kind if head == "mlp" else f"{kind}_{head}"
    return Path(root) / f"{name}_{config.name}.pt"


def data_settings(config: Config) -> dict[str, object]:
    """The profile's collection settings, named as a data file's meta names them."""
    d = config.data
    return dict(
        env_id=d.env_id, steps=d.steps, seed=d.seed, image_size=d.image_size,
        frameskip=d.frameskip, sticky_prob=d.sticky_prob, max_episode_steps=d.max_episode_steps,
    )  # fmt: skip


def ensure_data(
    config: Config, path: str | Path | None = None, *, progress: bool = True, as_is: bool = False
) -> tuple[TrajectoryData, TrajectoryData]:
    """The profile's trajectories, split (train, validation) by whole episodes.

    ``path`` (default :func:`data_path`) is collected from the game when it does not
    exist. An existing file is only ever read: when it cannot be loaded, or was collected
    with other settings than the profile's, that is a ``DataError`` saying what differs
    and how to collect a matching file; the file is left as it is. With ``as_is`` a valid
    file with other settings is used anyway (e.g. a P03 dataset from ``import-data``).
    """
    path = Path(path) if path is not None else data_path(config)
    wanted = data_settings(config)
    if not path.exists():
        start = time.perf_counter()
        d = config.data
        collect(
            d.env_id, d.steps, d.seed, path, image_size=d.image_size, frameskip=d.frameskip,
            sticky_prob=d.sticky_prob, max_episode_steps=d.max_episode_steps, progress=progress,
        )  # fmt: skip
        data = TrajectoryData.load(path)
        seconds = time.perf_counter() - start
        print(f"Collected {len(data)} steps of {data.env_id} to {path} in {seconds:.0f} s.")
        return data.split(config.data.val_fraction, seed=config.data.seed)
    data = TrajectoryData.load(path)  # a DataError names the file; nothing is written
    diff = data.settings_diff(wanted)
    listing = "\n".join(f"  {k}: file {a!r}, profile {b!r}" for k, (a, b) in diff.items())
    if diff and not as_is:
        default = data_path(config)
        fix = (
            f"leave the data path out to use (or collect) {default}"
            if default != path
            else f"collect into a new file with `python -m storm_lib collect --profile "
            f"{config.name} --out NEW.npz` and pass that"
        )
        raise DataError(
            f"{path} was not collected with the {config.name!r} profile's settings:\n{listing}\n"
            f"It was left as it is. To train on matching data, {fix}; to use this file "
            "anyway, pass --data-as-is (CLI) or as_is=True."
        )
    if diff:
        print(f"Using {path} as it is; it differs from the {config.name!r} profile:\n{listing}")
    print(f"Reusing {path} ({len(data)} steps, {data.num_episodes} episodes).")
    return data.split(config.data.val_fraction, seed=config.data.seed)


def check_trained_on(payload: dict, data: TrajectoryData, source: str | Path) -> list[str]:
    """Check a checkpoint's record of its training data against evaluation ``data``.

    A different game, frame size or action set makes the comparison meaningless: that is
    a ``DataError``. Other data of the same game is sensible (fresh episodes), so a
    different file, or a checkpoint that records no data, gives a returned warning. Only
    what the record holds is compared (ours hold everything; an outside model's record,
    e.g. a student's, may hold part).
    """
    trained = payload.get("data") if payload else None
    if not trained:
        return [f"{source}: records no training data, so it cannot be checked against {data}"]
    mine = data.fingerprint
    for key in ("env_id", "image_size", "action_meanings"):
        if key in trained and trained[key] != mine[key]:
            raise DataError(
                f"{source} was trained on data with {key} {trained.get(key)!r}, but "
                f"{data.path or 'the evaluation data'} has {mine[key]!r}: scores would be "
                "meaningless. Evaluate it on data of the game it was trained on."
            )
    if "sha256" in trained and trained["sha256"] != mine["sha256"]:
        return [
            f"{source} was trained on another {mine['env_id']} file (sha256 "
            f"{trained.get('sha256')}, not {mine['sha256']}): its held-out episodes are not "
            "the ones the model never saw"
        ]
    return []


def _run_difference(payload: dict, kind: str, config: Config, data: TrajectoryData) -> str:
    """Why an existing checkpoint is not a (partial or finished) run of this training, or ''."""
    if payload["model"] != kind:
        return f"it holds a {payload['model']} model"
    mine, theirs = _training_fields(config), _training_fields(payload["config"])
    sections = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if sections:
        return f"other settings in config sections {sections}"
    recorded = payload.get("data")
    if recorded and recorded.get("sha256") != data.fingerprint["sha256"]:
        return f"it was trained on other data (sha256 {recorded.get('sha256')})"
    return ""


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
    """Reuse the finished checkpoint at ``path``, resume a partial one of the same run, or
    train ``kind`` for ``config.train.steps`` steps and save it there.

    ``path`` is only written when it is new or holds our own checkpoint: of the same run
    (resumed), or of any run when ``retrain`` asks to replace it. A foreign or unreadable
    file, or our checkpoint of another run without ``retrain``, is a ``CheckpointError``
    and the file is left as it is.
    """
    device = default_device(device)
    path = Path(path)
    steps = config.train.steps
    resume = False
    if path.exists():
        try:
            payload = read_checkpoint(path, device)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}\n  It is not a checkpoint this library wrote, so it is never "
                "overwritten: choose another checkpoint path."
            ) from None
        print(describe_checkpoint(payload, path))
        differs = _run_difference(payload, kind, config, train_data)
        if retrain:
            print(f"Replacing it, as asked, with a new {kind} run of {steps} steps.")
        elif differs:
            raise CheckpointError(
                f"{path}: not a run of this training ({differs}). It was left as it is: "
                "choose another path, or replace it with --force (CLI) / RETRAIN=1 (notebook)."
            )
        elif payload["step"] >= steps:
            model = load_checkpoint(path, device, kind=kind, action_dim=train_data.action_dim)
            return model, History.from_dict(payload["history"])
        else:
            resume = True
            print(f"Resuming it from step {payload['step']} to {steps}.")
    seed_everything(config.train.seed)  # initial weights depend on the seed alone
    model = build_world_model(kind, config, train_data.action_dim, device)
    history = fit(
        model,
        train_data,
        val_data,
        steps=steps,
        config=config.train,
        device=device,
        checkpoint_path=path,
        resume=resume,
        overwrite=retrain,
        progress=progress,
    )
    return model, history


def _training_fields(config: Config) -> dict:
    """The parts of a config that define a training run, except its length: a checkpoint
    that matches them and has fewer steps is resumed, one with enough steps is reused.
    The ``maskgit`` section counts only for a model with the MaskGIT prior."""
    raw = config.to_dict()
    raw["train"].pop("steps")
    raw["train"].pop("deterministic")  # how the kernels run, not what the run computes
    if raw["heads"]["dynamics_head"] == "mlp":  # the MaskGIT sizes do not matter then
        raw.pop("maskgit")
    return {k: v for k, v in raw.items() if k not in ("name", "eval")}


def _checked_payload(
    path: str | Path, data: TrajectoryData | None, *, allow_partial: bool
) -> dict | None:
    """Read, describe and check one of our checkpoints before scoring it (None for a file
    in another format, e.g. a bare P03 state dict, which records nothing to check)."""
    try:
        payload = read_checkpoint(path, "cpu")
    except CheckpointError:  # not our format: the model's own loader says what is wrong
        if data is not None:
            print(f"note: {path}: a bare state dict records no training data to check.")
        return None
    print(describe_checkpoint(payload, path))
    if is_partial(payload) and not allow_partial:
        raise CheckpointError(
            f"{path}: a partial run (step {payload['step']} of {payload['total_steps']}); it is "
            "not graded as if finished. Finish it by training again to the same path, or "
            "score it as it is with --allow-partial (CLI) / ALLOW_PARTIAL=1 (notebook)."
        )
    if data is not None:
        for warning in check_trained_on(payload, data, path):
            print(f"warning: {warning}")
    return payload


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
    allow_partial: bool = False,
    rssm_latent: tuple[int, int] | None = None,
    rssm_code: str | None = None,
    rssm_name: str | None = None,
    json_path: str | Path | None = None,
    overwrite_json: bool = False,
) -> dict:
    """The instructor's re-run: PSNR against horizon on the held-out episodes of ``data``.

    Loads the STORM checkpoint and/or the RSSM (P03) checkpoint, says what each is (kind,
    step of total, profile, training data), refuses a partial run unless
    ``allow_partial``, and checks each against ``data`` (:func:`check_trained_on`). Then
    scores both on the same fixed evaluation windows with argmax and with sampled latents,
    printing for each the table of steps 1, 3, 5, 10 (with each model's ceiling of the
    same kind, its posterior entropy and the trivial baselines), where each model's gap
    comes from, and whether it uses its actions; writes ``out/psnr_vs_horizon.png`` and
    ``out/action_sensitivity.png``. With ``fvd``, also the FVD of each model's clips
    on the profile's ``eval.fvd_count`` windows (skipped with a sentence when the I3D
    weights are not installed). ``rssm_latent`` is ``(K, V)`` for a bare P03 state dict,
    whose shapes only give K * V. With ``rssm_code`` (``path/to/p03_model.py:load``)
    the RSSM is the student's own model, built by their code from the ``rssm`` weights
    (:func:`storm_lib.outside.load_outside_model`; **their code runs**), checked against
    ``data`` as far as it shows (action count, frame size, a training-data record).
    ``rssm_name`` labels it in tables, figures and sentences (default: the loader file's
    stem with ``rssm_code``, else ``"RSSM"``). With ``json_path``, every number goes to
    that results file as well (:mod:`storm_lib.results`; what evaluation does not compute
    is null). It is checked before anything runs: a file there that is not a results file
    of ours is never overwritten, and one of ours only with ``overwrite_json``.

    Returns ``{"mode": ..., "sample": ...}`` of ``RolloutPSNR.to_dict()``, ``"actions"``
    (and ``"fvd"``).
    """
    from .evaluate import MODES, action_sensitivity, ignores_actions, rollout_psnr
    from .outside import outside_label
    from .plots import plot_action_sensitivity, plot_psnr_vs_horizon
    from .report import MIXED_DISTANCE, gap_decomposition

    if storm is None and rssm is None:
        raise ValueError("give --storm and/or --rssm")
    label = outside_label(rssm_code, rssm_name)
    if rssm is not None and label == "STORM":
        raise ValueError("the student's model cannot be named STORM: give another --rssm-name")
    if json_path is not None:
        from .results import check_target

        check_target(json_path, overwrite=overwrite_json)
    start = time.perf_counter()
    device = default_device(device)
    config = get_profile_for_eval(storm, profile, device)
    all_data = TrajectoryData.load(data)
    _, val_data = all_data.split(config.data.val_fraction, seed=config.data.seed)
    models: dict[str, RolloutModel] = {}
    histories: dict[str, History] = {}
    if storm is not None:
        payload = _checked_payload(storm, all_data, allow_partial=allow_partial)
        histories["STORM"] = History.from_dict(payload["history"] if payload else None)
        models["STORM"] = load_checkpoint(
            storm, device, kind="storm", action_dim=val_data.action_dim
        )
    if rssm is not None and rssm_code is not None:
        models[label] = load_outside(rssm_code, rssm, device, all_data, label)
    elif rssm is not None:
        models[label], histories[label] = load_p03(
            rssm, device, data=all_data, allow_partial=allow_partial, latent=rssm_latent
        )
    ev = config.eval
    protocol = dict(
        context=ev.context, horizon=ev.horizon, count=count or ev.count, seed=ev.seed,
        batch_size=ev.batch_size, device=device,
    )  # fmt: skip
    results = {mode: rollout_psnr(models, val_data, mode=mode, **protocol) for mode in MODES}
    for result in results.values():
        print(result.table(), end="\n\n")
    for name in models:
        print(gap_decomposition(results, name))
    sensitivity = action_sensitivity(models, val_data, **protocol)
    for name, sens in sensitivity.items():
        if ignores_actions(sens):
            print(f"warning: {name} returns the same frames whatever the actions are")
        gains = sens.real.mean - sens.shuffled.mean
        mixed = "" if getattr(models[name], "follows_mode", True) else f" ({MIXED_DISTANCE})"
        print(
            f"{name}: real minus shuffled future actions {gains[-1]:+.2f} dB at step "
            f"{ev.horizon}; the two rollouts are {sens.between.mean[-1]:.1f} dB apart{mixed}"
        )
    for name, model in models.items():
        if getattr(model, "clip_stats", None) is not None:
            print(f"{name}: {model.clip_stats}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_psnr_vs_horizon(results).savefig(out / "psnr_vs_horizon.png", bbox_inches="tight")
    plot_action_sensitivity(sensitivity).savefig(
        out / "action_sensitivity.png", bbox_inches="tight"
    )
    seconds = time.perf_counter() - start
    print(f"wrote {out / 'psnr_vs_horizon.png'} and action_sensitivity.png in {seconds:.0f} s")
    summary: dict = {mode: r.to_dict() for mode, r in results.items()}
    summary["actions"] = {name: sens.to_dict() for name, sens in sensitivity.items()}
    notes: list[str] = []
    if fvd and ev.fvd_count:
        from .fvd import fvd_report

        # Never an abort: missing I3D weights skip FVD, a failing student's model is left
        # out with a sentence, and the models that work are scored.
        scored = fvd_report(
            models, val_data, context=ev.context, horizon=ev.horizon, count=ev.fvd_count,
            seed=ev.seed, device=device,
        )  # fmt: skip
        print(scored)
        notes += [line for line in scored.lines if not line.startswith("FVD over")]
        if scored.result is not None:
            summary["fvd"] = scored.result
    if json_path is not None:
        from .results import save_run_results

        save_run_results(
            json_path, results, overwrite=overwrite_json, histories=histories,
            sensitivity=sensitivity, fvd=summary.get("fvd"), config=config, device=device,
            checkpoints={"STORM": storm, label: rssm}, started=start, command="evaluate",
            notes=notes, clip_counts={
                name: m.clip_stats.clipped for name, m in models.items()
                if getattr(m, "clip_stats", None) is not None
            },
        )  # fmt: skip
    return summary


def load_outside(
    code: str, weights: str | Path, device: torch.device, data: TrajectoryData, label: str
) -> RolloutModel:
    """A student's model built by their code (``path/file.py:load``; **it runs**) from
    ``weights``, labelled ``label`` in what is printed, and checked against ``data`` as
    far as it shows: its action count and frame size, and its training-data record
    (:func:`check_trained_on`; a warning when it has none). The notebook's route too."""
    from .outside import load_outside_model

    model = load_outside_model(
        code, weights, device, action_dim=data.action_dim, image_size=data.image_size
    )
    print(f"Loaded the student's model {label!r} with {code} from {weights} (their code ran).")
    shown = model.check_pairing()
    print(
        f"{label}: its model has {' and '.join(shown)}, as the data"
        if shown
        else f"{label}: its model says neither its action count nor its frame size; only its "
        "outputs' shapes are checked"
    )
    record = {"data": model.trained_on} if model.trained_on else None
    for warning in check_trained_on(record, data, weights):
        print(f"warning: {warning}")
    return model


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
    path: str | Path,
    device: torch.device | str | None = None,
    *,
    data: TrajectoryData | None = None,
    allow_partial: bool = False,
    latent: tuple[int, int] | None = None,
) -> tuple[WorldModel, History]:
    """A P03 (RSSM) checkpoint, read and never written, and its training history (empty
    for a bare state dict).

    Says what the file is, refuses a partial run of ours unless ``allow_partial``, and
    checks it against ``data`` when given (:func:`check_trained_on`). ``latent`` is
    ``(K, V)`` for a bare state dict, whose tensor shapes only give K * V.

    Raises:
        CheckpointError: no such file (nothing is trained in its place), an unusable
            file, or a partial run.
        DataError: it was trained on another game, frame size or action set than ``data``.
    """
    from .p03 import load_rssm_checkpoint

    if not Path(path).is_file():
        raise CheckpointError(
            f"{path}: no such P03 checkpoint file. A P03 checkpoint is only ever read, and "
            "nothing is trained in its place: check the path (P03_CHECKPOINT / --rssm)."
        )
    payload = _checked_payload(path, data, allow_partial=allow_partial)
    categoricals, classes = latent if latent else (None, None)
    model = load_rssm_checkpoint(
        path,
        device,
        action_dim=None if data is None else data.action_dim,
        categoricals=categoricals,
        classes=classes,
    )
    history = History.from_dict(payload["history"]) if payload else History()
    return model, history
