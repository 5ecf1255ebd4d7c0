"""Kernel launches per training step: the RSSM's plain loop, its precomputed inputs, and
what the host still launches when the step replays a CUDA graph.

No GPU is needed. The loss forward and backward of each model are counted at full size on
the ``meta`` device (``storm_lib.opcount``): every ATen op, and those that compute rather
than return a view (about one kernel launch each on a GPU). For the RSSM this is done
with the plain filtering loop (``speedups.plain("rssm_inputs")``) and with the default
loop whose action and embedding projections are computed for all T before it.

With ``train.cuda_graphs`` the forward and backward replay one CUDA graph; the host then
launches the graph, the batch copies into it, the copy of its outputs, clipping and the
fused Adam step. Those ops are counted on the CPU around a stand-in of the graph that
counts as one launch. On the CPU clipping loops over the parameters, where CUDA uses
one foreach kernel, so this count is an upper bound of what a GPU sees.

    PYTHONPATH=. python bench/bench_launches.py [--profile gpu]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from storm_lib import build_world_model, get_profile
from storm_lib.graphs import EagerRecorder, GraphedTrainStep
from storm_lib.models import speedups
from storm_lib.opcount import OpCounter, loss_step_ops, random_batch
from storm_lib.train import TrainStep

ACTIONS = 18  # the full Atari action set


class _CountedAsOneLaunch(EagerRecorder):
    """A graph recorder for counting: the recorded step runs eagerly with the counter
    paused, and each replay counts as the one launch a CUDA graph is."""

    def __init__(self, model: torch.nn.Module, counter: OpCounter) -> None:
        super().__init__(model)
        self.counter = counter

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        eager = super().capture(fn)

        def replay() -> None:
            paused, self.counter.paused = self.counter.paused, True
            try:
                eager()
            finally:
                self.counter.paused = paused
            self.counter.total += 1
            self.counter.kernels += 1
            self.counter.by_name["graph launch"] += 1

        return replay


def graphed_step_host_ops(kind: str, profile: str = "smoke") -> OpCounter:
    """Host ops of one graphed training step after the capture (CPU, the ``smoke`` sizes:
    the count depends on the number of parameter tensors, not on their sizes)."""
    config = get_profile(profile)
    torch.manual_seed(0)
    model = build_world_model(kind, config, ACTIONS, "cpu").train()
    counter = OpCounter()
    step = GraphedTrainStep(
        TrainStep(model, config.train, torch.device("cpu")),
        recorder=_CountedAsOneLaunch(model, counter),
        log=lambda line: None,
    )
    batch = random_batch(config, "cpu", ACTIONS)
    step.backward(model.loss, batch, 1e-4)  # warm-up, capture, check: not counted
    step.update()
    counter.total = counter.kernels = 0  # the capture's own check replayed once
    counter.by_name.clear()
    with counter:
        step.backward(model.loss, batch, 1e-4)
        step.update()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu")
    args = parser.parse_args()
    config = get_profile(args.profile)
    t = config.train.seq_len
    print(
        f"profile {args.profile}: batch {config.train.batch_size} x {t} steps; ATen ops of one "
        "training step's loss forward + backward, counted on meta (kernels: ops that compute)"
    )
    with speedups.plain("rssm_inputs"):
        plain = loss_step_ops("rssm", config, action_dim=ACTIONS)
    rows = {
        "rssm, plain loop": plain,
        "rssm, precomputed inputs": loss_step_ops("rssm", config, action_dim=ACTIONS),
        "storm": loss_step_ops("storm", config, action_dim=ACTIONS),
    }
    for name, c in rows.items():
        print(f"  {name:<26} {c.total:6d} ops, {c.kernels:6d} kernels ({c.kernels / t:5.1f} per T)")
    before, after = rows["rssm, plain loop"], rows["rssm, precomputed inputs"]
    print(
        f"  precomputing the RSSM's inputs removes {before.kernels - after.kernels} kernels "
        f"({100 * (1 - after.kernels / before.kernels):.0f}%) and "
        f"{before.total - after.total} ops per step"
    )
    print("with train.cuda_graphs: host ops per step around the graph (CPU count, upper bound)")
    for kind in ("rssm", "storm"):
        c = graphed_step_host_ops(kind)
        top = ", ".join(f"{n} {k}" for n, k in c.by_name.most_common(6))
        print(f"  {kind:<5} {c.kernels:4d} launches, 1 of them the graph ({top}, ...)")


if __name__ == "__main__":
    main()
