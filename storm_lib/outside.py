"""Outside world models: a student's own P03 code and weights behind the rollout protocol.

Section 4 and ``python -m storm_lib evaluate`` score any model that offers::

    imagine(context_obs [B, C, 3, S, S] float in [0, 1], context_actions [B, C] int64,
            future_actions [B, H-1] int64) -> frames [B, H, 3, S, S] float in [0, 1]
    reconstruct(obs [B, T, 3, S, S], actions [B, T]) -> frames [B, T, 3, S, S]   # optional

with the Batch convention: ``context_actions[:, t]`` is the action taken in context frame
t, so imagined frame 1 follows ``context_actions[:, -1]`` and frame k + 1 follows
``future_actions[:, k - 1]``. Without ``reconstruct`` the model is scored without a
ceiling. A model whose ``imagine`` also takes ``mode=`` ("mode" argmax, "sample") is
given it; otherwise both of Section 4's modes see its own rollout.

:func:`load_outside_model` imports the student's file and calls its loader
``load(weights, device)``, where ``weights`` is what ``torch.load(path,
weights_only=True)`` read: **importing the student's code runs it**, by design (only
the weights file is loaded without code execution). :class:`OutsideModel` validates
every output and names the student's file and function in every error.
:class:`DreamerAdapter` (``storm_lib.adapter``) wraps an ``observe`` / ``img_step`` /
``decode`` RSSM (the DreamerV3 vocabulary most P03 notebooks use) into the protocol in a
few lines; :func:`dreamerv3_torch` (``storm_lib.presets``) builds and wraps a model of
NM512/dreamerv3-torch from the student's checkout in one call; :func:`unwrap_weights`
(``storm_lib.checkpoint``) turns weights as students save them into a plain state dict.

Glossary: B batch, T time, C context, H horizon, S image side, A actions.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapter import ClipStats, DreamerAdapter, OutsideModelError, Pixels, takes_keyword
from .checkpoint import UnwrappedWeights, safe_torch_load, unwrap_weights
from .presets import dreamerv3_torch
from .types import ImagineMode, Rollout
from .utils import default_device

__all__ = [
    "ClipStats",
    "DreamerAdapter",
    "OutsideModel",
    "OutsideModelError",
    "Pixels",
    "UnwrappedWeights",
    "dreamerv3_torch",
    "load_outside_model",
    "outside_label",
    "unwrap_weights",
]

RANGE_TOLERANCE = 1e-3
"""How far outside [0, 1] an output may stray (float rounding) before it is an error."""


def outside_label(code: str | None, name: str | None = None) -> str:
    """The name a student's model goes by in tables, figures and sentences: ``name``
    when given, else the stem of the loader file in ``code`` (``alice_p03.py:load`` ->
    ``alice_p03``), else ``"RSSM"`` (our own loader)."""
    if name:
        return name
    if code:
        return Path(code.rpartition(":")[0] or code).stem or "RSSM"
    return "RSSM"


def _import_file(path: Path, source: str) -> Any:
    """Import a ``.py`` file as a fresh module (this runs its code)."""
    if not path.is_file():
        raise OutsideModelError(f"{source}: no such file {path}")
    name = f"storm_lib_outside_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OutsideModelError(f"{source}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise OutsideModelError(
            f"{source}: importing it raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def load_outside_model(
    code: str,
    weights: str | Path,
    device: torch.device | str | None = None,
    *,
    action_dim: int,
    image_size: int = 64,
) -> OutsideModel:
    """Build a student's model with their own code and weights.

    Args:
        code: ``path/to/p03_model.py:load``: a file and the function in it that builds
            the model, ``load(weights, device) -> model``. **Its code runs.**
        weights: the weights file, read with ``torch.load(weights_only=True)`` and
            passed to ``load`` as it is (typically a state dict).
        device: where the model should run.
        action_dim: A, the data's action count.
        image_size: S, the frame side the evaluation uses.

    Raises:
        CheckpointError: the weights file is unreadable, foreign or malicious.
        OutsideModelError: the file, the function or its result cannot be used.
    """
    device = default_device(device)
    file, sep, func = code.rpartition(":")
    if not sep or not file or not func.isidentifier():
        raise OutsideModelError(f"{code!r}: give the code as path/to/file.py:function")
    source = f"{file}:{func}"
    module = _import_file(Path(file), source)
    loader = getattr(module, func, None)
    if not callable(loader):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise OutsideModelError(f"{source}: {file} has no function {func!r} (it has {found})")
    state = safe_torch_load(weights, device)
    try:
        model = loader(state, device)
    except Exception as exc:
        raise OutsideModelError(
            f"{source}(weights, device) raised {type(exc).__name__}: {exc}"
        ) from exc
    recorded = state.get("data") if isinstance(state, dict) else None
    outside = OutsideModel(
        model, source=source, action_dim=action_dim, image_size=image_size, device=device,
        trained_on=recorded if isinstance(recorded, dict) else None,
    )  # fmt: skip
    outside.check_pairing()
    return outside


class OutsideModel:
    """Any model with the rollout protocol (see the module docstring), every output checked.

    Args:
        model: the student's object with ``imagine`` (and optionally ``reconstruct``).
        source: ``file.py:function`` that built it, named in every error.
        action_dim: A, the data's.
        image_size: S, the data's.
        device: where its loader was asked to put it (default: its first parameter's
            device, else CPU).
        trained_on: a record of its training data (``TrajectoryData.fingerprint``'s
            names, any subset), when its weights file holds one; else the student's
            object's own ``trained_on``, if any.

    Attributes:
        kind: ``"outside"``.
        device: as above (evaluation looks a model's device up here).
        max_length: the student's ``max_length`` if it has one, else None.
        follows_mode: its ``imagine`` takes ``mode`` (and, for a :class:`DreamerAdapter`,
            hands it on): else both of Section 4's modes see the same rollout.
        trained_on: as above, or None.
        clip_stats: the student's adapter's :class:`ClipStats` (``clip=True``), or None.
        reconstruct: present only when the student's model has ``reconstruct``.
    """

    kind = "outside"

    def __init__(
        self,
        model: Any,
        *,
        source: str,
        action_dim: int,
        image_size: int = 64,
        device: torch.device | str | None = None,
        trained_on: dict[str, Any] | None = None,
    ) -> None:
        if not callable(getattr(model, "imagine", None)):
            raise OutsideModelError(
                f"{source}: returned a {type(model).__name__}, which has no imagine(context_obs, "
                "context_actions, future_actions) method; wrap it (e.g. with "
                "storm_lib.outside.DreamerAdapter)"
            )
        self.model, self.source = model, source
        self.action_dim, self.image_size = action_dim, image_size
        if device is None:
            device = next(iter(self.parameters()), torch.empty(0)).device
        self.device = torch.device(device)
        self.max_length = getattr(model, "max_length", None)
        self._takes_mode = takes_keyword(model.imagine, "mode")
        self.follows_mode = self._takes_mode and bool(getattr(model, "follows_mode", True))
        self.trained_on = trained_on or getattr(model, "trained_on", None)
        self.clip_stats: ClipStats | None = getattr(model, "clip_stats", None)
        if callable(getattr(model, "reconstruct", None)):
            self.reconstruct = self._reconstruct

    def check_pairing(self) -> list[str]:
        """Check what the student's model says of itself against the data: its
        ``action_dim`` and ``image_size`` where it has them (a mismatch is an
        ``OutsideModelError``: another game, action set or frame size). Returns what was
        checked, in words (the training-data record is checked by the caller against the
        data file, as for our checkpoints)."""
        checked = []
        for attr, want, what in (
            ("action_dim", self.action_dim, "actions"),
            ("image_size", self.image_size, "px frames"),
        ):
            theirs = getattr(self.model, attr, None)
            if theirs is None:
                continue
            if int(theirs) != int(want):
                raise OutsideModelError(
                    f"{self.source}: its model has {attr} {theirs} but the evaluation data has "
                    f"{want} {what}: it was trained on another game, action set or frame "
                    "size, so its scores would be meaningless"
                )
            checked.append(f"{want} {what}")
        return checked

    def __repr__(self) -> str:
        return f"OutsideModel({self.source})"

    def eval(self) -> OutsideModel:
        if callable(getattr(self.model, "eval", None)):
            self.model.eval()
        return self

    @property
    def training(self) -> bool:
        return bool(getattr(self.model, "training", False))

    def train(self, mode: bool = True) -> OutsideModel:
        if callable(getattr(self.model, "train", None)):
            self.model.train(mode)
        return self

    def parameters(self) -> Any:
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise OutsideModelError(
                f"{self.source}: its model's {what}() raised {type(exc).__name__}: {exc}"
            ) from exc

    def _check_frames(self, out: Any, like: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
        """Every way an output can be unusable is an error naming the student's function."""
        where = f"{self.source}: its model's {what}()"
        if isinstance(out, Rollout):
            out = out.obs
        if not isinstance(out, Tensor):
            raise OutsideModelError(f"{where} returned a {type(out).__name__}, not a tensor")
        if tuple(out.shape) != shape:
            raise OutsideModelError(
                f"{where} returned shape {tuple(out.shape)}, expected {shape} [B, steps, 3, S, S]"
            )
        if not out.is_floating_point():
            raise OutsideModelError(f"{where} returned dtype {out.dtype}, expected a float dtype")
        if out.device != like.device:
            raise OutsideModelError(
                f"{where} returned frames on {out.device}, but its inputs were on {like.device}"
            )
        if not torch.isfinite(out).all():
            raise OutsideModelError(f"{where} returned non-finite values (NaN or inf)")
        low, high = float(out.min()), float(out.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise OutsideModelError(
                f"{where} returned values in [{low:.3g}, {high:.3g}], expected [0, 1]. An "
                "unbounded decoder (e.g. an MSE one) needs DreamerAdapter(clip=True), which "
                "also reports how far out it was; frames in another range need "
                "DreamerAdapter(pixels=...)"
            )
        return out.float().clamp(0.0, 1.0)

    def imagine(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
    ) -> Rollout:
        """The student's rollout, checked. ``reward`` and ``cont`` are NaN: the protocol
        does not ask for them.

        Shapes:
            ``[B, C, 3, S, S], [B, C], [B, H-1]`` -> ``obs [B, H, 3, S, S]``.
        """
        kwargs = {"mode": mode} if self._takes_mode else {}
        with torch.no_grad():
            out = self._call(
                "imagine", self.model.imagine, context_obs, context_actions, future_actions,
                **kwargs,
            )  # fmt: skip
        b, h = future_actions.shape[0], future_actions.shape[1] + 1
        s = self.image_size
        frames = self._check_frames(out, context_obs, (b, h, 3, s, s), "imagine")
        nan = torch.full((b, h), float("nan"), device=frames.device)
        return Rollout(obs=frames, reward=nan, cont=nan)

    def _reconstruct(
        self, obs: Tensor, action: Tensor | None = None, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """The student's ``reconstruct(obs, actions)``, checked: ``[B, T, 3, S, S]``;
        ``mode`` is handed on when it takes one."""
        if action is None:
            action = torch.zeros(obs.shape[:2], dtype=torch.long, device=obs.device)
        kwargs = {"mode": mode} if takes_keyword(self.model.reconstruct, "mode") else {}
        with torch.no_grad():
            out = self._call("reconstruct", self.model.reconstruct, obs, action, **kwargs)
        return self._check_frames(out, obs, tuple(obs.shape), "reconstruct")
