"""``fit()``: the one training loop for every world model, and its ``History``.

The loop knows nothing about STORM or the RSSM: it calls ``model.loss(batch)``, clips,
steps Adam, validates on fixed held-out windows, and checkpoints. It records training
wall-clock with validation and checkpoint time excluded, so that Section 5 compares
the backbones' cost alone.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    is_own_checkpoint,
    load_state_strict,
    read_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import DataError, TrajectoryData
from .files import exclusive_lock
from .graphs import maybe_graphed
from .models import WorldModel
from .types import Batch
from .utils import (
    autocast,
    autocast_dtype,
    configure_device,
    default_device,
    evaluating,
    seed_everything,
    synchronize,
)  # fmt: skip


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or inputs that do not fit the model."""


@dataclass
class History:
    """What ``fit()`` recorded.

    ``train`` holds one dict per logged step and ``val`` one per validation, each with
    ``step``, ``time`` (training wall-clock seconds, validation excluded) and the
    model's metric names (``loss/total``, ``token_nll``, ...).
    """

    train: list[dict[str, float]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"train": list(self.train), "val": list(self.val)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> History:
        if not raw:
            return cls()
        return cls(train=list(raw.get("train", [])), val=list(raw.get("val", [])))

    @property
    def train_seconds(self) -> float:
        """Training wall-clock so far."""
        return self.train[-1]["time"] if self.train else 0.0


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG that training touches, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "sampler": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["sampler"].cpu())


class StepSnapshot:
    """What a training step changes before its optimizer step, taken at every step start:
    the RNGs (batch draw, latent samples, dropout) and the buffers (BatchNorm running
    statistics). Restored when a step is interrupted, so the saved state is that of the
    last completed step.

    Cheap, since it runs every step: the buffer copies are allocated once and refreshed
    with one ``torch._foreach_copy_`` (on CUDA a few fused kernels instead of one clone
    and one allocation per buffer), and the RNG states are kept in their native form (the
    weights_only form of :func:`_rng_state` is built only when a checkpoint is saved).
    """

    def __init__(self, model: Any, generator: torch.Generator) -> None:
        self.model, self.generator = model, generator
        self._live: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._rng: tuple[Any, ...] | None = None

    def take(self) -> None:
        """Record the state at the start of a step (no allocation after the first)."""
        live = list(self.model.buffers())
        same = len(live) == len(self._live) and all(
            a is b for a, b in zip(live, self._live, strict=True)
        )
        if not same:
            self._live = live  # first step, or the module's buffers were replaced
            self._saved = [torch.empty_like(b) for b in live]
        with torch.no_grad():
            _copy_all(self._saved, self._live)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._rng = (
            torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(),
            self.generator.get_state(),
        )  # fmt: skip

    def restore(self) -> None:
        """Put back what :meth:`take` recorded: as if the step never began."""
        if self._rng is None:
            raise RuntimeError("StepSnapshot.restore() before take()")
        with torch.no_grad():
            _copy_all(self._live, self._saved)
        cpu, cuda, np_state, py_state, sampler = self._rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        self.generator.set_state(sampler)


def _copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all ``i``, fused where this torch has ``_foreach_copy_``."""
    if not dst:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dst, src)
    else:  # pragma: no cover - every supported torch has it
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


@contextlib.contextmanager
def _interrupt_between_steps() -> Iterator[Callable[[], bool]]:
    """Hold a Ctrl-C (SIGINT) until the current training step has finished.

    Yields a function that tells whether one arrived; the loop then stops at a step
    boundary. A second Ctrl-C interrupts at once. Only the main thread can own signal
    handlers; elsewhere (and where SIGINT is ignored) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield lambda: False
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(pending)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_compatible(model: WorldModel, data: TrajectoryData, seq_len: int) -> None:
    """Raise TrainingError before any training if ``data`` cannot feed ``model``."""
    if data.action_dim != model.action_dim:
        raise TrainingError(
            f"the data has {data.action_dim} actions ({data.env_id}) "
            f"but the model was built for {model.action_dim}"
        )
    if len(data) and int(data.action.max()) >= model.action_dim:  # once, not every step
        raise TrainingError(
            f"the data has action {int(data.action.max())}, outside the model's "
            f"{model.action_dim} actions"
        )
    size = model.config.data.image_size
    if data.image_size != size:
        raise TrainingError(f"the data has {data.image_size}px frames, the model expects {size}px")
    if model.max_length is not None and seq_len > model.max_length:
        raise TrainingError(
            f"training windows of {seq_len} steps exceed the model's max_length {model.max_length}"
        )


