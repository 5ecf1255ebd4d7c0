"""Token churn and per-categorical predictability (``diagnostics.token_statistics``) on a
stand-in whose latents are known, and on both real models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storm_lib import build_world_model, get_profile
from storm_lib.diagnostics import token_sentence, token_statistics
from storm_lib.models.base import LatentPredictions
from storm_lib.plots import plot_token_statistics
from storm_lib.types import Batch

N, T, K, V = 3, 6, 2, 8


class KnownLatents(nn.Module):
    """Categorical 0 takes class t at frame t (it changes every step); categorical 1 keeps
    class 0. The prior is right about categorical 1 always, and about categorical 0 only at
    even t. Posteriors are exactly one-hot, so two samples never differ."""

    def latent_predictions(self, obs: Tensor, action: Tensor) -> LatentPredictions:
        b, t = action.shape
        steps = torch.arange(t).expand(b, t)
        post = torch.stack([steps, torch.zeros_like(steps)], -1)  # [b, T, K]
        guess = post[:, 1:].clone()
        guess[:, 1::2, 0] = 0  # wrong at odd t (the true class there is t + 1 >= 2)
        as_log = lambda idx: F.one_hot(idx, V).float().log()  # noqa: E731
        return LatentPredictions(as_log(post), as_log(guess))


def windows(changed_pixels: int) -> Batch:
    obs = torch.zeros(N, T, 3, 8, 8)
    for t in range(1, T):  # frame t differs from frame t-1 in `changed_pixels` pixels
        obs[:, t] = obs[:, t - 1]
        obs[:, t, 1].view(N, -1)[:, (t - 1) * changed_pixels : t * changed_pixels] += 0.5
    action = torch.zeros(N, T, dtype=torch.long)
    return Batch(obs, action, torch.zeros(N, T), torch.ones(N, T))


def test_known_latents_give_known_statistics() -> None:
    stats = token_statistics(KnownLatents(), windows(changed_pixels=4))
    assert stats.steps == N * (T - 1) and stats.categoricals == K
    np.testing.assert_allclose(stats.pixel_change, 4 / 64)
    np.testing.assert_array_equal(stats.changed, 1)  # only categorical 0 changes
    assert stats.resampled == 0.0  # exactly one-hot posteriors
    np.testing.assert_allclose(stats.entropy, 0.0)
    np.testing.assert_allclose(stats.change_rate, [1.0, 0.0])
    right = 3 / 5  # t = 0, 2, 4 of the 5 transitions
    np.testing.assert_allclose(stats.accuracy, [right, 1.0])
    assert stats.accuracy_on_change[0] == pytest.approx(right)
    assert math.isnan(stats.accuracy_on_change[1]) and math.isnan(stats.accuracy_on_stay[0])
    assert stats.accuracy_on_stay[1] == 1.0
    assert stats.errors_per_frame == pytest.approx(1 - right)
    assert stats.errors_on_change_per_frame == pytest.approx(1 - right)
    assert stats.accuracy_on_changes == pytest.approx(right)
    bins = stats.churn_by_pixel_change([0.0, 0.05, 0.1, 1.0])
    assert bins == [(pytest.approx(4 / 64), 1.0, N * (T - 1))]  # empty bins left out
    sentence = token_sentence(stats, "known")
    assert "changes on 0%-100% of the steps" in sentence and "predicts 60%" in sentence


def test_a_static_clip_has_no_churn_and_no_pixel_change() -> None:
    stats = token_statistics(KnownLatents(), windows(changed_pixels=0))
    assert (stats.pixel_change == 0).all()


@pytest.mark.parametrize("kind", ["storm", "rssm"])
def test_real_models_statistics_are_bounded_and_leave_rng_alone(kind: str) -> None:
    config = get_profile("smoke")
    torch.manual_seed(0)
    model = build_world_model(kind, config, 4, "cpu").train()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.rand(4, 5, 3, 64, 64, generator=g), torch.randint(0, 4, (4, 5)),
                  torch.zeros(4, 5), torch.ones(4, 5))  # fmt: skip
    before = torch.get_rng_state()
    stats = token_statistics(model, batch, batch_size=3)
    assert torch.equal(before, torch.get_rng_state()) and model.training
    assert stats.steps == 16 and stats.categoricals == config.vae.categoricals
    assert stats.changed.min() >= 0 and stats.changed.max() <= stats.categoricals
    assert 0 <= stats.resampled <= stats.categoricals
    assert np.all((stats.accuracy >= 0) & (stats.accuracy <= 1))
    assert np.all((stats.entropy >= 0) & (stats.entropy <= math.log(config.vae.classes) + 1e-6))
    again = token_statistics(model, batch, batch_size=3)  # seeded: the same measurement
    assert again.resampled == stats.resampled
    json.dumps(stats.to_dict())
    plot_token_statistics({kind: stats})
