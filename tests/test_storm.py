"""STORM world model (storm_lib.models.storm): shapes, gradients, cache equivalence, causality."""

from __future__ import annotations

import pytest
import torch

from storm_lib.config import Config, get_profile
from storm_lib.models import WorldModel
from storm_lib.models.storm import STORMWorldModel
from storm_lib.types import Batch

LAYOUTS = ("fused", "interleaved")
A = 5  # actions


def small_config(layout: str = "fused", max_length: int = 16) -> Config:
    cfg = get_profile("smoke")
    cfg.transformer.layers = 2
    cfg.transformer.max_length = max_length
    cfg.transformer.token_layout = layout
    return cfg


def make(layout: str = "fused", max_length: int = 16, seed: int = 0) -> STORMWorldModel:
    torch.manual_seed(seed)
    return STORMWorldModel(small_config(layout, max_length), A)


def make_batch(b: int = 2, t: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.rand(b, t, 3, 64, 64, generator=g),
        action=torch.randint(0, A, (b, t), generator=g),
        reward=torch.randn(b, t, generator=g),
        cont=(torch.rand(b, t, generator=g) > 0.2).float(),
    )


METRICS = {
    "loss/total",
    "loss/rec",
    "loss/reward",
    "loss/cont",
    "loss/dyn",
    "loss/rep",
    "kl/dyn_raw",
    "token_nll",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes(layout: str) -> None:
    model = make(layout)
    assert isinstance(model, WorldModel) and model.kind == "storm" and model.max_length == 16
    batch = make_batch()
    total, metrics = model.loss(batch)
    assert total.shape == () and total.requires_grad
    assert set(metrics) == METRICS
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    roll = model.imagine(batch.obs[:, :3], batch.action[:, :3], batch.action[:, 3:7])
    assert roll.obs.shape == (2, 5, 3, 64, 64)
    assert roll.reward.shape == roll.cont.shape == (2, 5)
    assert roll.obs.min() >= 0 and roll.obs.max() <= 1
    assert roll.cont.min() >= 0 and roll.cont.max() <= 1
    rec = model.reconstruct(batch.obs)
    assert rec.shape == batch.obs.shape and rec.min() >= 0 and rec.max() <= 1
    assert model.predict_one_step(batch.obs, batch.action).shape == (2, 7, 3, 64, 64)
    assert model.token_nll_per_step(batch.obs, batch.action).shape == (2, 7)
    n = 8 * (2 if layout == "interleaved" else 1)
    assert model.attention_maps(batch.obs, batch.action).shape == (2, 2, 2, n, n)


def test_gradients_reach_encoder_through_straight_through_sample() -> None:
    model = make()
    model.config.loss.rep_scale = 0.0  # the only encoder path left is the ST sample
    total, _ = model.loss(make_batch())
    total.backward()
    assert model.vae.encoder.convs[0].weight.grad.abs().sum() > 0
    assert model.vae.encoder.to_logits.weight.grad.abs().sum() > 0
    assert model.embed.net[0].weight.grad.abs().sum() > 0
    assert model.prior.linear.weight.grad.abs().sum() > 0


def test_reconstruction_loss_is_the_per_frame_squared_error() -> None:
    """``loss/rec`` = mean over frames of sum over C,H,W of (decode(z) - obs)^2."""
    model, batch = make(), make_batch()
    torch.manual_seed(3)
    _, metrics = model.loss(batch)
    torch.manual_seed(3)  # the same posterior draws
    z = model.vae.sample(model.encode(batch.obs))
    expected = (model.decode(z) - batch.obs).square().sum((2, 3, 4)).mean()
    torch.testing.assert_close(metrics["loss/rec"], expected.detach())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["mode", "sample"])
