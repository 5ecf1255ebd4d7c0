"""One-file checkpoints: atomic save, validated ``weights_only`` load.

Format (``FORMAT``)::

    {"format": "storm_lib/1", "model": "storm" | "rssm", "config": dict,
     "action_dim": int, "state_dict": {name: Tensor}, "optimizer": dict | None,
     "step": int, "total_steps": int | None, "history": {"train": [...], "val": [...]} | None,
     "train_state": {RNG and sampler states} | None,
     "data": {"env_id", "steps", "seed", "image_size", "action_meanings", "sha256"} | None}

``total_steps`` (the run's target) and ``data`` (what it was trained on, see
``TrajectoryData.fingerprint``) tell a partial run from a finished one and let
evaluation refuse mismatched data; files written before they existed lack them (None).

Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``) and always
maps to a chosen device, so a GPU checkpoint opens on a CPU. Everything that can go
wrong (missing, truncated, foreign or malicious file, wrong model kind, missing or
misshapen weights) is a :class:`CheckpointError` with a readable message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config
from .files import atomic_write
from .models import WorldModel, model_class
from .utils import default_device

FORMAT = "storm_lib/1"
KINDS = ("storm", "rssm")
COMPILE_PREFIX = "_orig_mod."
_ENTRIES = {  # entries every file holds, and their allowed types (see FORMAT)
    "state_dict": (dict,),
    "optimizer": (dict, type(None)),
    "history": (dict, type(None)),
    "train_state": (dict, type(None)),
}
_OPTIONAL = {"total_steps": (int, type(None)), "data": (dict, type(None))}  # newer entries


class CheckpointError(Exception):
    """A checkpoint file cannot be used; the message says which file and why."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`storm_lib.files.atomic_write` (old or new file, never
    a torn one; the user's umask; a full disk is an ``OSError`` naming the path)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | Path, device: torch.device | str | None = None) -> Any:
    """``torch.load(weights_only=True, map_location=device)``; any failure is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=default_device(device), weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = (
                "it contains Python objects that a weights-only load refuses (possible code). "
                "A pickled whole model cannot be read safely: save its weights with "
                "torch.save(model.state_dict(), path) instead"
            )
        raise CheckpointError(f"{path}: not a readable checkpoint: {reason[:300]}") from None


RENAMED = {"dynamics.": "prior."}
"""Old name prefix -> new: STORM's prior head was the module ``dynamics`` in checkpoints
written before it took the RSSM's name ``prior``."""


