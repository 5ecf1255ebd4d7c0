"""Categorical VAE (STORM appendix tables 3 and 4) and its straight-through sampling.

The encoder maps a frame to K categorical distributions of V classes (32x32 in the
paper) with ``unimix`` of the uniform mixed in; a one-hot sample ``z`` is drawn with
straight-through gradients (:func:`straight_through_sample`), and the decoder maps ``z``
back to pixels. The RSSM and the dynamics heads use the same categorical latents.

The convs run through ``speedups.run_convs`` and ``speedups.conv_layout``, which are
``layers(x)`` and ``x`` unless the speed-ups are on (``speedups.py`` says what they do).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig
from . import speedups


# ------------------------------------------------------------------ categorical latents
def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Mix ``unimix`` of the uniform distribution into categorical logits ``[..., V]``.

    Returns log-probabilities, so ``softmax`` of the result is the mixed distribution.
    """
    if unimix <= 0.0:
        return logits.log_softmax(-1)
    probs = logits.float().softmax(-1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return probs.log()


def draw_index(probs: Tensor, mode: str) -> Tensor:
    """``probs [..., V] -> [...]`` class indices: ``"sample"`` draws one, ``"mode"`` takes
    the argmax."""
    if mode == "sample":
        return speedups.sample_index(probs)
    if mode == "mode":
        return probs.argmax(-1)
    raise ValueError(f"mode must be 'sample' or 'mode', got {mode!r}")


def straight_through_sample(log_probs: Tensor, mode: str = "sample") -> Tensor:
    """One-hot sample ``[..., K, V]`` with straight-through gradients to ``log_probs``.

    The forward value is the one-hot of :func:`draw_index`; the gradient is that of the
    probabilities: ``one_hot + p - sg(p)``. Without autograd (imagination, evaluation)
    the exact one-hot is returned.
    """
    probs = log_probs.exp()
    one_hot = F.one_hot(draw_index(probs, mode), probs.shape[-1]).to(probs.dtype)
    if not probs.requires_grad:
        return one_hot
    return one_hot + probs - probs.detach()


# ------------------------------------------------------------------------------ networks
def frames_for_convs(obs: Tensor) -> Tensor:
    """``[B, T, 3, S, S] -> [B*T, 3, S, S]``, in the layout the convs run in and the decoder
    outputs (so a loss against its output needs no relayout)."""
    return speedups.conv_layout(obs.flatten(0, 1))


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.GroupNorm(1, channels)


class Encoder(nn.Module):
    """Frames ``[N, 3, S, S]`` in [0, 1] -> posterior log-probs ``[N, K, V]``.

    Conv(k4, s2, p1) + BN + ReLU stages, each doubling the channels from
    ``stem_channels``, then Flatten and one Linear to ``K * V`` logits (table 3).
    """

    def __init__(self, cfg: VAEConfig, image_size: int = 64) -> None:
        super().__init__()
        if image_size % (2**cfg.stages):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{cfg.stages}")
        layers: list[nn.Module] = []
        channels_in, channels = 3, cfg.stem_channels
        for _ in range(cfg.stages):
            layers += [
                nn.Conv2d(channels_in, channels, 4, 2, 1, bias=not cfg.batch_norm),
                _norm(channels, cfg.batch_norm),
                nn.ReLU(inplace=True),
            ]
            channels_in, channels = channels, channels * 2
        self.convs = nn.Sequential(*layers)
        self.final_channels = channels_in
        self.final_size = image_size // 2**cfg.stages
        self.feature_dim = channels_in * self.final_size**2
        self.categoricals, self.classes, self.unimix = cfg.categoricals, cfg.classes, cfg.unimix
        self.to_logits = nn.Linear(self.feature_dim, self.categoricals * self.classes)

    def features(self, obs: Tensor) -> Tensor:
        """Flattened conv features ``[N, feature_dim]`` (the RSSM's embedding)."""
        return speedups.run_convs(self.convs, obs - 0.5).flatten(1)

    def forward(self, obs: Tensor) -> Tensor:
        """``[N, 3, S, S] -> [N, K, V]`` log-probabilities with unimix."""
        logits = self.to_logits(self.features(obs)).view(-1, self.categoricals, self.classes)
        return unimix_logits(logits, self.unimix)


class Decoder(nn.Module):
    """Latents ``[N, in_dim]`` -> frames ``[N, 3, S, S]`` (table 4, unbounded output).

    Linear + BN + ReLU to the encoder's final feature map, then transposed convs
    halving the channels; the last one outputs 3 channels with no norm or activation.
    The RSSM passes ``in_dim = deter + K*V`` instead of ``K*V``.
    """

    def __init__(self, cfg: VAEConfig, in_dim: int, image_size: int = 64) -> None:
        super().__init__()
        channels = cfg.stem_channels * 2 ** (cfg.stages - 1)
        self.start_channels, self.start_size = channels, image_size // 2**cfg.stages
        flat = channels * self.start_size**2
        self.stem = nn.Sequential(
            nn.Linear(in_dim, flat, bias=not cfg.batch_norm),
            nn.BatchNorm1d(flat) if cfg.batch_norm else nn.LayerNorm(flat),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        for _ in range(cfg.stages - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=not cfg.batch_norm),
                _norm(channels // 2, cfg.batch_norm),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers.append(nn.ConvTranspose2d(channels, 3, 4, 2, 1))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, latent: Tensor) -> Tensor:
        """``[N, in_dim] -> [N, 3, S, S]``; add 0.5 to read as pixels in [0, 1]."""
        x = self.stem(latent).view(-1, self.start_channels, self.start_size, self.start_size)
        return speedups.run_convs(self.deconvs, speedups.conv_layout(x)) + 0.5


class CategoricalVAE(nn.Module):
    """Encoder, straight-through sampling and decoder in one module.

    Args:
        cfg: widths, K, V and unimix.
        image_size: S, the side of the square RGB frames.

    Shapes:
        encode: ``[N, 3, S, S] -> [N, K, V]`` log-probs.
        sample: ``[N, K, V] -> [N, K, V]`` one-hot (straight-through).
        decode: ``[N, K, V] -> [N, 3, S, S]``.
    """

    def __init__(self, cfg: VAEConfig, image_size: int = 64) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, image_size)
        self.decoder = Decoder(cfg, cfg.categoricals * cfg.classes, image_size)

    def encode(self, obs: Tensor) -> Tensor:
        """Frames ``[N, 3, S, S]`` -> posterior log-probs ``[N, K, V]``."""
        return self.encoder(obs)

    @staticmethod
    def sample(log_probs: Tensor, mode: str = "sample") -> Tensor:
        """Straight-through one-hot ``[N, K, V]``: a sample, or the argmax with ``"mode"``."""
        return straight_through_sample(log_probs, mode)

    def decode(self, z: Tensor) -> Tensor:
        """One-hot latents ``[N, K, V]`` -> frames ``[N, 3, S, S]`` (unclamped)."""
        return self.decoder(z.flatten(1))
