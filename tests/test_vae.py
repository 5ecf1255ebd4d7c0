"""Categorical VAE (storm_lib.nets.vae): eval-mode BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from storm_lib.config import VAEConfig
from storm_lib.nets import vae as vae_module
from storm_lib.nets.vae import CategoricalVAE, run_conv_stack


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
    folded, fold = [], vae_module._folded_conv
    monkeypatch.setattr(vae_module, "_folded_conv", lambda *a: folded.append(1) or fold(*a))
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last) - 0.5
    latent = torch.randn(4, vae.decoder.stem[0].in_features)
    decoder_in = vae.decoder.stem(latent).view(4, -1, 4, 4)
    with torch.no_grad():
        for stack, inp in ((vae.encoder.convs, x), (vae.decoder.deconvs, decoder_in)):
            torch.testing.assert_close(run_conv_stack(stack, inp), stack(inp), rtol=1e-5, atol=1e-5)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in vae.modules())
    assert len(folded) == norms and (norms > 0) == batch_norm  # every conv + BN pair folded
    vae.train()
    assert torch.equal(run_conv_stack(vae.encoder.convs, x), vae.encoder.convs(x))