def strip_compile_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``_orig_mod.`` prefix that ``torch.compile`` adds to parameter names."""
    return {
        (k[len(COMPILE_PREFIX) :] if k.startswith(COMPILE_PREFIX) else k): v
        for k, v in state_dict.items()
    }


AGENT_NESTS = ("agent_state_dict", "state_dict", "model")
"""Keys under which a saved file nests its state dict: dreamerv3-torch's ``latest.pt``
holds ``{"agent_state_dict", "optims_state_dict"}``; others use ``state_dict``/``model``."""


class UnwrappedWeights(dict):
    """A plain state dict (``{name: Tensor}``), from :func:`unwrap_weights`.

    Attributes:
        dropped: ``{top-level part: tensor count}`` of what was left out, e.g.
            ``{"_task_behavior": 40, "_expl_behavior": 40}``.
        steps: what was done, in order, in words.
    """

    dropped: dict[str, int]
    steps: list[str]


def unwrap_weights(
    raw: Any, *, keep: str | None = "_wm", source: str = "weights", quiet: bool = False
) -> UnwrappedWeights:
    """The world model's state dict from weights as students save them.

    Takes what ``torch.load(path, weights_only=True)`` returned and undoes, in order:
    nesting (``latest.pt``'s ``agent_state_dict`` beside ``optims_state_dict``, or
    ``state_dict``/``model``: :data:`AGENT_NESTS`), ``torch.compile``'s ``_orig_mod.``
    prefix (of the whole agent, or of its world model: ``_wm._orig_mod.``), and the
    agent's own prefix ``keep`` + ``"."``: only the tensors under ``_wm.`` (the
    dreamerv3-torch agent's world model) are kept, and the other parts of the agent
    (``_task_behavior``, ``_expl_behavior``, ...) are dropped and counted. Weights
    without that prefix (a world model saved on its own) are kept whole.

    Args:
        raw: the loaded object.
        keep: the agent attribute holding the world model (None: keep every tensor).
        source: named in the printed summary and in errors.
        quiet: do not print the one-line summary of what was done and dropped.

    Returns:
        :class:`UnwrappedWeights` (a dict; ``.dropped`` and ``.steps`` say what was done).

    Raises:
        CheckpointError: no mapping of names to tensors is found.
    """
    steps: list[str] = []
    for _ in range(3):
        nests = [k for k in AGENT_NESTS if isinstance(raw, dict) and isinstance(raw.get(k), dict)]
        if not nests:
            break
        nest = nests[0]
        beside = sorted(str(k) for k in raw if k != nest)
        steps.append(f"took {nest!r}" + (f" (beside {beside})" if beside else ""))
        raw = raw[nest]
    if not isinstance(raw, dict) or not raw:
        found = type(raw).__name__ if not isinstance(raw, dict) else "an empty dict"
        raise CheckpointError(f"{source}: no state dict found (it holds {found})")
    bad = [k for k, v in raw.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"{source}: not a state dict (entry {bad[0]!r} is not a tensor); its keys: "
            f"{sorted(map(str, raw))[:12]}"
        )

    def stripped(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        out = strip_compile_prefix(sd)
        if out.keys() != sd.keys():
            steps.append(f"stripped torch.compile's {COMPILE_PREFIX!r}{where}")
        return out

    state = stripped(raw, "")
    dropped: dict[str, int] = {}
    prefix = f"{keep}." if keep else ""
    if prefix and any(k.startswith(prefix) for k in state):
        for k in state:
            if not k.startswith(prefix):
                part = k.split(".", 1)[0]
                dropped[part] = dropped.get(part, 0) + 1
        kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        steps.append(f"kept the {len(kept)} tensors under {prefix!r}")
        state = stripped(kept, f" after {prefix!r}")
    if dropped:
        parts = ", ".join(f"{k} ({n})" for k, n in dropped.items())
        steps.append(f"dropped {sum(dropped.values())} tensors of the agent's other parts: {parts}")
    out = UnwrappedWeights(state)
    out.dropped, out.steps = dropped, steps
    if steps and not quiet:
        print(f"{source}: " + "; ".join(steps))
    return out


def current_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Parameter names as the models use them now: no ``torch.compile`` prefix, and the
    :data:`RENAMED` modules under their new names."""
    out = {}
    for key, value in strip_compile_prefix(state_dict).items():
        for old, new in RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


