"""RSSM baseline: interface, shapes, learning, and the P03 checkpoint loader."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from storm_lib.checkpoint import CheckpointError, save_checkpoint
from storm_lib.config import Config, get_profile
from storm_lib.models import WorldModel
from storm_lib.models.rssm import RSSMWorldModel
from storm_lib.p03 import load_rssm_checkpoint, save_p03_checkpoint
from storm_lib.types import Batch, Rollout
from storm_lib.utils import evaluating

A = 4


def small_config(**rssm: int) -> Config:
    c = get_profile("smoke")
    c.rssm.deter = rssm.get("deter", c.rssm.deter)
    c.rssm.hidden = rssm.get("hidden", c.rssm.hidden)
    return c


def make_batch(b: int = 2, t: int = 5, actions: int = A, size: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.rand(b, t, 3, size, size, generator=g),
        action=torch.randint(0, actions, (b, t), generator=g),
        reward=torch.randn(b, t, generator=g),
        cont=(torch.rand(b, t, generator=g) > 0.2).float(),
    )


@pytest.fixture(scope="module")
def model() -> RSSMWorldModel:
    torch.manual_seed(0)
    return RSSMWorldModel(small_config(), A)


def test_interface_and_shapes(model: RSSMWorldModel) -> None:
    assert isinstance(model, WorldModel) and model.kind == "rssm" and model.max_length is None
    batch = make_batch()
    loss, metrics = model.loss(batch)
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    names = {"loss/total", "loss/rec", "loss/reward", "loss/cont", "loss/dyn", "loss/rep"}
    assert names | {"kl/dyn_raw", "token_nll"} == set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert torch.allclose(metrics["loss/total"], loss.detach())
    assert metrics["loss/dyn"] >= 1.0 and metrics["token_nll"] > 0
    assert model.reconstruct(batch.obs).shape == batch.obs.shape
    rec = model.reconstruct(batch.obs, batch.action)
    assert rec.shape == batch.obs.shape and rec.min() >= 0 and rec.max() <= 1
    assert model.predict_one_step(batch.obs, batch.action).shape == (2, 4, 3, 64, 64)
    assert model.token_nll_per_step(batch.obs, batch.action).shape == (2, 4)
    post, prior = model.observe(model.embed(batch.obs), batch.action)
    assert post.deter.shape == (2, 5, 32) and post.stoch.shape == (2, 5, 32, 32)
    assert torch.equal(post.deter, prior.deter)
    one_hot = post.stoch.detach().round()  # straight-through: one-hot up to rounding
    assert torch.allclose(post.stoch, one_hot, atol=1e-6)
    assert torch.equal(one_hot.sum(-1), torch.ones(2, 5, 32))
    assert set(model.parts()) == {
        "encoder", "sequence model", "prior head", "posterior", "decoder", "reward head",
        "continuation head",
    }  # fmt: skip
    counted = sum(p.numel() for part in model.parts().values() for p in part.parameters())
    assert counted == sum(p.numel() for p in model.parameters())


def test_vocabulary_steps(model: RSSMWorldModel) -> None:
    state = model.initial(3)
    assert state.deter.shape == (3, 32) and not state.deter.any() and not state.stoch.any()
    prior = model.img_step(state, torch.tensor([0, 1, 3]))
    same = model.img_step(state, torch.eye(A)[[0, 1, 3]], mode="mode")
    assert torch.equal(prior.deter, same.deter)  # index and one-hot actions agree
    post, prior2 = model.obs_step(state, torch.tensor([0, 1, 3]), torch.randn(3, 8 * 8 * 4 * 4))
    assert post.stoch.shape == prior2.stoch.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="actions must be in"):
        model.img_step(state, torch.tensor([0, 1, A]))


def test_imagine_horizon_determinism_and_mode(model: RSSMWorldModel) -> None:
    batch = make_batch(t=3)
    future = torch.randint(0, A, (2, 4))
    model.train()
    ro = model.imagine(batch.obs, batch.action, future, mode="mode")
    assert model.training  # restored
    assert isinstance(ro, Rollout) and ro.obs.shape == (2, 5, 3, 64, 64)
    assert ro.reward.shape == ro.cont.shape == (2, 5)
    assert ro.obs.min() >= 0 and ro.obs.max() <= 1 and ((ro.cont >= 0) & (ro.cont <= 1)).all()
    again = model.imagine(batch.obs, batch.action, future, mode="mode")
    assert torch.equal(ro.obs, again.obs) and torch.equal(ro.reward, again.reward)
    model.eval()
    assert model.imagine(batch.obs, batch.action, future[:, :0]).obs.shape[1] == 1
    assert not model.training
    model.train()
    with pytest.raises(ValueError, match="actions must be in"):
        model.imagine(batch.obs, batch.action, future + A)
    with pytest.raises(ValueError, match="mode"):
        model.imagine(batch.obs, batch.action, future, mode="greedy")


def test_rollouts_and_diagnostics_reject_bad_actions(model: RSSMWorldModel) -> None:
    batch = make_batch()
    batch.action[0, 2] = A  # loss() does not look (no per-step sync): fit() checks the data
    with pytest.raises(ValueError, match="wrong action count"):
        model.imagine(batch.obs[:, :3], batch.action[:, :3], batch.action[:, 3:])
    with pytest.raises(ValueError, match="wrong action count"):
        model.reconstruct(batch.obs, batch.action)


def test_gradients_reach_every_part() -> None:
    torch.manual_seed(0)
    m = RSSMWorldModel(small_config(), A)
    loss, _ = m.loss(make_batch())
    loss.backward()
    for name, part in m.parts().items():
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert m.encoder.convs[0].weight.grad.abs().sum() > 0


def test_learns_a_fixed_batch() -> None:
    torch.manual_seed(0)
    c = small_config()
    c.data.image_size = 32
    m = RSSMWorldModel(c, A)
    g = torch.Generator().manual_seed(1)
    # Smooth structured frames: a bright square moving one pixel per step.
    obs = torch.full((2, 6, 3, 32, 32), 0.1)
    for t in range(6):
        obs[:, t, :, 8 + t : 16 + t, 10:18] = 0.9
    batch = Batch(obs, torch.randint(0, A, (2, 6), generator=g), torch.ones(2, 6), torch.ones(2, 6))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        loss, metrics = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = metrics if first is None else first
    assert metrics["loss/rec"] < 0.1 * first["loss/rec"]
    assert metrics["loss/reward"] < 0.3 * first["loss/reward"]
    assert metrics["loss/total"] < 0.15 * first["loss/total"]


def _outputs(m: RSSMWorldModel, batch: Batch) -> tuple[torch.Tensor, ...]:
    ro = m.imagine(batch.obs[:, :3], batch.action[:, :3], batch.action[:, 3:], mode="mode")
    m.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        loss, _ = m.loss(batch)
    return ro.obs, ro.reward, ro.cont, loss


def _trained_once(c: Config, actions: int) -> RSSMWorldModel:
    torch.manual_seed(0)
    m = RSSMWorldModel(c, actions)
    m.loss(make_batch(actions=actions, size=c.data.image_size))  # updates BatchNorm statistics
    return m.eval()


def test_round_trip_p03_format(tmp_path: Path) -> None:
    m = _trained_once(small_config(), A)
    opt = torch.optim.Adam(m.parameters())
    path = save_p03_checkpoint(m, tmp_path / "p03.pt", optimizer=opt, step=7)
    loaded = load_rssm_checkpoint(path, "cpu", action_dim=A)
    assert not loaded.training and loaded.action_dim == A
    for x, y in zip(_outputs(m, make_batch()), _outputs(loaded, make_batch()), strict=True):
        assert torch.equal(x, y)


def _odd_config(variant: str) -> Config:
    c = small_config(deter=48, hidden=40)
    c.vae.stem_channels = 8
    if variant == "small":
        c.vae.stages, c.vae.batch_norm, c.data.image_size = 3, False, 32
        c.vae.categoricals = c.vae.classes = 16
        c.heads.reward_bins, c.heads.mlp_layers = 41, 2
    return c


@pytest.mark.parametrize("variant", ["default", "small"])
@pytest.mark.parametrize("wrap", ["bare", "compiled", "nested"])
def test_bare_state_dict_sizes_inferred(tmp_path: Path, variant: str, wrap: str) -> None:
    c = _odd_config(variant)
    m = _trained_once(c, 6)
    sd = m.state_dict()
    if wrap == "compiled":
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 3} if wrap == "nested" else sd
    torch.save(obj, tmp_path / "bare.pt")
    k = c.vae.categoricals  # the one size shapes cannot give: K (or V) must be said
    loaded = load_rssm_checkpoint(tmp_path / "bare.pt", "cpu", categoricals=k)
    assert loaded.action_dim == 6
    for section in ("rssm", "vae", "heads"):
        assert getattr(loaded.config, section) == getattr(c, section)
    assert loaded.config.data.image_size == c.data.image_size
    batch = make_batch(actions=6, size=c.data.image_size)
    for x, y in zip(_outputs(m, batch), _outputs(loaded, batch), strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ bad inputs
@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_p03_checkpoint(RSSMWorldModel(small_config(), A), tmp_path / "ok.pt")


def test_truncated_file(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_rssm_checkpoint(cut, "cpu")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_rssm_checkpoint(noise, "cpu")
    text = tmp_path / "cfg.json"
    text.write_text(json.dumps({"deter": 32}))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_rssm_checkpoint(text, "cpu")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_rssm_checkpoint(tmp_path / "absent.pt", "cpu")
    torch.save({"lr": torch.tensor(1.0), "note": "hi"}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_rssm_checkpoint(tmp_path / "dict.pt", "cpu")


class _FakeStorm(nn.Module):
    kind = "storm"

    def __init__(self) -> None:
        super().__init__()
        self.config, self.action_dim = get_profile("smoke"), A
        self.layer = nn.Linear(2, 2)


def test_storm_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "storm.pt", _FakeStorm())  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="holds a STORM model, expected RSSM"):
        load_rssm_checkpoint(path, "cpu")


def test_real_storm_checkpoint_is_refused(tmp_path: Path) -> None:
    storm = pytest.importorskip("storm_lib.models.storm")
    path = save_checkpoint(tmp_path / "s.pt", storm.STORMWorldModel(get_profile("smoke"), A))
    with pytest.raises(CheckpointError, match="holds a STORM model, expected RSSM"):
        load_rssm_checkpoint(path, "cpu")


def test_wrong_action_count(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="wrong action count for the dataset"):
        load_rssm_checkpoint(saved, "cpu", action_dim=A + 2)
    torch.save(RSSMWorldModel(small_config(), A).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="wrong action count for the dataset"):
        load_rssm_checkpoint(tmp_path / "bare.pt", "cpu", action_dim=A - 1, classes=32)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_not_executed(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"gru.weight_hh": _Evil(marker)}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refuses"):
        load_rssm_checkpoint(path, "cpu")
    assert not marker.exists()


def test_missing_key_and_wrong_shape(tmp_path: Path) -> None:
    sd = RSSMWorldModel(small_config(), A).state_dict()
    missing = {k: v for k, v in sd.items() if k != "decoder.deconvs.0.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.deconvs\.0\.weight"):
        load_rssm_checkpoint(tmp_path / "missing.pt", "cpu", categoricals=32)
    no_gru = {k: v for k, v in sd.items() if k != "gru.weight_hh"}
    torch.save(no_gru, tmp_path / "no_gru.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'gru\.weight_hh'"):
        load_rssm_checkpoint(tmp_path / "no_gru.pt", "cpu")
    shaped = {**sd, "prior.1.weight": torch.ones(33), "extra.bias": torch.zeros(2)}
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.bias") as info:
        load_rssm_checkpoint(tmp_path / "shape.pt", "cpu", categoricals=32, classes=32)
    message = str(info.value)
    assert "prior.1.weight: file (33,) vs model (32,)" in message
    assert "inferred: deter=32, hidden=32" in message


def _loss_and_grads(m: RSSMWorldModel, batch: Batch) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)  # the same latent samples on both paths
    m.zero_grad(set_to_none=True)
    loss, metrics = m.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return torch.stack([loss.detach(), *metrics.values()]), grads


def test_precomputed_inputs_equal_the_plain_loop_with_fewer_ops() -> None:
    """The filtering loop with its action and embedding projections hoisted out of it
    (the default) gives the plain loop's loss and gradients, with fewer ops per step."""
    from storm_lib.models import speedups
    from storm_lib.opcount import loss_step_ops

    torch.manual_seed(0)
    m = RSSMWorldModel(small_config(), A)
    batch = make_batch(b=3, t=7)
    with speedups.plain("rssm_inputs"):
        plain_loss, plain_grads = _loss_and_grads(m, batch)
    fast_loss, fast_grads = _loss_and_grads(m, batch)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():  # within 1e-5 of each gradient's own scale
        scale = grad.abs().max().clamp_min(1e-6)
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * scale, name
    with evaluating(m):  # eval-mode filtering too (argmax latents)
        post = m.posterior_log_probs(batch.obs, batch.action)
        with speedups.plain("rssm_inputs"):
            torch.testing.assert_close(post, m.posterior_log_probs(batch.obs, batch.action))

    config = small_config()
    with speedups.plain("rssm_inputs"):
        plain_ops = loss_step_ops("rssm", config, action_dim=A)
    fast_ops = loss_step_ops("rssm", config, action_dim=A)
    assert fast_ops.kernels < plain_ops.kernels and fast_ops.total < plain_ops.total
    t = config.train.seq_len
    assert plain_ops.by_name["cat"] - fast_ops.by_name["cat"] >= 2 * t  # no cat in the loop
