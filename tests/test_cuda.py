"""What only a CUDA GPU can show (``pytest -m cuda``; ``bench/gpu_check.py`` runs them).

Every test here is marked ``cuda`` and skips where PyTorch sees no GPU, so the module is
collected (and skipped) by the normal CPU suite. The CPU suite checks the same paths with
stand-ins (``test_gpu_path.py``, ``test_graphs.py``, ``test_device_data.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import TinyEmbed, random_split
from torch import Tensor

from storm_lib import build_world_model, get_profile, load_checkpoint, save_checkpoint
from storm_lib.data import TrajectoryData
from storm_lib.graphs import GraphedTrainStep
from storm_lib.models import speedups
from storm_lib.train import TrainStep, fit
from storm_lib.types import Batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "tests" / "student_p03" / "p03_model.py"
KINDS = ["storm", "rssm"]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def fp32() -> Iterator[None]:
    """Plain fp32 kernels: no TF32 (``fit`` turns it on for training) and no autotuner."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    ) = saved


@pytest.fixture
def argmax_latents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latent "samples" become argmaxes, so that CPU and GPU (different RNGs) agree."""
    monkeypatch.setattr(speedups, "sample_index", lambda probs: probs.argmax(-1))


def batch(b: int = 2, t: int = 10, seed: int = 0) -> Batch:
    """A bright square moving one pixel per step: something a model learns in 50 steps."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.full((b, t, 3, 64, 64), 0.1)
    for i in range(t):
        obs[:, i, :, 16 + i : 32 + i, 20:36] = 0.9
    return Batch(obs, torch.randint(0, 4, (b, t), generator=g), torch.ones(b, t), torch.ones(b, t))


def split() -> tuple[TrajectoryData, TrajectoryData]:
    return random_split(episode_length=40, val_fraction=0.25)


def smoke(**train: object):  # type: ignore[no-untyped-def]
    config = get_profile("smoke")
    config.train = dataclasses.replace(config.train, **train)
    return config


def model_on(kind: str, device: torch.device, config=None):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return build_world_model(kind, config or smoke(), 4, device)


# ------------------------------------------------------------ CPU and GPU agree in fp32
@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_imagine_agree_on_cpu_and_cuda_in_fp32(kind: str, fp32, argmax_latents) -> None:
    cpu = model_on(kind, torch.device("cpu")).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    b = batch()
    with torch.no_grad():
        loss_cpu, metrics_cpu = cpu.loss(b)
        loss_gpu, metrics_gpu = gpu.loss(b.to(CUDA))
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-4)
    for name, value in metrics_cpu.items():
        torch.testing.assert_close(metrics_gpu[name].cpu(), value, rtol=1e-3, atol=1e-3)
    args = (b.obs[:, :4], b.action[:, :4], b.action[:, 4:9])
    ro_cpu = cpu.imagine(*args, mode="mode")
    ro_gpu = gpu.imagine(*(x.to(CUDA) for x in args), mode="mode")
    for name in ("obs", "reward", "cont"):
        got, want = getattr(ro_gpu, name).cpu(), getattr(ro_cpu, name)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=name)


def test_kv_cache_equals_recompute_on_cuda(fp32) -> None:
    model = model_on("storm", CUDA).eval()
    b = batch(b=3, t=12).to(CUDA)
    args = (b.obs[:, :4], b.action[:, :4], b.action[:, 4:11])
    cached = model.imagine(*args, mode="mode")
    uncached = model.imagine(*args, mode="mode", use_cache=False)
    for name in ("obs", "reward", "cont"):
        torch.testing.assert_close(getattr(cached, name), getattr(uncached, name),
                                   rtol=1e-4, atol=1e-4, msg=name)  # fmt: skip


