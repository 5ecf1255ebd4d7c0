"""The speed-ups (storm_lib.models.speedups) compute what the plain operations compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from storm_lib.config import VAEConfig, get_profile
from storm_lib.models import build_world_model, speedups
from storm_lib.models.transformer import attention
from storm_lib.models.vae import CategoricalVAE
from storm_lib.types import Batch


@pytest.fixture(params=[True, False], ids=["speedups", "plain"])
def path(request):
    """Runs a test once with the speed-ups on and once on the plain path."""
    before = speedups.enabled()
    speedups.set_enabled(request.param)
    yield request.param
    speedups.set_enabled(before)


def vae_with_statistics(batch_norm: bool = True) -> CategoricalVAE:
    """A small VAE whose BatchNorms hold non-trivial running statistics and affines."""
    torch.manual_seed(0)
    vae = CategoricalVAE(VAEConfig(stem_channels=8, stages=3, batch_norm=batch_norm), 32)
    for m in vae.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return vae.eval()


@pytest.mark.parametrize("batch_norm", [True, False])
def test_eval_folding_equals_module_by_module(batch_norm: bool, monkeypatch) -> None:
    vae = vae_with_statistics(batch_norm)
    folded, fold = [], speedups._folded_conv
    monkeypatch.setattr(speedups, "_folded_conv", lambda *a: folded.append(1) or fold(*a))
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last) - 0.5
    latent = torch.randn(4, vae.decoder.stem[0].in_features)
    decoder_in = vae.decoder.stem(latent).view(4, -1, 4, 4)
    with torch.no_grad():
        for stack, inp in ((vae.encoder.convs, x), (vae.decoder.deconvs, decoder_in)):
            torch.testing.assert_close(
                speedups.run_convs(stack, inp), stack(inp), rtol=1e-5, atol=1e-5
            )
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in vae.modules())
    assert len(folded) == norms and (norms > 0) == batch_norm  # every conv + BN pair folded
    with speedups.plain():
        assert torch.equal(speedups.run_convs(vae.encoder.convs, x), vae.encoder.convs(x))
    assert len(folded) == norms  # the plain path folds nothing
    vae.train()
    assert torch.equal(speedups.run_convs(vae.encoder.convs, x), vae.encoder.convs(x))


def test_plain_switch_restores_the_setting() -> None:
    assert speedups.enabled()
    with speedups.plain():
        assert not speedups.enabled()
        x = torch.rand(2, 3, 8, 8)
        assert speedups.conv_layout(x) is x
    assert speedups.enabled()
    assert speedups.conv_layout(x).is_contiguous(memory_format=torch.channels_last)


def test_sampling_has_the_given_frequencies_and_skips_zeros(path: bool) -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    n = 200_000
    for scale in (1.0, 3.0):  # unnormalised weights draw the same distribution
        index = speedups.sample_index((probs * scale).expand(n, 5))
        assert index.shape == (n,) and index.dtype == torch.long
        freq = torch.bincount(index, minlength=5).double() / n
        assert freq[1] == 0 and freq[4] == 0
        sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all(), freq


def test_sampling_rows_are_independent_and_shaped(path: bool) -> None:
    torch.manual_seed(1)
    probs = torch.eye(4)[[2, 0, 3, 1]].expand(6, 4, 4)  # each row certain of one class
    assert torch.equal(speedups.sample_index(probs), torch.tensor([2, 0, 3, 1]).expand(6, 4))


@pytest.mark.parametrize(("queries", "start"), [(5, 0), (1, 0), (1, 4), (3, 4)])
def test_fused_attention_equals_the_plain_formula(queries: int, start: int) -> None:
    torch.manual_seed(2)
    q = torch.randn(2, 3, queries, 8)
    k, v = torch.randn(2, 3, start + queries, 8), torch.randn(2, 3, start + queries, 8)
    fused = attention(q, k, v, start, 0.0)
    with speedups.plain():
        plain = attention(q, k, v, start, 0.0)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    # query i sees keys 0..start+i: changing a later key never changes it
    k2 = k.clone()
    k2[:, :, -1] += 10.0
    with speedups.plain():
        changed = attention(q, k2, v, start, 0.0)
    torch.testing.assert_close(changed[:, :, :-1], plain[:, :, :-1])


@pytest.mark.parametrize("kind", ["storm", "rssm"])
def test_whole_models_agree_on_both_paths(kind: str, monkeypatch) -> None:
    # the samplers are compared by distribution above; here both paths take the same
    # draws, so the layouts, the folding and the attention are what is compared
    monkeypatch.setattr(speedups, "sample_index", lambda probs: probs.argmax(-1))
    config = get_profile("smoke")
    config.transformer.dropout = 0.0
    torch.manual_seed(3)
    model = build_world_model(kind, config, 4, "cpu")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has work to do
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    obs = torch.rand(2, 6, 3, 64, 64)
    action = torch.randint(0, 4, (2, 6))
    batch = Batch(obs, action, torch.randn(2, 6), torch.ones(2, 6))
    results = []
    for on in (True, False):
        speedups.set_enabled(on)
        try:
            torch.manual_seed(4)
            loss, _ = copy.deepcopy(model).loss(batch)  # a loss updates BatchNorm statistics
            roll = model.imagine(obs[:, :4], action[:, :4], action[:, 4:], mode="mode")
            results.append((loss.detach(), roll.obs, model.reconstruct(obs, action)))
        finally:
            speedups.set_enabled(True)
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


def test_plain_by_name_turns_off_only_those() -> None:
    with speedups.plain("rssm_inputs"):
        assert not speedups.enabled("rssm_inputs") and speedups.enabled("inverse_cdf")
        with speedups.plain():
            assert not speedups.enabled() and not speedups.enabled("inverse_cdf")
        assert speedups.enabled() and not speedups.enabled("rssm_inputs")
    assert all(speedups.enabled(name) for name in speedups.NAMES)
    with pytest.raises(ValueError, match="unknown speed-up"):
        speedups.enabled("turbo")
    with pytest.raises(ValueError, match="unknown speed-up"), speedups.plain("turbo"):
        pass
