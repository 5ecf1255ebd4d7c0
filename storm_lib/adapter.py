"""``DreamerAdapter``: a DreamerV3-style RSSM behind the rollout protocol of ``storm_lib.outside``.

A student's P03 model usually speaks DreamerV3's vocabulary: ``encode`` frames, ``observe``
a sequence into posterior states, ``img_step`` the prior one step, ``decode`` a state. The
adapter turns those four hooks into ``imagine`` and ``reconstruct``, converting pixel
ranges, layouts, action encodings and the action convention. Each hook that fails is named
in the error with what it was given; a hook that takes a ``sample`` flag (dreamerv3-torch's
``img_step(prev_state, prev_action, sample=True)``) is given the evaluation's mode.

Glossary: B batch, T time, C context, H horizon, S image side, A actions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .types import ImagineMode

Pixels = Literal["0-1", "0-255", "-0.5-0.5"]
SAMPLE_FLAG = "sample"
"""The keyword by which a hook takes "sample (True) or argmax (False)"."""


class OutsideModelError(RuntimeError):
    """An outside model's code failed or returned something unusable; the message names
    its file and function (or the adapter's hook), and ``__cause__`` keeps the student's
    own traceback."""


def describe(value: Any) -> str:
    """A short account of a hook's argument: ``[2, 8, 64, 64, 3] float32``, dicts by key."""
    if isinstance(value, Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def takes_keyword(fn: Callable[..., Any], keyword: str) -> bool:
    """Whether ``fn`` accepts ``keyword`` (e.g. :data:`SAMPLE_FLAG`, or ``mode``)."""
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


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


class ClipStats:
    """How far the decoded frames strayed outside [0, 1] before ``clip=True`` clamped them.

    Counted on the device, without a host sync per frame; read the numbers at the end.

    Attributes:
        values: pixel values seen.
        clipped: of those, outside [0, 1].
        low, high: the smallest and largest raw value seen.
    """

    def __init__(self) -> None:
        self._values = 0
        self._clipped: Tensor | None = None
        self._low: Tensor | None = None
        self._high: Tensor | None = None

    def update(self, frames: Tensor) -> None:
        """Count the raw ``frames`` (any shape)."""
        out = ((frames < 0) | (frames > 1)).sum()
        low, high = frames.detach().amin(), frames.detach().amax()
        self._values += frames.numel()
        if self._clipped is None:
            self._clipped, self._low, self._high = out, low, high
        else:
            self._clipped = self._clipped + out
            self._low, self._high = torch.minimum(self._low, low), torch.maximum(self._high, high)

    @property
    def values(self) -> int:
        return self._values

    @property
    def clipped(self) -> int:
        return 0 if self._clipped is None else int(self._clipped)

    @property
    def low(self) -> float:
        return float("nan") if self._low is None else float(self._low)

    @property
    def high(self) -> float:
        return float("nan") if self._high is None else float(self._high)

    @property
    def share(self) -> float:
        """Fraction of the values that were clipped (0 before any frame)."""
        return self.clipped / self._values if self._values else 0.0

    def __str__(self) -> str:
        if not self._values:
            return "no frames decoded yet"
        return (
            f"clip=True clipped {100 * self.share:.2f}% of {self._values} decoded pixel values "
            f"to [0, 1]; the raw frames spanned [{self.low:.3g}, {self.high:.3g}]"
        )


class DreamerAdapter:
    """The rollout protocol for a DreamerV3-style RSSM: ``encode`` / ``observe`` /
    ``img_step`` / ``decode``.

    DreamerV3 code stores with each frame the action that *led to* it (``action[t]``
    came before ``obs[t]``, with ``is_first`` marking episode starts), while this
    library stores the action *taken in* it. The adapter converts: it observes the
    context with the previous actions (zero before the first frame), then steps the
    prior with the last context action and the future ones, and decodes each state.

    The mode: a hook that takes ``sample=`` gets ``sample=False`` for the argmax rollout
    (``mode="mode"``) and ``sample=True`` for the sampled one; ``observe`` likewise for
    the context's posteriors and the reconstruction ceiling. ``follows_mode`` is True
    when ``img_step`` takes it (the rollout's prior is what the mode is about); without
    it, both of Section 4's modes see the same rollout, and the report says so.

    Args:
        encode: ``obs [B, T, ...] -> embed [B, T, E]``; frames arrive in ``pixels`` range
            and ``channels_last`` layout, as a fresh tensor (an encoder may change it in
            place, as dreamerv3-torch's does).
        observe: ``(embed [B, T, E], prev_action [B, T, A or -], is_first [B, T][,
            sample=]) -> states`` (posteriors; a tensor, dict or tuple of ``[B, T, ...]``
            tensors, or a tuple whose first item is that, as dreamerv3-torch's
            ``(post, prior)``).
        img_step: ``(state, action [B, A or -][, sample=]) -> state``, one prior step.
        decode: ``state [B, ...] -> frame [B, 3, S, S]`` (or ``[B, S, S, 3]``) in
            ``pixels`` range.
        action_dim: A.
        pixels: the model's pixel range, ``"0-1"``, ``"0-255"`` or ``"-0.5-0.5"``.
        actions: ``"onehot"`` (float ``[.., A]``) or ``"index"`` (int64).
        channels_last: frames as ``[..., S, S, 3]`` instead of ``[..., 3, S, S]``.
        last_state: the last step of ``observe``'s states (default: index ``[:, -1]``).
        reconstruct: also offer ``reconstruct`` (observe, then decode every step).
        clip: clamp decoded frames to [0, 1] (for an unbounded decoder, e.g. an MSE one)
            and count how far out they were in :attr:`clip_stats`.
        image_size: S the model was built for, checked against the data when known.
        trained_on: what the model was trained on, as ``TrajectoryData.fingerprint``
            names it (``env_id``, ``image_size``, ``action_meanings``, ``sha256``; any
            subset), checked against the evaluation data.
        module: the student's ``nn.Module``, for ``eval``/``train``/``parameters``.

    Attributes:
        follows_mode: whether the argmax and sampled rollouts differ in kind.
        clip_stats: :class:`ClipStats` (with ``clip=True``), else None.

    Example::

        def load(weights, device):
            model = MyRSSM(...); model.load_state_dict(weights); model.to(device).eval()
            return DreamerAdapter(encode=model.enc, observe=model.observe,
                                  img_step=model.img_step, decode=model.decode_state,
                                  action_dim=18, pixels="-0.5-0.5", module=model)
    """

    def __init__(
        self,
        *,
        encode: Callable[[Tensor], Tensor],
        observe: Callable[..., Any],
        img_step: Callable[..., Any],
        decode: Callable[[Any], Tensor],
        action_dim: int,
        pixels: Pixels = "0-1",
        actions: Literal["onehot", "index"] = "onehot",
        channels_last: bool = False,
        last_state: Callable[[Any], Any] = lambda states: _index_time(states, -1),
        reconstruct: bool = True,
        clip: bool = False,
        image_size: int | None = None,
        trained_on: dict[str, Any] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        if pixels not in ("0-1", "0-255", "-0.5-0.5"):
            raise ValueError(f"pixels must be '0-1', '0-255' or '-0.5-0.5', got {pixels!r}")
        if actions not in ("onehot", "index"):
            raise ValueError(f"actions must be 'onehot' or 'index', got {actions!r}")
        self.encode, self.observe, self.img_step, self.decode = encode, observe, img_step, decode
        self.action_dim, self.pixels, self.actions = action_dim, pixels, actions
        self.channels_last, self.last_state = channels_last, last_state
        self.image_size, self.trained_on, self.module = image_size, trained_on, module
        self._flagged = {
            name for name, fn in (("observe", observe), ("img_step", img_step))
            if takes_keyword(fn, SAMPLE_FLAG)
        }  # fmt: skip
        self.follows_mode = "img_step" in self._flagged
        self.clip_stats = ClipStats() if clip else None
        if reconstruct:  # an attribute only when offered: evaluation looks for it
            self.reconstruct = self._decode_posteriors

    # ------------------------------------------------------------ nn.Module-like
    @property
    def training(self) -> bool:
        return bool(self.module is not None and self.module.training)

    def eval(self) -> DreamerAdapter:
        if self.module is not None:
            self.module.eval()
        return self

    def train(self, mode: bool = True) -> DreamerAdapter:
        if self.module is not None:
            self.module.train(mode)
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(()) if self.module is None else self.module.parameters()

    # ------------------------------------------------------------ hooks
    def _hook(self, name: str, fn: Callable[..., Any], *args: Any, sample: bool) -> Any:
        """Call hook ``name``; a failure names it and what it was given."""
        kwargs = {SAMPLE_FLAG: sample} if name in self._flagged else {}
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            given = ", ".join(describe(a) for a in args)
            hint = {
                "encode": " (an encoder that takes a dict, as dreamerv3-torch's MultiEncoder "
                "does, needs encode=lambda x: encoder({'image': x}))",
                "decode": " (a decoder of [B, T, F] features, as dreamerv3-torch's "
                "MultiDecoder, needs a time axis: decoder(feat[:, None])['image'].mode()[:, 0])",
            }.get(name, "")
            raise OutsideModelError(
                f"DreamerAdapter: its {name} hook raised {type(exc).__name__}: {exc}; it was "
                f"given {given}{hint}"
            ) from exc

    def _to_model(self, obs: Tensor) -> Tensor:
        x = {"0-1": obs, "0-255": obs * 255.0, "-0.5-0.5": obs - 0.5}[self.pixels]
        x = x.movedim(-3, -1) if self.channels_last else x
        return x.clone(memory_format=torch.contiguous_format)  # never the caller's frames

    def _from_model(self, frame: Tensor) -> Tensor:
        x = frame.movedim(-1, -3) if self.channels_last else frame
        return {"0-1": x, "0-255": x / 255.0, "-0.5-0.5": x + 0.5}[self.pixels]

    def _act(self, action: Tensor) -> Tensor:
        if self.actions == "index":
            return action
        return F.one_hot(action, self.action_dim).float()

    def _decode(self, state: Any, batch: int) -> Tensor:
        """``decode`` one step's state -> ``[B, 3, S, S]`` in [0, 1] (clamped with clip)."""
        out = self._hook("decode", self.decode, state, sample=False)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != batch:
            got = describe(out)
            layout = "[B, S, S, 3]" if self.channels_last else "[B, 3, S, S]"
            raise OutsideModelError(
                f"DreamerAdapter: its decode hook returned {got}, expected frames {layout} "
                f"with B = {batch} (from a state {describe(state)})"
            )
        frame = self._from_model(out)
        if self.clip_stats is not None:
            self.clip_stats.update(frame)
            frame = frame.clamp(0.0, 1.0)
        return frame

    def _observe(self, obs: Tensor, action: Tensor, sample: bool) -> Any:
        """Posterior states of frames ``obs [B, T, ...]`` whose actions (taken in them) are
        ``action [B, T]``: each frame is observed with the action before it."""
        prev = self._act(action)
        prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)
        is_first = torch.zeros(action.shape, dtype=torch.bool, device=action.device)
        is_first[:, 0] = True
        embed = self._hook("encode", self.encode, self._to_model(obs), sample=sample)
        states = self._hook("observe", self.observe, embed, prev, is_first, sample=sample)
        if isinstance(states, tuple) and len(states) == 2 and not isinstance(states[0], Tensor):
            states = states[0]  # (post, prior), as dreamerv3-torch returns
        return states

    def imagine(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
    ) -> Tensor:
        """``[B, C, 3, S, S], [B, C], [B, H-1] -> [B, H, 3, S, S]`` in [0, 1].

        ``mode`` goes to the hooks that take ``sample=`` (``"mode"``: ``sample=False``).
        """
        sample = mode == "sample"
        states = self._observe(context_obs, context_actions, sample)
        state = self._hook("last_state", self.last_state, states, sample=sample)
        frames = []
        for action in torch.cat([context_actions[:, -1:], future_actions], 1).unbind(1):
            state = self._hook("img_step", self.img_step, state, self._act(action), sample=sample)
            frames.append(self._decode(state, context_obs.shape[0]))
        return torch.stack(frames, 1)

    def _decode_posteriors(
        self, obs: Tensor, action: Tensor, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """``reconstruct``: observe every frame (posterior argmax or sample, where
        ``observe`` takes ``sample=``) and decode each state, ``[B, T, 3, S, S]``."""
        states = self._observe(obs, action, mode == "sample")
        frames = [self._decode(_index_time(states, t), obs.shape[0]) for t in range(obs.shape[1])]
        return torch.stack(frames, 1)
