"""The CUDA path, checked on a CPU with stand-ins: the precision policy under CPU autocast,
full-size gpu-profile models on the ``meta`` device, resuming with non-CPU state, and a
training step without host syncs."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from synthetic import random_split

from storm_lib import build_world_model, get_profile, utils
from storm_lib.checkpoint import read_checkpoint
from storm_lib.data import TrajectoryData
from storm_lib.train import _set_rng_state, fit
from storm_lib.types import Batch
from storm_lib.utils import autocast, autocast_dtype, describe_precision


def test_precision_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(utils, "cpu_bf16_support", lambda: (False, "no native bf16"))
    assert autocast_dtype("auto", cpu) is None  # fp32 on a CPU without native bf16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16 and autocast_dtype("fp32", cuda) is None
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16)):  # T4, A100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert autocast_dtype("auto", cuda) is dtype
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("fp8", cpu)
    assert describe_precision("auto", cpu) == "precision auto -> fp32 on cpu (no native bf16)"
    monkeypatch.setattr(utils, "cpu_bf16_support", lambda: (True, "this CPU has avx512_bf16"))
    assert autocast_dtype("auto", cpu) is torch.bfloat16  # native bf16: checked to train as well
    assert describe_precision("auto", cpu).startswith(
        "precision auto -> bf16 autocast on cpu (this CPU has avx512_bf16; bf16 trains as well"
    )
    assert describe_precision("fp32", cpu) == "precision fp32 -> fp32 on cpu (asked for)"
    assert all(get_profile(p).train.precision == "auto" for p in ("smoke", "cpu", "gpu", "paper"))


def test_cpu_bf16_support_reads_the_cpu_flags(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert utils.cpu_bf16_support(info)[0] is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert utils.cpu_bf16_support(info) == (True, "this CPU has avx512_bf16")
    info.write_text("flags\t\t: fpu amx_tile amx_bf16\n")
    assert utils.cpu_bf16_support(info) == (True, "this CPU has amx_bf16")
    native, why = utils.cpu_bf16_support(tmp_path / "missing")  # macOS, Windows
    assert native is False and "not Linux" in why


@pytest.mark.parametrize("kind", ["storm", "rssm"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loss_backward_imagine_and_fit_under_autocast(kind: str, precision: str, tmp_path) -> None:
    config = get_profile("smoke")
    config.train = dataclasses.replace(
        config.train, steps=3, eval_every=2, precision=precision, checkpoint_every=0
    )
    torch.manual_seed(0)
    model = build_world_model(kind, config, 4, "cpu")
    train, val = random_split()
    batch = train.sample(2, 12, torch.Generator().manual_seed(0))
    dtype = autocast_dtype(precision, torch.device("cpu"))
    with autocast(torch.device("cpu"), dtype):
        loss, _ = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()
    )
    with autocast(torch.device("cpu"), dtype):
        args = batch.obs[:, :4], batch.action[:, :4], batch.action[:, 4:8]
        frames = model.imagine(*args, mode="mode").obs
        if kind == "storm":
            uncached = model.imagine(*args, mode="mode", use_cache=False).obs
            assert (frames - uncached).abs().max() < 0.05  # low precision, same rollout
    assert frames.shape == (2, 5, 3, 64, 64) and torch.isfinite(frames).all()
    history = fit(model, train, val, steps=3, config=config.train, device="cpu",
                  checkpoint_path=tmp_path / "m.pt", progress=False, log_every=1)  # fmt: skip
    assert len(history.train) == 3 and np.isfinite([r["loss/total"] for r in history.train]).all()
    scaler = read_checkpoint(tmp_path / "m.pt", "cpu")["train_state"]["scaler"]
    assert (scaler["scale"] > 0) if precision == "fp16" else scaler == {}  # scaler only for fp16


@pytest.mark.parametrize("kind", ["storm", "rssm"])
def test_gpu_profile_models_run_one_step_at_full_size_on_meta(kind: str) -> None:
    config = get_profile("gpu")
    model = build_world_model(kind, config, 18, "meta")
    b, t = config.train.batch_size, config.train.seq_len
    batch = Batch(
        obs=torch.rand(b, t, 3, 64, 64, device="meta"),
        action=torch.zeros(b, t, dtype=torch.long, device="meta"),
        reward=torch.zeros(b, t, device="meta"),
        cont=torch.ones(b, t, device="meta"),
    )
    loss, metrics = model.loss(batch)  # no host sync, or meta tensors would refuse it
    loss.backward()
    assert loss.shape == () and loss.device.type == "meta" and "token_nll" in metrics
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class _NotOnCPU(torch.Tensor):
    """A stand-in for a CUDA tensor: ``.numpy()`` refuses it until ``.cpu()`` is called."""

    def numpy(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return torch.Tensor(self.as_subclass(torch.Tensor)).clone()


def test_resume_with_rng_state_mapped_to_another_device(tmp_path) -> None:
    config = get_profile("smoke")
    config.train = dataclasses.replace(config.train, steps=2, eval_every=100)
    train, val = random_split()
    model = build_world_model("storm", config, 4, "cpu")
    fit(model, train, val, steps=2, config=config.train, device="cpu",
        checkpoint_path=tmp_path / "m.pt", progress=False)  # fmt: skip
    state = read_checkpoint(tmp_path / "m.pt", "cpu")["train_state"]
    moved = {  # what map_location="cuda" gives: every tensor on the device
        k: (v.as_subclass(_NotOnCPU) if isinstance(v, torch.Tensor) else v)
        for k, v in state.items()
    }
    kind, keys, *rest = state["numpy"]
    moved["numpy"] = [kind, keys.as_subclass(_NotOnCPU), *rest]
    generator = torch.Generator()
    _set_rng_state(moved, generator)  # used to raise TypeError from .numpy() on the GPU
    assert torch.equal(generator.get_state(), state["sampler"])
    assert np.array_equal(np.random.get_state()[1], keys.numpy().astype(np.uint32))


def test_a_training_step_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count every Tensor -> Python conversion between the starts of steps that neither
    log, validate nor save: there must be none (on a GPU each would stall the device)."""
    config = get_profile("smoke")
    config.train = dataclasses.replace(config.train, steps=4, eval_every=100, checkpoint_every=0)
    train, val = random_split()
    calls: Counter[str] = Counter()
    marks: list[int] = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_sample = TrajectoryData.sample

    def sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        marks.append(sum(calls.values()))
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(TrajectoryData, "sample", sample)
    for kind in ("storm", "rssm"):
        marks.clear()
        model = build_world_model(kind, config, 4, "cpu")
        fit(model, train, val, steps=4, config=config.train, device="cpu", progress=False,
            log_every=100)  # fmt: skip
        assert len(marks) == 4
        assert marks[3] - marks[0] == 0, f"{kind}: host syncs in steps 1-3: {calls}"
    assert sum(calls.values()) > 0  # the counter does count (logging at the last step)


def test_flops_are_counted_on_meta_and_the_estimate_uses_the_measured_step() -> None:
    from storm_lib.costs import estimate_training_time, flops_per_step

    config = get_profile("smoke")
    small = flops_per_step("storm", config, 4)
    config.train = dataclasses.replace(config.train, batch_size=2 * config.train.batch_size)
    assert flops_per_step("storm", config, 4) == pytest.approx(2 * small, rel=0.01)  # ~linear
    before = torch.get_rng_state()
    estimate = estimate_training_time(config, 4, torch.device("cpu"), seconds=0.2)
    assert torch.equal(before, torch.get_rng_state())  # measuring leaves the run unchanged
    assert set(estimate.ms_per_step) == {"storm", "rssm"} and estimate.steps == 6
    assert estimate.minutes("storm") == pytest.approx(6 * estimate.ms_per_step["storm"] / 60_000)
    assert "both: about" in str(estimate)
