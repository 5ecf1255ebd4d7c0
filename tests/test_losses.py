"""Loss building blocks (storm_lib.losses) and straight-through sampling (models.vae)."""

from __future__ import annotations

import torch

from storm_lib.losses import TwoHot
from storm_lib.models.vae import straight_through_sample


def test_straight_through_sample_is_one_hot_with_probability_gradients() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 8, requires_grad=True)
    log_probs = logits.log_softmax(-1)
    sample = straight_through_sample(log_probs)
    one_hot = sample.detach().round()  # one-hot up to float rounding (1 + p - p)
    assert torch.allclose(sample.detach(), one_hot, atol=1e-6)
    assert torch.equal(one_hot.sum(-1), torch.ones(3, 4))
    (sample * torch.arange(8.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with torch.no_grad():  # without autograd: exactly the one-hot
        plain = straight_through_sample(log_probs, "mode")
    assert torch.equal(plain, torch.nn.functional.one_hot(log_probs.argmax(-1), 8).float())


def test_two_hot_round_trip() -> None:
    two_hot = TwoHot(255, -20.0, 20.0)
    x = torch.tensor([-100.0, -1.5, 0.0, 0.3, 7.0, 1000.0])
    target = two_hot.encode(x)
    assert torch.allclose(target.sum(-1), torch.ones(6))
    assert torch.allclose(two_hot.decode(target.clamp_min(1e-30).log()), x, rtol=1e-3)
