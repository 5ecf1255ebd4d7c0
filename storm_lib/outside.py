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
:class:`DreamerAdapter` wraps an ``observe`` / ``img_step`` / ``decode`` RSSM (the
DreamerV3 vocabulary most P03 notebooks use) into the protocol in a few lines.

Glossary: B batch, T time, C context, H horizon, S image side, A actions.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import safe_torch_load
from .types import ImagineMode, Rollout
from .utils import default_device

Pixels = Literal["0-1", "0-255", "-0.5-0.5"]
RANGE_TOLERANCE = 1e-3
"""How far outside [0, 1] an output may stray (float rounding) before it is an error."""


class OutsideModelError(RuntimeError):
    """An outside model's code failed or returned something unusable; the message names
    its file and function, and ``__cause__`` keeps the student's own traceback."""


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
    return OutsideModel(model, source=source, action_dim=action_dim, image_size=image_size)


class OutsideModel:
    """Any model with the rollout protocol (see the module docstring), every output checked.

    Args:
        model: the student's object with ``imagine`` (and optionally ``reconstruct``).
        source: ``file.py:function`` that built it, named in every error.
        action_dim: A.
        image_size: S.

    Attributes:
        kind: ``"outside"``.
        max_length: the student's ``max_length`` if it has one, else None.
        reconstruct: present only when the student's model has ``reconstruct``.
    """

    kind = "outside"

    def __init__(self, model: Any, *, source: str, action_dim: int, image_size: int = 64) -> None:
        if not callable(getattr(model, "imagine", None)):
            raise OutsideModelError(
                f"{source}: returned a {type(model).__name__}, which has no imagine(context_obs, "
                "context_actions, future_actions) method; wrap it (e.g. with "
                "storm_lib.outside.DreamerAdapter)"
            )
        self.model, self.source = model, source
        self.action_dim, self.image_size = action_dim, image_size
        self.max_length = getattr(model, "max_length", None)
        self._takes_mode = "mode" in inspect.signature(model.imagine).parameters
        if callable(getattr(model, "reconstruct", None)):
            self.reconstruct = self._reconstruct

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
                f"{where} returned values in [{low:.3g}, {high:.3g}], expected [0, 1] "
                "(DreamerAdapter(pixels=...) converts other pixel ranges)"
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
        """The student's ``reconstruct(obs, actions)``, checked: ``[B, T, 3, S, S]``."""
        if action is None:
            action = torch.zeros(obs.shape[:2], dtype=torch.long, device=obs.device)
        with torch.no_grad():
            out = self._call("reconstruct", self.model.reconstruct, obs, action)
        return self._check_frames(out, obs, tuple(obs.shape), "reconstruct")


def _index_time(states: Any, t: int) -> Any:
    """Time step ``t`` of a ``[B, T, ...]`` state: a tensor, or a dict/tuple/list of them."""
    if isinstance(states, Tensor):
        return states[:, t]
    if isinstance(states, dict):
        return {k: _index_time(v, t) for k, v in states.items()}
    if isinstance(states, (tuple, list)):
        return type(states)(_index_time(v, t) for v in states)
    raise TypeError(
        f"cannot index time in a {type(states).__name__} state; give DreamerAdapter "
        "last_state= and reconstruct=False"
    )