# ------------------------------------------------------------------ autocast training
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_50_steps_under_autocast_are_finite_and_learn(kind: str, precision: str, graphs: bool):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    config = smoke(precision=precision, lr=1e-3)
    model = model_on(kind, CUDA, config).train()
    trainer = TrainStep(model, config.train, CUDA)
    lines: list[str] = []
    step = GraphedTrainStep(trainer, log=lines.append) if graphs else trainer
    b = batch().to(CUDA)
    losses = []
    for _ in range(50):
        loss, _, _ = step.backward(model.loss, b, config.train.lr)
        step.update()
        losses.append(loss.detach().float())
    values = torch.stack(losses).cpu()
    assert torch.isfinite(values).all(), values
    assert values[-5:].mean() < 0.9 * values[:5].mean(), values
    if graphs:
        assert step.active, lines
    if precision == "fp16":
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_graphed_step_equals_the_eager_step_on_cuda(kind: str, fp32) -> None:
    def run(graphs: bool) -> tuple[list[float], dict[str, Tensor]]:
        config = smoke(precision="fp32")
        model = model_on(kind, CUDA, config).train()
        trainer = TrainStep(model, config.train, CUDA)
        step = GraphedTrainStep(trainer, log=lambda line: None) if graphs else trainer
        torch.manual_seed(1)
        losses = []
        for seed in range(4):
            loss, _, _ = step.backward(model.loss, batch(seed=seed).to(CUDA), 1e-3)
            step.update()
            losses.append(float(loss))
        assert not graphs or step.active
        return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}

    (eager_losses, eager_state), (graph_losses, graph_state) = run(False), run(True)
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-4)
    for name, value in eager_state.items():
        torch.testing.assert_close(graph_state[name], value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_make_no_host_sync(kind: str, graphs: bool) -> None:
    """Sampling a batch (frames kept on the GPU), the step and the update, with PyTorch's
    sync debug mode raising on any synchronising call."""
    train, _ = split()
    config = smoke()
    model = model_on(kind, CUDA, config).train()
    trainer = TrainStep(model, config.train, CUDA)
    step = GraphedTrainStep(trainer, log=lambda line: None) if graphs else trainer
    generator = torch.Generator().manual_seed(0)

    def one_step() -> None:
        b = train.sample(config.train.batch_size, config.train.seq_len, generator, CUDA)
        step.backward(model.loss, b, config.train.lr)
        step.update()

    one_step()  # the first step may sync (upload, capture and its check)
    assert train.device_copy(CUDA) is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not graphs or step.active


def test_device_batches_equal_host_batches() -> None:
    train, _ = split()
    host = train.sample(4, 12, torch.Generator().manual_seed(5))
    kept = train.sample(4, 12, torch.Generator().manual_seed(5), device=CUDA)
    assert train.device_copy(CUDA) is not None and kept.obs.device.type == "cuda"
    for name in ("obs", "action", "reward", "cont"):
        assert torch.equal(getattr(kept, name).cpu(), getattr(host, name)), name
    train.drop_device_copies()


# -------------------------------------------------------- resume in deterministic mode
@pytest.fixture
def deterministic_state() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_and_resume_in_deterministic_mode_equal_one_run(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deterministic_state
) -> None:
    config = get_profile("smoke")
    if not hasattr(config.train, "deterministic"):
        pytest.skip("this tree has no train.deterministic (issue 26, deterministic mode)")
    config = smoke(deterministic=True, steps=6, eval_every=100, checkpoint_every=0)
    train, val = split()
    kwargs = dict(steps=6, config=config.train, device=CUDA, progress=False, log_every=1)
    straight = model_on(kind, CUDA, config)
    fit(straight, train, val, **kwargs)  # type: ignore[arg-type]

    real_sample, calls = TrajectoryData.sample, {"n": 0}

    def interrupted(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C during step 4: steps 1-3 are saved
        return real_sample(self, *args, **kw)

    path = tmp_path / f"{kind}.pt"
    with monkeypatch.context() as patch:
        patch.setattr(TrajectoryData, "sample", interrupted)
        with pytest.raises(KeyboardInterrupt):
            fit(model_on(kind, CUDA, config), train, val, checkpoint_path=path, **kwargs)
    resumed = model_on(kind, CUDA, config)
    fit(resumed, train, val, checkpoint_path=path, resume=True, **kwargs)  # type: ignore[arg-type]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ FVD, outside models
def windows(n: int = 6, steps: int = 18) -> Batch:
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(n, steps, 3, 64, 64, generator=g)
    return Batch(obs, torch.randint(0, 4, (n, steps), generator=g), torch.zeros(n, steps),
                 torch.ones(n, steps))  # fmt: skip


def test_fvd_on_cuda_matches_cpu(fp32, argmax_latents) -> None:
    from storm_lib.fvd import fvd_for_models, i3d_features
    from storm_lib.i3d import I3D, FVDWeightsError

    w = windows()
    cpu_model = model_on("storm", torch.device("cpu")).eval()
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    scores = {}
    for where, model in (("cpu", cpu_model), ("cuda", gpu_model)):
        embed = TinyEmbed().to(next(model.parameters()).device)
        out = fvd_for_models(
            {"storm": model}, w, context=8, horizon=10, i3d=embed,  # type: ignore[arg-type]
            mode="mode", progress=False,
        )  # fmt: skip
        scores[where] = out["fvd"]["storm"]
    assert scores["cuda"] == pytest.approx(scores["cpu"], rel=1e-3, abs=1e-6)
    try:
        i3d_gpu = I3D.from_pretrained(device=CUDA)
    except FVDWeightsError as exc:
        pytest.skip(f"the I3D weights are not installed: {exc}")
    i3d_cpu = copy.deepcopy(i3d_gpu).to("cpu")
    clips = w.obs[:2]
    torch.testing.assert_close(
        torch.from_numpy(i3d_features(i3d_gpu, clips, progress=False)),
        torch.from_numpy(i3d_features(i3d_cpu, clips, progress=False)),
        rtol=1e-3, atol=1e-3,
    )  # fmt: skip


def _student_weights(tmp_path: Path) -> Path:
    sys.path.insert(0, str(STUDENT.parent))
    try:
        import p03_model
    finally:
        sys.path.remove(str(STUDENT.parent))
    torch.manual_seed(0)
    path = tmp_path / "p03.pt"
    torch.save(p03_model.StudentRSSM().state_dict(), path)  # its load() builds 18 actions
    return path


def test_an_outside_model_runs_on_cuda(tmp_path: Path) -> None:
    from storm_lib.evaluate import rollout_psnr
    from storm_lib.fvd import fvd_for_models
    from storm_lib.outside import load_outside_model

    weights = _student_weights(tmp_path)
    student = load_outside_model(f"{STUDENT}:load", weights, CUDA, action_dim=18)
    w = windows()
    result = rollout_psnr({"student": student}, w, context=8, horizon=10, mode="mode",
                          progress=False)  # fmt: skip
    assert np.isfinite(result.models["student"].values).all()
    out = fvd_for_models(
        {"student": student}, w, context=8, horizon=10,
        i3d=TinyEmbed().to(CUDA), mode="mode", progress=False,  # type: ignore[arg-type]
    )  # fmt: skip
    assert np.isfinite(out["fvd"]["student"])


# --------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_saved_on_cuda_loads_on_cpu(kind: str, tmp_path: Path) -> None:
    model = model_on(kind, CUDA)
    path = save_checkpoint(tmp_path / f"{kind}.pt", model, step=1)
    loaded = load_checkpoint(path, "cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a.cpu(), b), name