def test_cached_imagination_equals_full_forward(layout: str, mode: str) -> None:
    model = make(layout, max_length=12).eval()
    batch = make_batch(b=3, t=12)
    args = (batch.obs[:, :4], batch.action[:, :4], batch.action[:, 4:11])  # C + H - 1 = 11
    torch.manual_seed(7)
    fast = model.imagine(*args, mode=mode)
    torch.manual_seed(7)
    slow = model.imagine(*args, mode=mode, use_cache=False)
    assert fast.obs.shape == (3, 8, 3, 64, 64)
    for a, b in ((fast.obs, slow.obs), (fast.reward, slow.reward), (fast.cont, slow.cont)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if mode == "sample":  # sampling really happened: another seed gives another rollout
        torch.manual_seed(8)
        other = model.imagine(*args, mode=mode)
        assert (other.obs - fast.obs).abs().max() > 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
def test_latent_rollout_is_the_frames_rollout_before_decoding(use_cache: bool) -> None:
    model = make(max_length=12).train()
    batch = make_batch(b=3, t=12)
    args = (batch.obs[:, :4], batch.action[:, :4], batch.action[:, 4:11])
    torch.manual_seed(3)
    latent = model.imagine_latent(*args, use_cache=use_cache)
    assert model.training  # the mode is restored, as by imagine
    torch.manual_seed(3)
    roll = model.imagine(*args, use_cache=use_cache)
    assert latent.z.shape == (3, 8, model.categoricals, model.classes) and latent.h.shape == (
        3,
        8,
        32,
    )
    assert torch.equal(latent.z.argmax(-1), (latent.z > 0.5).float().argmax(-1))
    torch.testing.assert_close(latent.z.sum(-1), torch.ones(3, 8, model.categoricals))  # one-hot
    torch.testing.assert_close(latent.reward, roll.reward, atol=0, rtol=0)
    torch.testing.assert_close(latent.cont, roll.cont, atol=0, rtol=0)
    with torch.no_grad():
        frames = model.eval().decode(latent.z).clamp(0.0, 1.0)
    torch.testing.assert_close(frames, roll.obs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="max_length=12"):
        model.imagine_latent(*args[:2], torch.zeros(3, 9, dtype=torch.long))  # 4 + 10 - 1


def test_imagine_checks_length_and_restores_mode() -> None:
    model = make(max_length=10).train()
    batch = make_batch(t=12)
    model.imagine(batch.obs[:, :4], batch.action[:, :4], batch.action[:, 4:10])  # 4 + 7 - 1
    assert model.training
    with pytest.raises(ValueError, match=r"context 4 \+ horizon 8 .*max_length=10"):
        model.imagine(batch.obs[:, :4], batch.action[:, :4], batch.action[:, 4:11])
    with pytest.raises(ValueError, match="max_length=10"):
        model.loss(make_batch(t=11))
    model.eval()
    model.reconstruct(batch.obs)
    assert not model.training


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_step_outputs_are_causal(layout: str) -> None:
    model = make(layout)
    batch = make_batch(t=8)
    base = model.predict_one_step(batch.obs, batch.action)  # [B, 7, ...]: frame t+1 from <= t
    t = 3
    obs, action = batch.obs.clone(), batch.action.clone()
    obs[:, t + 1 :] = torch.rand_like(obs[:, t + 1 :])
    action[:, t + 1 :] = (action[:, t + 1 :] + 1) % A
    changed = model.predict_one_step(obs, action)
    torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
    assert (changed[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4
    # a_t itself must reach h_t (the prediction of frame t+1): no off-by-one in the layout
    action2 = batch.action.clone()
    action2[:, t] = (action2[:, t] + 1) % A
    nll = model.token_nll_per_step(batch.obs, batch.action)
    nll2 = model.token_nll_per_step(batch.obs, action2)
    torch.testing.assert_close(nll2[:, :t], nll[:, :t], atol=1e-5, rtol=0)
    assert (nll2[:, t] - nll[:, t]).abs().min() > 1e-4


def block_batch(b: int = 2, t: int = 8, size: int = 32) -> Batch:
    """Learnable data: frames of random 4x4 colour blocks; reward and cont follow a_t."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(b, t, 3, 4, 4, generator=g)
    obs = blocks.repeat_interleave(size // 4, -1).repeat_interleave(size // 4, -2)
    action = torch.randint(0, A, (b, t), generator=g)
    return Batch(obs, action, (action - 2).float(), (action != 0).float())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_can_fit_a_tiny_batch(layout: str) -> None:
    cfg = small_config(layout, max_length=8)
    cfg.data.image_size = 32  # 4x fewer pixels: the test stays ~2 s
    torch.manual_seed(0)
    model = STORMWorldModel(cfg, A)
    batch = block_batch()
    mean_frame = batch.obs.mean((0, 1), keepdim=True)
    mean_frame_rec = (batch.obs - mean_frame).square().sum((2, 3, 4)).mean()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _, first = model.loss(batch)
    for _ in range(200):
        opt.zero_grad()
        total, _ = model.loss(batch)
        total.backward()
        opt.step()
    _, last = model.loss(batch)
    assert last["loss/total"] < 0.25 * first["loss/total"]
    assert last["loss/rec"] < 0.6 * mean_frame_rec  # the latents carry the frames
    assert last["loss/reward"] < 0.3 * first["loss/reward"]  # a_t reaches h_t
    assert last["token_nll"] < 0.6 * first["token_nll"]  # the prior learns z_{t+1}


def test_paper_parameter_count() -> None:
    model = STORMWorldModel(get_profile("paper"), action_dim=18)
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in model.parts().items()}
    total = sum(p.numel() for p in model.parameters()) / 1e6
    for name, count in counts.items():
        print(f"{name:>18}: {count:6.2f} M")
    print(f"{'total':>18}: {total:6.2f} M (reference 16.51 M)")
    assert sum(counts.values()) == pytest.approx(total, rel=1e-9)  # parts cover the model
    assert total == pytest.approx(16.51, rel=0.02)
    reference = {
        "encoder": 0.69 + 4.19,  # convs + the posterior Linear
        "sequence model": 5.03,
        "prior head": 4.72 - 4.19,
        "decoder": 4.88,
        "reward head": 0.66,
        "continuation head": 0.53,
    }
    for name, ref in reference.items():
        assert counts[name] == pytest.approx(ref, rel=0.03), name


def test_bad_actions_are_clear_errors() -> None:
    model = make()
    batch = make_batch()
    batch.action[0, 2] = A
    with pytest.raises(ValueError, match=rf"\[0, {A}\)"):  # loss() skips it: fit checks data
        model.predict_one_step(batch.obs, batch.action)
    batch.action[0, 2] = -1
    with pytest.raises(ValueError, match="action_dim"):
        model.imagine(batch.obs[:, :2], batch.action[:, :2], batch.action[:, 2:])
    good = make_batch()
    with pytest.raises(ValueError, match="action_dim"):
        model.imagine(good.obs[:, :2], good.action[:, :2], torch.full((2, 3), A))
    with pytest.raises(ValueError, match="integer"):
        model.imagine(good.obs[:, :2], good.action[:, :2].float(), good.action[:, 2:4])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.imagine(good.obs[:, :2], good.action[:, :3], good.action[:, 3:4])