class DreamerAdapter:
    """The rollout protocol for a DreamerV3-style RSSM: ``encode`` / ``observe`` /
    ``img_step`` / ``decode``.

    DreamerV3 code stores with each frame the action that *led to* it (``action[t]``
    came before ``obs[t]``, with ``is_first`` marking episode starts), while this
    library stores the action *taken in* it. The adapter converts: it observes the
    context with the previous actions (zero before the first frame), then steps the
    prior with the last context action and the future ones, and decodes each state.

    Args:
        encode: ``obs [B, T, ...] -> embed [B, T, E]``; frames arrive in ``pixels`` range
            and ``channels_last`` layout.
        observe: ``(embed [B, T, E], prev_action [B, T, A or -], is_first [B, T]) ->
            states`` (posteriors; a tensor, dict or tuple of ``[B, T, ...]`` tensors, or
            a tuple whose first item is that, as dreamerv3-torch's ``(post, prior)``).
        img_step: ``(state, action [B, A or -]) -> state``, one prior step.
        decode: ``state [B, ...] -> frame [B, 3, S, S]`` (or ``[B, S, S, 3]``) in
            ``pixels`` range.
        action_dim: A.
        pixels: the model's pixel range, ``"0-1"``, ``"0-255"`` or ``"-0.5-0.5"``.
        actions: ``"onehot"`` (float ``[.., A]``) or ``"index"`` (int64).
        channels_last: frames as ``[..., S, S, 3]`` instead of ``[..., 3, S, S]``.
        last_state: the last step of ``observe``'s states (default: index ``[:, -1]``).
        reconstruct: also offer ``reconstruct`` (observe, then decode every step).

    Example::

        def load(weights, device):
            model = MyRSSM(...); model.load_state_dict(weights); model.to(device).eval()
            return DreamerAdapter(encode=model.enc, observe=model.observe,
                                  img_step=model.img_step, decode=model.decode_state,
                                  action_dim=18, pixels="-0.5-0.5")
    """

    def __init__(
        self,
        *,
        encode: Callable[[Tensor], Tensor],
        observe: Callable[[Tensor, Tensor, Tensor], Any],
        img_step: Callable[[Any, Tensor], Any],
        decode: Callable[[Any], Tensor],
        action_dim: int,
        pixels: Pixels = "0-1",
        actions: Literal["onehot", "index"] = "onehot",
        channels_last: bool = False,
        last_state: Callable[[Any], Any] = lambda states: _index_time(states, -1),
        reconstruct: bool = True,
    ) -> None:
        if pixels not in ("0-1", "0-255", "-0.5-0.5"):
            raise ValueError(f"pixels must be '0-1', '0-255' or '-0.5-0.5', got {pixels!r}")
        if actions not in ("onehot", "index"):
            raise ValueError(f"actions must be 'onehot' or 'index', got {actions!r}")
        self.encode, self.observe, self.img_step, self.decode = encode, observe, img_step, decode
        self.action_dim, self.pixels, self.actions = action_dim, pixels, actions
        self.channels_last, self.last_state = channels_last, last_state
        if reconstruct:  # an attribute only when offered: evaluation looks for it
            self.reconstruct = self._decode_posteriors

    def _to_model(self, obs: Tensor) -> Tensor:
        x = {"0-1": obs, "0-255": obs * 255.0, "-0.5-0.5": obs - 0.5}[self.pixels]
        return x.movedim(-3, -1) if self.channels_last else x

    def _from_model(self, frame: Tensor) -> Tensor:
        x = frame.movedim(-1, -3) if self.channels_last else frame
        return {"0-1": x, "0-255": x / 255.0, "-0.5-0.5": x + 0.5}[self.pixels]

    def _act(self, action: Tensor) -> Tensor:
        if self.actions == "index":
            return action
        return F.one_hot(action, self.action_dim).float()

    def _observe(self, obs: Tensor, action: Tensor) -> Any:
        """Posterior states of frames ``obs [B, T, ...]`` whose actions (taken in them) are
        ``action [B, T]``: each frame is observed with the action before it."""
        prev = self._act(action)
        prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)
        is_first = torch.zeros(action.shape, dtype=torch.bool, device=action.device)
        is_first[:, 0] = True
        states = self.observe(self.encode(self._to_model(obs)), prev, is_first)
        if isinstance(states, tuple) and len(states) == 2 and not isinstance(states[0], Tensor):
            states = states[0]  # (post, prior), as dreamerv3-torch returns
        return states

    def imagine(
        self, context_obs: Tensor, context_actions: Tensor, future_actions: Tensor
    ) -> Tensor:
        """``[B, C, 3, S, S], [B, C], [B, H-1] -> [B, H, 3, S, S]`` in [0, 1]."""
        state = self.last_state(self._observe(context_obs, context_actions))
        frames = []
        for action in torch.cat([context_actions[:, -1:], future_actions], 1).unbind(1):
            state = self.img_step(state, self._act(action))
            frames.append(self._from_model(self.decode(state)))
        return torch.stack(frames, 1)

    def _decode_posteriors(self, obs: Tensor, action: Tensor) -> Tensor:
        """``reconstruct``: observe every frame and decode each posterior state,
        ``[B, T, 3, S, S]``."""
        states = self._observe(obs, action)
        frames = [self.decode(_index_time(states, t)) for t in range(obs.shape[1])]
        return self._from_model(torch.stack(frames, 1))
