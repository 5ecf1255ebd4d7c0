"""The training step as one CUDA graph: captured once, replayed every step (``fit()``).

Why: eager PyTorch launches every op from Python. The RSSM's GRU is stepped T times in
Python, so its training step is thousands of small kernels, and on a GPU the host's launch
time, not arithmetic, sets the step time (``bench/bench_launches.py`` counts them). A CUDA
graph records the kernels once and replays the whole recording with one launch.

What is captured: exactly the first half of :meth:`storm_lib.train.TrainStep.backward`,
on fixed input tensors: the autocast forward of the loss, loss scaling and the backward
pass. What stays eager, after each replay: the learning rate, unscaling (fp16),
clipping, the fused Adam step and the GradScaler update (:meth:`TrainStep.finish` and
:meth:`TrainStep.update`, a handful of launches). So ``fit``'s separation of computing a
step from applying it (an interrupted step is undone before anything is applied) holds
unchanged, and fp16 with its GradScaler can be graphed as well as bf16 and fp32.

Each step copies the batch into the graph's input tensors, replays, and returns a copy
of the loss and metrics (``fit`` keeps several steps' losses before it looks at them).
The gradients live in the graph's memory: after the capture nothing may set them to
None (the graphed step never does; ``TrainStep.backward`` would, so the two are never
mixed on one model).

Safety: the first step is computed eagerly and by the graph from the same state (RNG
and BatchNorm buffers restored in between); the graph is used only when the two agree.
Any exception while warming up, capturing or checking, or a disagreement, runs the plain
step instead from then on and says so once. Not graphed at all: CPU (no launch cost worth
a graph) and ``train.compile``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from .types import Batch

LossFn = Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]

WARMUP_STEPS = 2
"""Eager forward/backward passes on a side stream before the capture: CUDA graphs need
lazy initialisations (cuBLAS handles, cuDNN autotuning, autograd's streams) done first."""

CHECK_RTOL = 1e-2
"""Relative tolerance of the start-up check (loss and gradient norm, eager vs graph).
The two run the same kernels on the same random numbers; the tolerance allows a few
categorical samples to flip on rounding, and still catches a graph that reads stale
inputs or writes nowhere."""


class GraphUnusable(RuntimeError):
    """The captured step disagreed with the eager step, or could not be captured."""


class Recorder(Protocol):
    """How a step is recorded and replayed: CUDA graphs, or an eager stand-in in tests."""

    def warmup(self, fn: Callable[[], None]) -> None: ...
    def capture(self, fn: Callable[[], None]) -> Callable[[], None]: ...


class CudaGraphRecorder:
    """:class:`Recorder` with ``torch.cuda.CUDAGraph`` (warm-up on a side stream, as the
    PyTorch documentation prescribes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def warmup(self, fn: Callable[[], None]) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread (a progress bar, a notebook widget)
        # does not invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        return graph.replay


class EagerRecorder:
    """:class:`Recorder` stand-in that runs the step eagerly each time, for tests and op
    counts on a CPU. Like a graph's replay, its replay overwrites the gradients in
    place (zeroed first, then accumulated into) instead of replacing them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def warmup(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        fn()  # as a capture does, this allocates the gradients that replays write

        def replay() -> None:
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.zero_()
            fn()

        return replay


@dataclass
class _StepState:
    """What the forward pass changes: the RNGs (latent samples, dropout) and the buffers
    (BatchNorm statistics). Warm-up and checks restore it, so the run equals eager."""

    cpu_rng: Tensor
    cuda_rng: Tensor | None
    buffers: list[Tensor]

    @classmethod
    def take(cls, model: torch.nn.Module, device: torch.device) -> _StepState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        buffers = [b.detach().clone() for b in model.buffers()]
        return cls(torch.get_rng_state(), cuda, buffers)

    def restore(self, model: torch.nn.Module, device: torch.device) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), self.buffers, strict=True):
                buffer.copy_(saved)


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))