def load_state_strict(
    model: nn.Module, state_dict: Any, source: str, note: str = "", *, ours: bool = True
) -> None:
    """Load ``state_dict`` into ``model`` exactly, or raise a CheckpointError that lists
    missing keys, unexpected keys and shape mismatches (``note`` is appended, e.g. which
    sizes were inferred). ``ours=False`` for another code base's model: only the
    ``torch.compile`` prefix is stripped, none of our old module names is renamed."""
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(f"{source}: the state dict is not a mapping of names to tensors")
    state_dict = current_names(state_dict) if ours else strip_compile_prefix(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def listing(title: str, items: list[str]) -> str:
            more = f", ... ({len(items)} in all)" if len(items) > 12 else ""
            shown = ", ".join(items[:12]) + more
            return f"\n  {title}: {shown}" if items else ""

        raise CheckpointError(
            f"{source}: the weights do not fit the model"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", shapes)
            + (f"\n  {note}" if note else "")
        )
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:  # save_checkpoint never writes these: the file is damaged or foreign
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {bad[0]}{more}")
    model.load_state_dict(state_dict, strict=True)


def _check_finite(model: nn.Module) -> None:
    state = model.state_dict()
    bad = [n for n, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights (first: {bad[0]})")


def save_checkpoint(
    path: str | Path,
    model: WorldModel,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    total_steps: int | None = None,
    history: dict[str, list[dict[str, float]]] | None = None,
    train_state: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally its training state) to one file, atomically.

    Args:
        path: destination; parent folders are created.
        model: a STORM or RSSM world model (anything with ``kind``, ``config``,
            ``action_dim`` and ``state_dict``).
        optimizer: its state is stored for resuming.
        step: gradient steps taken.
        total_steps: the steps the run is meant to take (``step < total_steps``: partial).
        history: ``History.to_dict()`` of the training run.
        train_state: RNG and sampler states (see ``train.fit``).
        data: ``TrajectoryData.fingerprint`` of the training data.

    Raises:
        ValueError: the weights contain NaN or inf (nothing is written).
        OSError: the file could not be written (e.g. a full disk); nothing is replaced.
    """
    _check_finite(model)
    payload = {
        "format": FORMAT,
        "model": model.kind,
        "config": model.config.to_dict(),
        "action_dim": int(model.action_dim),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "total_steps": None if total_steps is None else int(total_steps),
        "history": history,
        "train_state": train_state,
        "data": data,
    }
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path, device: torch.device | str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint dict (tensors on ``device``); its config becomes a Config."""
    raw = safe_torch_load(path, device)
    source = str(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(
            f"{source}: not a storm_lib checkpoint (expected format {FORMAT!r}, found {found!r})"
        )
    if raw.get("model") not in KINDS:
        raise CheckpointError(f"{source}: unknown model kind {raw.get('model')!r}")
    action_dim = raw.get("action_dim")
    if not isinstance(action_dim, int) or action_dim < 1:
        raise CheckpointError(f"{source}: invalid action_dim {action_dim!r}")
    step = raw.get("step", 0)
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{source}: invalid step {step!r}")
    wrong = [k for k, types in _ENTRIES.items() if not isinstance(raw.get(k, ...), types)]
    wrong += [k for k, types in _OPTIONAL.items() if not isinstance(raw.get(k), types)]
    if wrong:
        raise CheckpointError(f"{source}: damaged checkpoint: entries {wrong} missing or malformed")
    try:
        config = Config.from_dict(raw.get("config"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid config: {exc}") from None
    return {**{k: None for k in _OPTIONAL}, **raw, "config": config}


def is_partial(payload: dict[str, Any]) -> bool:
    """Whether a :func:`read_checkpoint` payload stopped before its ``total_steps``."""
    total = payload.get("total_steps")
    return total is not None and payload["step"] < total


def describe_checkpoint(payload: dict[str, Any], path: str | Path) -> str:
    """One line saying what a checkpoint is: kind, step of total, profile, training data.

    Example: ``checkpoints/storm_cpu.pt: STORM, step 3000 of 3000, profile cpu, trained
    on ALE/Boxing-v5 (30000 steps, seed 0, sha256 3f2a9c1e0b7d4e55)``.
    """
    total = payload.get("total_steps")
    step = f"step {payload['step']} of {total}" if total else f"step {payload['step']}"
    if is_partial(payload):
        step += " (partial)"
    data = payload.get("data")
    trained_on = (
        f"trained on {data.get('env_id')} ({data.get('steps')} steps, seed {data.get('seed')}, "
        f"sha256 {data.get('sha256')})"
        if data
        else "training data not recorded"
    )
    kind = str(payload["model"]).upper()
    return f"{path}: {kind}, {step}, profile {payload['config'].name}, {trained_on}"


def is_own_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a readable file in this library's checkpoint format, i.e. one
    that our code wrote and may replace when asked. Unreadable or foreign files: False."""
    try:
        read_checkpoint(path, "cpu")
    except CheckpointError:
        return False
    return True


def load_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    *,
    kind: str | None = None,
    action_dim: int | None = None,
) -> WorldModel:
    """Rebuild the world model stored in ``path`` (either kind), in eval mode.

    Args:
        path: a file written by :func:`save_checkpoint`.
        device: where to put it (default: CUDA if available, else CPU).
        kind: if given, the file must hold this kind (``"storm"`` or ``"rssm"``).
        action_dim: if given, the model's action count must equal it (the dataset's).

    Raises:
        CheckpointError: for any unusable file, the wrong kind or action count.
    """
    device = default_device(device)
    payload = read_checkpoint(path, device)
    found = payload["model"]
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: holds a {found.upper()} model, expected {kind.upper()}")
    if action_dim is not None and payload["action_dim"] != action_dim:
        raise CheckpointError(
            f"{path}: the model has {payload['action_dim']} actions but the data has {action_dim}"
        )
    try:
        model = model_class(found)(payload["config"], payload["action_dim"])
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build the stored model: {exc}") from None
    load_state_strict(model, payload["state_dict"], str(path))
    return model.to(device).eval()
