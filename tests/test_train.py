"""The one training loop: validation, checkpoints, resume, interruption, NaN, mismatches."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from storm_lib import build_world_model, get_profile
from storm_lib.checkpoint import read_checkpoint
from storm_lib.data import TrajectoryData
from storm_lib.train import TrainingError, fit, make_optimizer


def synthetic(action_dim: int = 4, episodes: int = 6, length: int = 30, size: int = 64):
    rng = np.random.default_rng(0)
    n = episodes * length
    return TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
        action=rng.integers(0, action_dim, n).astype(np.int64),
        reward=rng.choice([0.0, 1.0], n).astype(np.float32),
        cont=np.ones(n, np.float32),
        episode=np.repeat(np.arange(episodes), length).astype(np.int32),
        meta={"action_dim": action_dim, "env_id": "synthetic"},
    )


@pytest.fixture(scope="module")
def split():
    return synthetic().split(0.34, seed=0)


def tiny(kind: str = "storm", **train):
    config = get_profile("smoke")
    config.train = dataclasses.replace(config.train, steps=4, eval_every=2, **train)
    torch.manual_seed(0)  # the same initial weights for every model built here
    return config, build_world_model(kind, config, 4, "cpu")


@pytest.mark.parametrize("kind", ["storm", "rssm"])
def test_fit_records_history_and_checkpoint(split, tmp_path, kind):
    config, model = tiny(kind)
    path = tmp_path / "m.pt"
    history = fit(
        model,
        *split,
        steps=4,
        config=config.train,
        device="cpu",
        checkpoint_path=path,
        progress=False,
        log_every=1,
    )
    assert [r["step"] for r in history.train] == [1, 2, 3, 4]
    assert [r["step"] for r in history.val] == [2, 4]
    times = [r["time"] for r in history.train]
    assert all(b > a for a, b in itertools.pairwise(times))
    assert {"loss/total", "token_nll", "loss/reward"} <= set(history.val[0])
    payload = read_checkpoint(path, "cpu")
    assert payload["step"] == 4 and payload["model"] == kind
    assert payload["optimizer"] is not None and payload["train_state"] is not None


def test_resume_equals_continuing(split, tmp_path):
    config, straight = tiny()
    full = fit(
        straight, *split, steps=6, config=config.train, device="cpu", progress=False, log_every=1
    )
    config, first = tiny()
    path = tmp_path / "resume.pt"
    fit(
        first,
        *split,
        steps=3,
        config=config.train,
        device="cpu",
        checkpoint_path=path,
        progress=False,
        log_every=1,
    )
    config, second = tiny()  # a fresh model: everything must come from the file
    resumed = fit(
        second,
        *split,
        steps=6,
        config=config.train,
        device="cpu",
        checkpoint_path=path,
        resume=True,
        progress=False,
        log_every=1,
    )
    expect = [r["loss/total"] for r in full.train]
    got = [r["loss/total"] for r in resumed.train]
    assert len(got) == 6
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    for a, b in zip(straight.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_non_finite_loss_names_step_and_term_and_keeps_last_good(split, tmp_path, monkeypatch):
    config, model = tiny(checkpoint_every=2)
    real_loss, calls = model.loss, {"n": 0}

    def poisoned(batch):
        loss, metrics = real_loss(batch)
        calls["n"] += 1
        if calls["n"] == 3 and model.training:
            metrics = {**metrics, "loss/reward": torch.tensor(float("nan"))}
            return loss * float("nan"), metrics
        return loss, metrics

    monkeypatch.setattr(model, "loss", poisoned)
    path = tmp_path / "nan.pt"
    with pytest.raises(TrainingError, match=r"step 3.*loss/reward"):
        fit(
            model,
            *split,
            steps=4,
            config=dataclasses.replace(config.train, eval_every=100),
            device="cpu",
            checkpoint_path=path,
            progress=False,
        )
    payload = read_checkpoint(path, "cpu")
    assert payload["step"] == 2
    assert all(t.isfinite().all() for t in payload["state_dict"].values() if t.is_floating_point())


def test_keyboard_interrupt_saves_last_completed_step(split, tmp_path, monkeypatch):
    config, model = tiny()
    real_loss, calls = model.loss, {"n": 0}

    def interrupt(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(batch)

    monkeypatch.setattr(model, "loss", interrupt)
    path = tmp_path / "ctrl_c.pt"
    with pytest.raises(KeyboardInterrupt):  # re-raised once saved, so queued work stops
        fit(
            model,
            *split,
            steps=10,
            config=dataclasses.replace(config.train, eval_every=100),
            device="cpu",
            checkpoint_path=path,
            progress=False,
            log_every=1,
        )
    payload = read_checkpoint(path, "cpu")
    assert payload["step"] == 3 and payload["total_steps"] == 10
    assert [r["step"] for r in payload["history"]["train"]] == [1, 2, 3]


def test_mismatches_fail_before_training(split):
    config = get_profile("smoke")
    wrong_actions = build_world_model("storm", config, 6, "cpu")
    with pytest.raises(TrainingError, match="4 actions"):
        fit(wrong_actions, *split, steps=1, config=config.train, device="cpu", progress=False)
    model = build_world_model("storm", config, 4, "cpu")
    too_long = dataclasses.replace(config.train, seq_len=config.transformer.max_length + 1)
    with pytest.raises(TrainingError, match="max_length"):
        fit(model, *split, steps=1, config=too_long, device="cpu", progress=False)


def test_train_or_load_weights_depend_on_the_seed_alone(split, tmp_path):
    """Earlier use of the global RNG (e.g. collecting data first) must not change a run."""
    from storm_lib.workflow import train_or_load

    config, _ = tiny()
    config.train.steps = 1
    weights = []
    for i, draws in enumerate((0, 1000)):
        torch.rand(draws)
        model, _ = train_or_load("storm", config, *split, tmp_path / f"{i}.pt", progress=False)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


def test_optimizer_is_fused_adam_and_loads_a_loop_adam_state() -> None:
    config = get_profile("smoke")
    model = build_world_model("storm", config, 4, "cpu")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    loop = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    loop.step()  # a state written by the old, unfused optimizer
    fused = make_optimizer(model, config.train, torch.device("cpu"))
    assert fused.defaults["fused"] and fused.defaults["lr"] == config.train.lr
    fused.load_state_dict(loop.state_dict())
    fused.step()
    assert all(float(s["step"]) == 2.0 for s in fused.state.values())


def test_compile_switch_is_off_by_default() -> None:
    assert all(not get_profile(p).train.compile for p in ("smoke", "cpu", "gpu", "paper"))
    config = get_profile("smoke")
    assert config.from_dict({"train": {"steps": 3}}).train.compile is False  # old checkpoints


def test_lr_schedule_warms_up_decays_and_depends_on_the_step_alone() -> None:
    from storm_lib.train import lr_at

    config = dataclasses.replace(
        get_profile("smoke").train, lr=1e-3, warmup_steps=4, lr_schedule="cosine",
        final_lr_fraction=0.1,
    )  # fmt: skip
    lrs = [lr_at(s, 14, config) for s in range(14)]
    np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    linear = dataclasses.replace(config, lr_schedule="linear", warmup_steps=0)
    assert lr_at(5, 11, linear) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(7, 11, get_profile("smoke").train) == get_profile("smoke").train.lr  # paper
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, 10, dataclasses.replace(config, lr_schedule="step"))