class GraphedTrainStep:
    """A :class:`storm_lib.train.TrainStep` whose forward and backward replay a CUDA graph.

    The same interface as ``TrainStep`` (``backward(loss_fn, batch, lr)``, ``update()``,
    ``fit_step(...)``, ``model``, ``optimizer``, ``scaler``, ``dtype``), the same results.
    Built lazily: the first ``backward`` call warms up, captures and checks on its batch;
    every later batch must have that batch's shapes and dtypes.

    Args:
        trainer: the plain step (its optimizer, scaler and precision are used).
        recorder: how to record the step (default :class:`CudaGraphRecorder`).
        log: where the one line about the outcome goes (default ``print``).

    Attributes:
        active: True once the graph is captured and checked; False before, and for good
            after a failure (then every step is the plain ``trainer``'s).
        message: that one line, once known.
    """

    def __init__(
        self,
        trainer: Any,
        *,
        recorder: Recorder | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.trainer = trainer
        self.model, self.config, self.device = trainer.model, trainer.config, trainer.device
        self.optimizer, self.scaler, self.dtype = trainer.optimizer, trainer.scaler, trainer.dtype
        self.recorder = recorder if recorder is not None else CudaGraphRecorder(self.device)
        self.log = log if log is not None else (lambda line: print(line, flush=True))
        self.active, self.failed, self.message = False, False, ""
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._replay: Callable[[], None] | None = None
        self._inputs: Batch | None = None
        self._outputs: Tensor | None = None  # [1 + metrics]: loss, then each metric, fp32
        self._names: list[str] = []
        self._grads: list[Tensor | None] = []

    # ------------------------------------------------------------------ the step
    def backward(self, loss_fn: LossFn, batch: Batch, lr: float) -> tuple[Tensor, dict, Tensor]:
        """Loss, gradients and clipping: ``(loss, metrics, grad_norm)``, nothing applied."""
        if self.failed:
            return self.trainer.backward(loss_fn, batch, lr)
        if self._replay is None:
            if not self._build(loss_fn, batch):
                return self.trainer.backward(loss_fn, batch, lr)
        else:
            self._copy_in(batch)
            self._replay()
            self._keep_grads()
        assert self._outputs is not None
        values = self._outputs.clone()  # the next replay overwrites the graph's outputs
        metrics = dict(zip(self._names, values[1:].unbind(), strict=True))
        return values[0], metrics, self.trainer.finish(lr)

    def update(self) -> None:
        """Apply the step (:meth:`TrainStep.update`)."""
        self.trainer.update()

    def fit_step(
        self, loss_fn: LossFn, data: Any, generator: torch.Generator, lr: float
    ) -> tuple[Tensor, dict, Tensor]:
        """:meth:`TrainStep.fit_step` (snapshot, batch, backward, update) with the graphed
        :meth:`backward`."""
        return self.trainer.fit_step(loss_fn, data, generator, lr, backward=self.backward)

    # ------------------------------------------------------------------ capture
    def _forward_backward(self, loss_fn: LossFn) -> None:
        """The captured part: autocast forward on the input tensors, scaled backward,
        the outputs packed into one fp32 tensor."""
        assert self._inputs is not None
        # The autocast cache must be off in a graph: PyTorch's CUDA-graph documentation
        # requires it (the cache's casts would not be part of the recording).
        cast = (
            contextlib.nullcontext()
            if self.dtype is None
            else torch.autocast(self.device.type, self.dtype, cache_enabled=False)
        )
        with cast:
            loss, metrics = loss_fn(self._inputs)
        self.scaler.scale(loss).backward()
        self._names = list(metrics)
        self._outputs = torch.stack([loss.detach().float(), *(m.float() for m in metrics.values())])

    def _build(self, loss_fn: LossFn, batch: Batch) -> bool:
        """Warm up, capture and check on ``batch``; leaves this batch's forward/backward
        done (by the graph) and returns True, or restores the start state, says why
        and returns False."""
        started = time.perf_counter()
        start = _StepState.take(self.model, self.device)
        self._inputs = Batch(*(getattr(batch, f.name).clone() for f in fields(Batch)))
        try:
            for _ in range(WARMUP_STEPS):  # the last one is the eager reference
                start.restore(self.model, self.device)
                self.optimizer.zero_grad(set_to_none=True)
                self.recorder.warmup(lambda: self._forward_backward(loss_fn))
            assert self._outputs is not None
            eager_loss, eager_norm = self._outputs.clone(), _grad_norm(self._params)
            start.restore(self.model, self.device)
            self.optimizer.zero_grad(set_to_none=True)  # the capture allocates the grads
            self._replay = self.recorder.capture(lambda: self._forward_backward(loss_fn))
            self._grads = [p.grad for p in self._params]
            start.restore(self.model, self.device)  # the step from the same state, by replay
            self._replay()
            self._check(eager_loss, eager_norm)
        except Exception as exc:  # any failure of capture or check: the plain step is correct
            start.restore(self.model, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            self._replay, self._inputs, self._outputs, self._grads = None, None, None, []
            self.failed = True
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.message = f"cuda graphs: not used ({reason}); the plain training step runs"
            self.log(self.message)
            return False
        self.active = True
        seconds = time.perf_counter() - started
        self.message = (
            f"cuda graphs: the training step's forward and backward replay one CUDA graph "
            f"(captured and checked against the eager step in {seconds:.1f} s)"
        )
        self.log(self.message)
        return True

    def _check(self, eager_loss: Tensor, eager_norm: Tensor) -> None:
        """Raise :class:`GraphUnusable` unless the replay's loss, metrics and gradient
        norm match the eager reference (one host sync, once)."""
        assert self._outputs is not None
        graph_norm = _grad_norm(self._params)
        pairs = {"loss and metrics": (self._outputs, eager_loss), "gradient norm": (
            graph_norm, eager_norm)}  # fmt: skip
        for what, (got, want) in pairs.items():
            got, want = got.detach().float().cpu(), want.detach().float().cpu()
            if not torch.isfinite(want).all():
                raise GraphUnusable(f"the eager step's {what} is not finite")
            if not torch.allclose(got, want, rtol=CHECK_RTOL, atol=1e-6):
                raise GraphUnusable(f"{what}: graph {got.tolist()} != eager {want.tolist()}")

    def _copy_in(self, batch: Batch) -> None:
        assert self._inputs is not None
        for f in fields(Batch):
            static, new = getattr(self._inputs, f.name), getattr(batch, f.name)
            if static.shape != new.shape or static.dtype != new.dtype:
                raise ValueError(
                    f"a graphed training step takes batches like its first: batch.{f.name} "
                    f"is {tuple(new.shape)} {new.dtype}, the graph's {tuple(static.shape)} "
                    f"{static.dtype}"
                )
            static.copy_(new, non_blocking=True)

    def _keep_grads(self) -> None:
        """Point every parameter at the graph's gradient tensors again, should anything
        have replaced them (a Python check per parameter, no kernel)."""
        for p, g in zip(self._params, self._grads, strict=True):
            if p.grad is not g:
                p.grad = g


def maybe_graphed(trainer: Any, *, enabled: bool, compiled: bool = False) -> Any:
    """``trainer`` wrapped in :class:`GraphedTrainStep` where CUDA graphs apply (``enabled``,
    a CUDA device, and no ``torch.compile``), else ``trainer`` itself."""
    if not enabled or compiled or trainer.device.type != "cuda":
        return trainer
    return GraphedTrainStep(trainer)