@torch.no_grad()
def validate(
    model: WorldModel,
    batches: list[Batch],
    device: torch.device,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean metrics of ``model.loss`` over fixed ``batches`` in eval mode, under the same
    autocast ``dtype`` as training (None: fp32).

    The latent samples are drawn under a forked RNG seeded with ``seed``: validation is
    the same measurement every time, and it leaves the training RNG untouched (so a
    resumed run equals an uninterrupted one whatever the validation schedule).
    """
    totals: dict[str, float] = {}
    with evaluating(model, seed, device):
        for batch in batches:
            with autocast(device, dtype):
                _, metrics = model.loss(batch.to(device))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in totals.items()}


def make_optimizer(
    model: WorldModel, config: TrainConfig, device: torch.device
) -> torch.optim.Adam:
    """Adam with ``config.lr``; the fused kernel on CPU and CUDA (same update rule).

    The fused implementation updates all parameters in one kernel instead of a Python
    loop over every tensor. The state dicts have the same tensors, so checkpoints
    written by either resume with either. Other devices (and old torch) keep the default.
    """
    params = list(model.parameters())
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=config.lr, fused=True)
        except (RuntimeError, TypeError):  # fused Adam on CPU needs torch >= 2.4
            pass
    return torch.optim.Adam(params, lr=config.lr)


MIN_TORCH = (2, 3)
"""The oldest torch this library runs on: ``torch.amp.GradScaler(device_type)`` (the
fp16 loss scaling of T4 and V100 GPUs) exists from torch 2.3. requirements.txt,
pyproject.toml, the Makefile and the README say ``torch>=2.3``."""


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for ``device``, or a clear error on a torch without it.

    Raises:
        TrainingError: this torch is older than :data:`MIN_TORCH`.
    """
    scaler = getattr(torch.amp, "GradScaler", None)
    if scaler is None:
        need = ".".join(map(str, MIN_TORCH))
        raise TrainingError(
            f"storm_lib needs torch>={need} (torch.amp.GradScaler), but this is torch "
            f"{torch.__version__}: pip install 'torch>={need}'"
        )
    return scaler(device.type, enabled=enabled)


class TrainStep:
    """One training step exactly as :func:`fit` runs it, for ``fit`` and every timing.

    Autocast by ``config.precision`` (``utils.autocast_dtype``), loss scaling when that
    is fp16, the true (unscaled) gradients clipped at ``config.grad_clip``, then the
    fused Adam of :func:`make_optimizer`. ``backward`` and ``update`` are apart so that
    ``fit`` can undo an interrupted step before anything is applied; calling the object
    does both at ``config.lr``.
    """

    def __init__(self, model: WorldModel, config: TrainConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.dtype = autocast_dtype(config.precision, device)
        self.optimizer = make_optimizer(model, config, device)
        # fp16 needs loss scaling (its range is small); for bf16 and fp32 this is a no-op.
        self.scaler = grad_scaler(device, enabled=self.dtype == torch.float16)
        self._snapshot: StepSnapshot | None = None

    def fit_step(
        self,
        loss_fn: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]],
        data: TrajectoryData,
        generator: torch.Generator,
        lr: float,
        backward: Callable[..., tuple[Tensor, dict[str, Tensor], Tensor]] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One whole step as :func:`fit` runs it: snapshot the step's start
        (:class:`StepSnapshot`), draw ``config.batch_size`` windows of ``config.seq_len``
        steps from ``data`` with ``generator`` and move them to the device, backward and
        clip at ``lr``, update. Returns ``(loss, metrics, grad_norm)``, unread (no host
        sync). A ``KeyboardInterrupt`` before the update undoes the step's RNG draws and
        buffer updates first. :func:`storm_lib.costs.estimate_training_time` times this
        same call, so the estimate cannot drift from what ``fit`` does. ``backward``
        replaces :meth:`backward` (``graphs.GraphedTrainStep`` passes its graphed one).
        """
        if self._snapshot is None or self._snapshot.generator is not generator:
            self._snapshot = StepSnapshot(self.model, generator)
        snapshot = self._snapshot
        snapshot.take()
        try:
            batch = data.sample(self.config.batch_size, self.config.seq_len, generator, self.device)
            loss, metrics, grad_norm = (backward or self.backward)(loss_fn, batch, lr)
        except KeyboardInterrupt:
            snapshot.restore()  # as if the step never began
            raise
        self.update()  # the step is complete once this returns
        return loss, metrics, grad_norm

    def backward(
        self, loss_fn: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]], batch: Batch, lr: float
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Loss, gradients and clipping: ``(loss, metrics, grad_norm)``, nothing applied."""
        with autocast(self.device, self.dtype):
            loss, metrics = loss_fn(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, metrics, self.finish(lr)

    def finish(self, lr: float) -> Tensor:
        """After the backward pass: set ``lr``, unscale (fp16) and clip the gradients in
        place; the global gradient norm before clipping. (``graphs.py`` replays the backward
        as a CUDA graph and runs this eagerly.)"""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        params = self.model.parameters()
        return torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)

    def update(self) -> None:
        """Apply the step (skipped by the scaler if fp16 gradients overflowed)."""
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(
        self, loss_fn: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]], batch: Batch
    ) -> None:
        self.backward(loss_fn, batch, self.config.lr)
        self.update()


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of gradient step ``step`` (0-based) of a ``total_steps`` run.

    Linear warm-up over ``config.warmup_steps`` steps (step 0 uses ``lr / warmup``), then
    ``config.lr_schedule`` from ``lr`` down to ``lr * final_lr_fraction`` at the last
    step. A function of the step alone, so a resumed run follows the same schedule.
    """
    if config.lr_schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule must be constant, cosine or linear: {config.lr_schedule!r}")
    warmup = max(0, config.warmup_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    shape = (
        0.5 * (1.0 + math.cos(math.pi * progress))
        if config.lr_schedule == "cosine"
        else 1.0 - progress
    )
    low = config.final_lr_fraction
    return config.lr * (low + (1.0 - low) * shape)


def _first_non_finite(metrics: dict[str, Any]) -> str:
    for name, value in metrics.items():
        if not math.isfinite(float(value)):
            return f"{name} = {float(value)}"
    return "the total loss"


def _check_finite(unchecked: list[tuple[int, Tensor, dict[str, Tensor]]]) -> None:
    """Raise TrainingError naming the first step and term whose loss was not finite.

    ``fit`` collects each step's loss without looking at it (a look would stall an
    accelerator every step) and checks them together here, one host sync, every
    ``log_every`` steps and before anything is validated or saved.
    """
    if not unchecked:
        return
    finite = torch.isfinite(torch.stack([loss for _, loss, _ in unchecked]))
    if bool(finite.all()):
        unchecked.clear()
        return
    step, _, metrics = unchecked[int((~finite).nonzero()[0, 0])]
    raise TrainingError(
        f"non-finite loss at step {step}: {_first_non_finite(metrics)}; no weights were "
        "saved after it"
    )


def fit(
    model: WorldModel,
    train_data: TrajectoryData,
    val_data: TrajectoryData,
    *,
    steps: int,
    config: TrainConfig,
    device: torch.device | str | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> History:
    """Train ``model`` for ``steps`` gradient steps in total; return the History.

    Adam with ``config.lr`` (warm-up and decay by :func:`lr_at`, over ``steps``) and
    global-norm clipping at ``config.grad_clip`` (paper: 1e-4, constant, and 1000),
    autocast by ``config.precision`` (``utils.autocast_dtype``; fp16 with a GradScaler),
    validation on ``config.val_batches`` fixed windows of
    ``val_data`` every ``config.eval_every`` steps and at the end, a checkpoint every
    ``config.checkpoint_every`` steps and at the end. With ``config.compile`` the training
    loss runs through ``torch.compile`` (validation stays eager); compilation time counts
    as training time.

    A step makes no host sync and no blocking host-to-device copy: actions are checked
    once per dataset, constants such as the free-bits floor are kernel arguments, and the
    losses are checked for NaN/inf together every ``log_every`` steps and before any
    validation or save. So on a GPU the host enqueues the next step while the device still
    runs the last one. There the training frames are kept on the GPU when they fit, and
    batches are gathered there (``TrajectoryData.sample``); with ``config.cuda_graphs``
    (the default) the forward and backward replay one CUDA graph (``storm_lib.graphs``).
    Each says once which path it took.

    Args:
        model: any :class:`WorldModel` that is an ``nn.Module``.
        train_data: windows are sampled from it (never across episodes).
        val_data: held-out episodes for validation.
        steps: total gradient steps, counting those of a resumed checkpoint.
        config: batch size, sequence length, lr, clipping, intervals, seed.
        device: default CUDA if available.
        checkpoint_path: where to write checkpoints (None: no checkpoints). The file is
            locked for the run: a second training to the same path fails at once.
        resume: continue from ``checkpoint_path`` if it exists (optimizer, step, RNG
            and sampler states, history): see "Raises" for how exactly it equals an
            uninterrupted run.
        overwrite: replace an existing ``checkpoint_path`` instead of resuming it; only
            ever a checkpoint of this library's format, never a foreign file.
        progress: show a tqdm bar with the losses.
        log_every: steps between training-metric records.

    Raises:
        TrainingError: mismatched data and model (before any step), or a non-finite
            loss (naming the step and the term; the last good checkpoint is kept).
        DataError: a split has no episode as long as ``config.seq_len`` (before any step).
        CheckpointError: ``checkpoint_path`` exists and is not ours, or is ours and
            neither ``resume`` nor ``overwrite`` was given (before any step).
        FileBusyError: another process is training to ``checkpoint_path``.
        KeyboardInterrupt: after Ctrl-C, once the checkpoint of the last completed step
            is saved. A Ctrl-C is held until the running step ends; an exception raised
            inside a step (or a second Ctrl-C) undoes the step's RNG draws and BatchNorm
            updates first. Either way, resuming gives the uninterrupted run bit for bit on
            a CPU (at the same thread count), and on CUDA with ``config.deterministic``. On
            CUDA without it no two runs are bit-identical, interrupted or not (cuDNN
            autotuning picks kernels per process, and some backward kernels add with
            atomics in any order): the resumed run starts from exactly the saved state and
            then agrees with an uninterrupted one only as closely as two uninterrupted runs
            agree with each other.
    """
    device = default_device(device)
    check_compatible(model, train_data, config.seq_len)
    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None and path.exists() and not resume:  # resuming reads (and checks) it
        if not overwrite:
            raise CheckpointError(
                f"{path}: already holds a checkpoint; resume it, or ask to overwrite it"
            )
        if not is_own_checkpoint(path):
            raise CheckpointError(
                f"{path}: exists and is not a storm_lib checkpoint; it is never overwritten. "
                "Choose another checkpoint path."
            )
    with contextlib.ExitStack() as stack:
        if path is not None:
            stack.enter_context(exclusive_lock(path))
        return _fit_locked(
            model, train_data, val_data, steps=steps, config=config, device=device,
            path=path, resume=resume, progress=progress, log_every=log_every,
        )  # fmt: skip


def _fit_locked(
    model: WorldModel,
    train_data: TrajectoryData,
    val_data: TrajectoryData,
    *,
    steps: int,
    config: TrainConfig,
    device: torch.device,
    path: Path | None,
    resume: bool,
    progress: bool,
    log_every: int,
) -> History:
    """:func:`fit` once its arguments are checked and ``path`` is locked."""
    for role, data in (("training", train_data), ("validation", val_data)):
        try:  # fail before any step (and say which split) if no window fits an episode
            data.valid_starts(config.seq_len)
        except DataError as exc:
            raise DataError(f"{role} data: {exc} (train.seq_len = {config.seq_len})") from None
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    configure_device(device, config.deterministic)  # idempotent: the CLI and notebook set it first
    trainer = TrainStep(model, config, device)
    optimizer, scaler, dtype = trainer.optimizer, trainer.scaler, trainer.dtype
    history, step = History(), 0
    if resume and path is not None and path.exists():
        payload = read_checkpoint(path, device)
        if payload["model"] != model.kind:
            raise CheckpointError(f"{path}: holds a {payload['model']} model")
        load_state_strict(model, payload["state_dict"], str(path))
        if payload["optimizer"] is not None:
            optimizer.load_state_dict(payload["optimizer"])
        step, history = payload["step"], History.from_dict(payload["history"])
        if payload.get("train_state"):
            _set_rng_state(payload["train_state"], generator)
            if payload["train_state"].get("scaler"):
                scaler.load_state_dict(payload["train_state"]["scaler"])

    val_windows = val_data.eval_windows(config.val_batches * config.batch_size, config.seq_len, 0)
    val_batches = val_windows.chunks(config.batch_size)

    def checkpoint() -> None:
        if path is not None:
            save_checkpoint(
                path,
                model,
                optimizer=optimizer,
                step=step,
                total_steps=steps,
                history=history.to_dict(),
                train_state={**_rng_state(generator), "scaler": scaler.state_dict()},
                data=train_data.fingerprint,
            )

    # torch.compile wraps the bound method, not the module: state_dict keys stay unprefixed.
    loss_fn = torch.compile(model.loss) if config.compile else model.loss
    trainer = maybe_graphed(trainer, enabled=config.cuda_graphs, compiled=config.compile)
    model.train()
    clock = history.train_seconds
    label, head = model.kind, model.config.heads.dynamics_head
    if label == "storm" and head != "mlp":  # say which of compare-priors' two models this is
        label += f" ({head} prior)"
    bar = tqdm(
        total=steps,
        initial=step,
        disable=not progress,
        desc=f"train {label}",
        dynamic_ncols=True,
    )
    unchecked: list[tuple[int, Tensor, dict[str, Tensor]]] = []  # losses not yet looked at
    with _interrupt_between_steps() as interrupted:
        try:
            while step < steps:
                start = time.perf_counter()
                lr = lr_at(step, steps, config)
                # snapshot, batch, backward, update: the one step the estimate times too
                loss, metrics, grad_norm = trainer.fit_step(loss_fn, train_data, generator, lr)
                step += 1
                unchecked.append((step, loss.detach(), metrics))
                every = config.checkpoint_every
                log_due = step % log_every == 0 or step == steps
                eval_due = step % config.eval_every == 0 or step == steps
                save_due = step == steps or bool(every and step % every == 0)
                if log_due or eval_due or save_due:  # one host sync, not one per step
                    _check_finite(unchecked)
                if log_due:
                    synchronize(device)
                clock += time.perf_counter() - start
                if log_due:
                    record = {k: float(v) for k, v in metrics.items()}
                    record.update(step=step, time=clock, grad_norm=float(grad_norm), lr=lr)
                    history.train.append(record)
                    bar.set_postfix(
                        loss=f"{record['loss/total']:.1f}",
                        tok=f"{record.get('token_nll', float('nan')):.1f}",
                    )
                if eval_due:
                    record = validate(model, val_batches, device, config.seed, dtype)
                    record.update(step=step, time=clock)
                    history.val.append(record)
                if save_due:
                    checkpoint()
                bar.update(1)
                if interrupted() and step < steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            _check_finite(unchecked)  # never save weights that a non-finite loss touched
            checkpoint()
            where = f"saved to {path}; re-run to resume" if path else "not saved (no path)"
            print(f"Interrupted at step {step} of {steps} ({where}).", flush=True)
            raise
        finally:
            bar.close()
    model.eval()
    return history
