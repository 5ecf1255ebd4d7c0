"""The graphed training step (storm_lib.graphs), on a CPU with an eager stand-in for the
CUDA graph: the same results as the plain step, and the plain step whenever capture or
its check fails. ``tests/test_cuda.py`` checks real CUDA graphs where a GPU is present."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from synthetic import random_split

from storm_lib import build_world_model, get_profile
from storm_lib import train as train_module
from storm_lib.graphs import EagerRecorder, GraphedTrainStep, maybe_graphed
from storm_lib.train import TrainStep, fit
from storm_lib.types import Batch

CPU = torch.device("cpu")


def batches(n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(
            obs=torch.rand(2, 6, 3, 64, 64, generator=g),
            action=torch.randint(0, 4, (2, 6), generator=g),
            reward=torch.randn(2, 6, generator=g),
            cont=torch.ones(2, 6),
        )
        for _ in range(n)
    ]


def run(kind: str, make_step: Callable, steps: int = 3) -> tuple[list, list, dict]:
    """``steps`` training steps from the same initial weights and RNG; per-step losses
    and gradient norms, and the final weights and buffers."""
    config = get_profile("smoke")
    config.train.precision = "fp32"  # bitwise comparisons (autocast's cache is off in graphs)
    torch.manual_seed(0)
    model = build_world_model(kind, config, 4, "cpu").train()
    step = make_step(TrainStep(model, config.train, CPU))
    torch.manual_seed(1)
    losses, norms = [], []
    for batch in batches(steps):
        loss, metrics, norm = step.backward(model.loss, batch, 1e-3)
        step.update()
        losses.append((loss, metrics))
        norms.append(norm)
    return losses, norms, {k: v.clone() for k, v in model.state_dict().items()}


def same_runs(a: tuple, b: tuple) -> None:
    (loss_a, norm_a, state_a), (loss_b, norm_b, state_b) = a, b
    for (la, ma), (lb, mb) in zip(loss_a, loss_b, strict=True):
        assert torch.equal(la.float(), lb.detach().float())
        assert ma.keys() == mb.keys()
        assert all(torch.equal(ma[k].float(), mb[k].float()) for k in ma)
    assert all(torch.equal(x, y) for x, y in zip(norm_a, norm_b, strict=True))
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


class FailingRecorder(EagerRecorder):
    def capture(self, fn):  # type: ignore[no-untyped-def]
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


class StaleRecorder(EagerRecorder):
    """A broken graph: as a real capture, it computes nothing (the gradients it allocated
    hold zeros), and its replays do nothing either."""

    def capture(self, fn):  # type: ignore[no-untyped-def]
        fn()
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        return lambda: None


def graphed(recorder_cls: type, lines: list[str]) -> Callable:
    return lambda trainer: GraphedTrainStep(
        trainer, recorder=recorder_cls(trainer.model), log=lines.append
    )


@pytest.mark.parametrize("kind", ["storm", "rssm"])
def test_graphed_step_equals_the_plain_step(kind: str) -> None:
    lines: list[str] = []
    plain = run(kind, lambda trainer: trainer)
    same_runs(run(kind, graphed(EagerRecorder, lines)), plain)
    assert len(lines) == 1 and "replay one CUDA graph" in lines[0]
    losses = [loss for loss, _ in run(kind, graphed(EagerRecorder, []))[0]]
    assert len({loss.data_ptr() for loss in losses}) == 3  # copies, not the graph's output


@pytest.mark.parametrize("recorder", [FailingRecorder, StaleRecorder])
def test_a_failed_or_wrong_capture_runs_the_plain_step(recorder: type) -> None:
    lines: list[str] = []
    steps: list[GraphedTrainStep] = []

    def make(trainer):  # type: ignore[no-untyped-def]
        steps.append(graphed(recorder, lines)(trainer))
        return steps[-1]

    same_runs(run("rssm", make), run("rssm", lambda trainer: trainer))
    assert len(lines) == 1 and lines[0].startswith("cuda graphs: not used (")
    assert steps[0].failed and not steps[0].active
    if recorder is FailingRecorder:
        assert "RuntimeError: operation not permitted" in lines[0] and "detail" not in lines[0]
    else:
        assert "GraphUnusable" in lines[0]


def test_graphed_step_refuses_batches_of_another_shape() -> None:
    config = get_profile("smoke")
    model = build_world_model("rssm", config, 4, "cpu").train()
    step = GraphedTrainStep(
        TrainStep(model, config.train, CPU), recorder=EagerRecorder(model), log=lambda s: None
    )
    first, second = batches(2)
    step.backward(model.loss, first, 1e-3)
    short = Batch(second.obs[:, :5], second.action[:, :5], second.reward[:, :5], second.cont[:, :5])
    with pytest.raises(ValueError, match="batches like its first"):
        step.backward(model.loss, short, 1e-3)


def test_only_cuda_gets_a_graph() -> None:
    config = get_profile("smoke")
    assert config.train.cuda_graphs  # on by default (for CUDA)
    trainer = TrainStep(build_world_model("rssm", config, 4, "cpu"), config.train, CPU)
    assert maybe_graphed(trainer, enabled=True) is trainer
    trainer.device = torch.device("cuda")  # a stand-in: nothing runs here
    assert isinstance(maybe_graphed(trainer, enabled=True), GraphedTrainStep)
    assert maybe_graphed(trainer, enabled=False) is trainer
    assert maybe_graphed(trainer, enabled=True, compiled=True) is trainer


def test_fit_with_the_graphed_step_equals_fit_without(monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = random_split()
    config = get_profile("smoke")
    config.train = dataclasses.replace(config.train, steps=4, eval_every=2, checkpoint_every=0)

    def train_once() -> list[float]:
        torch.manual_seed(0)
        model = build_world_model("storm", config, 4, "cpu")
        history = fit(model, train, val, steps=4, config=config.train, device="cpu",
                      progress=False, log_every=1)  # fmt: skip
        return [r["loss/total"] for r in history.train] + [r["loss/total"] for r in history.val]

    plain = train_once()
    made: list[GraphedTrainStep] = []

    def stand_in(trainer, *, enabled, compiled=False):  # type: ignore[no-untyped-def]
        made.append(GraphedTrainStep(trainer, recorder=EagerRecorder(trainer.model)))
        return made[-1]

    monkeypatch.setattr(train_module, "maybe_graphed", stand_in)
    assert train_once() == plain
    assert made and made[0].active
