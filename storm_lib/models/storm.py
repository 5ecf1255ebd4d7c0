"""STORM world model (Zhang et al. 2023): categorical VAE + action mixer + causal Transformer.

Training (paper eq. 3-5): encode every frame to a posterior ``q(z_t | o_t)``, take a
straight-through sample, reconstruct the frame from it, run the Transformer over the
tokens of ``(z_t, a_t)`` to get ``h_t``, and from ``h_t`` predict the prior of
``z_{t+1}``, the reward ``r_t`` and the continuation ``c_t``.

Imagination: encode C real frames, prefill the KV cache with their tokens in one pass,
then repeatedly sample ``z`` from the prior and append its token (``imagine_latent``);
``imagine`` then decodes all imagined latents to frames in one decoder call.

Example:
    >>> from storm_lib.config import get_profile
    >>> model = STORMWorldModel(get_profile("smoke"), action_dim=6)
    >>> obs = torch.rand(2, 8, 3, 64, 64)
    >>> roll = model.imagine(obs, torch.zeros(2, 8, dtype=torch.long),
    ...                      torch.zeros(2, 4, dtype=torch.long))
    >>> roll.obs.shape
    torch.Size([2, 5, 3, 64, 64])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..types import Batch, ImagineMode, Rollout
from ..utils import evaluating
from .base import LatentPredictions, WorldModel
from .heads import ContinueHead, RewardHead
from .maskgit import build_prior_head
from .transformer import ActionMixer, CausalTransformer, InterleavedEmbedding
from .vae import CategoricalVAE, frames_for_convs


@dataclass
class LatentRollout:
    """:meth:`STORMWorldModel.imagine_latent`'s output: the rollout before decoding.

    Shapes:
        ``z [B, H, K, V]`` one-hot latents, ``h [B, H, D]`` the Transformer state each was
        sampled from, ``reward [B, H]`` expected rewards, ``cont [B, H]`` probabilities.
    """

    z: Tensor
    h: Tensor
    reward: Tensor
    cont: Tensor


class STORMWorldModel(WorldModel):
    """STORM: categorical VAE, action mixer, causal Transformer, prior/reward/cont heads.

    Args:
        config: the whole profile (``vae``, ``transformer``, ``heads``, ``loss``, ``data``).
        action_dim: A, the number of discrete actions.

    Attributes:
        max_length: the longest window, in time steps, the positional table covers
            (``loss`` needs ``T <= max_length``, ``imagine`` needs ``C + H - 1 <= max_length``).
    """

    kind = "storm"

    def __init__(self, config: Config, action_dim: int) -> None:
        super().__init__(config, action_dim)
        tcfg = config.transformer
        self.max_length = tcfg.max_length
        latent_dim, d = self.categoricals * self.classes, tcfg.width
        self.vae = CategoricalVAE(config.vae, self.image_size)
        if tcfg.token_layout == "fused":
            self.embed: ActionMixer | InterleavedEmbedding = ActionMixer(
                latent_dim, self.action_dim, d
            )
        elif tcfg.token_layout == "interleaved":
            self.embed = InterleavedEmbedding(latent_dim, self.action_dim, d)
        else:
            raise ValueError(
                f"token_layout must be 'fused' or 'interleaved', got {tcfg.token_layout!r}"
            )
        self.transformer = CausalTransformer(tcfg)
        self.prior = build_prior_head(config, d)  # MLP (STORM) or MaskGIT (GIT-STORM)
        self.reward_head = RewardHead(d, d, config.heads)
        self.cont_head = ContinueHead(d, d, config.heads)

    def parts(self) -> dict[str, nn.Module]:
        """Named parts for parameter counts (the encoder includes its posterior Linear)."""
        return {
            "encoder": self.vae.encoder,
            "sequence model": nn.ModuleList([self.embed, self.transformer]),
            "prior head": self.prior,
            "decoder": self.vae.decoder,
            "reward head": self.reward_head,
            "continuation head": self.cont_head,
        }

    # ----------------------------------------------------------------- building blocks
    def encode(self, obs: Tensor) -> Tensor:
        """Posterior log-probs: ``[B, T, 3, S, S] -> [B, T, K, V]`` (one encoder call)."""
        shape = (*obs.shape[:2], self.categoricals, self.classes)
        return self.vae.encode(frames_for_convs(obs)).view(shape)

    def decode(self, z: Tensor) -> Tensor:
        """Frames from latents: ``[B, T, K, V] -> [B, T, 3, S, S]`` (unclamped)."""
        s = self.image_size
        return self.vae.decode(z.flatten(0, 1)).reshape(*z.shape[:2], 3, s, s)

    def tokens(self, z: Tensor, action: Tensor) -> Tensor:
        """``z [B, T, K, V], action [B, T] -> [B, T * tokens_per_step, D]``."""
        return self.embed(z.flatten(-2), action)

    def sequence(self, z: Tensor, action: Tensor) -> Tensor:
        """Full causal forward: ``z [B, T, K, V], action [B, T] -> h [B, T, D]``."""
        return self.embed.states(self.transformer(self.tokens(z, action)))

    # ----------------------------------------------------------------------- training
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """STORM's world-model loss (eq. 3-5) on a batch of windows.

        ``rec`` is :meth:`reconstruction_loss` of frames decoded from the posterior sample.
        ``dyn``/``rep`` compare ``prior(h_t)`` with ``post(z_{t+1})`` for t < T-1; the
        dynamics head computes them (``heads.dynamics_head``): over all K categoricals for
        the MLP prior, over the masked ones (rescaled to K) for the MaskGIT prior
        (``maskgit.py``, GIT-STORM eq. 3-4), and so is ``token_nll``.

        Args:
            batch: ``obs [B, T, 3, S, S]``, ``action/reward/cont [B, T]``.

        Returns:
            The scalar total and detached 0-d metric tensors (``loss/total``, ``loss/rec``,
            ``loss/reward``, ``loss/cont``, ``loss/dyn``, ``loss/rep``, ``kl/dyn_raw``,
            ``token_nll`` in nats per frame).
        """
        b, t = self.check_batch(batch)
        frames = frames_for_convs(batch.obs)  # [B*T, 3, S, S]
        post = self.vae.encode(frames).view(b, t, self.categoricals, self.classes)
        z = self.vae.sample(post)  # [B, T, K, V]
        rec = self.reconstruction_loss(self.vae.decode(z.flatten(0, 1)), frames)
        h = self.sequence(z, batch.action)  # [B, T, D]
        # the prior of z_1..z_{T-1} from h_0..h_{T-2}
        prior = self.prior.losses(h[:, :-1], post[:, 1:], z[:, 1:], self.config.loss.free_bits)
        reward = self.reward_head.loss(self.reward_head(h), batch.reward)
        cont = F.binary_cross_entropy_with_logits(self.cont_head(h), batch.cont.to(h.dtype))
        return self.total_loss(rec, reward, cont, prior)

    # ---------------------------------------------------------------------- inference
    def reconstruct(
        self, obs: Tensor, action: Tensor | None = None, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Encode -> posterior argmax (``mode="mode"``) or sample (``"sample"``) -> decode,
        clamped: ``[B, T, 3, S, S] -> same``. STORM's decoder sees ``z`` alone, so the
        actions are not needed (the argument keeps one signature for both models)."""
        self.check_obs(obs)
        with evaluating(self):
            return self.decode(self.vae.sample(self.encode(obs), mode)).clamp(0.0, 1.0)

    def posterior_log_probs(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """``q(z_t | o_t)`` as log-probabilities: ``[B, T, 3, S, S] -> [B, T, K, V]``."""
        self.check_obs(obs)
        with evaluating(self):
            return self.encode(obs)

    def _rollout(
        self, obs: Tensor, actions: Tensor, future: Tensor, mode: ImagineMode, use_cache: bool
    ) -> Rollout:
        """:meth:`imagine` after its checks, in eval mode: the rollout in latent space
        (:meth:`imagine_latent`), then one decoder call on all ``B * H`` latents."""
        latent = self._latent_rollout(obs, actions, future, mode, use_cache)
        frames = self.decode(latent.z).clamp(0.0, 1.0)
        return Rollout(obs=frames, reward=latent.reward, cont=latent.cont)

    def imagine_latent(
        self, context_obs: Tensor, context_actions: Tensor, future_actions: Tensor, *,
        mode: ImagineMode = "sample", use_cache: bool = True,
    ) -> LatentRollout:  # fmt: skip
        """The rollout of :meth:`imagine` without decoding frames (what policy learning uses).

        STORM's agent learns in imagination from ``(z, h)``, reward and continuation alone;
        only figures need pixels, so this is the path whose cost the KV cache decides.
        Same arguments, checks and random draws as :meth:`imagine`.

        Returns:
            :class:`LatentRollout`: ``z [B, H, K, V]`` one-hot, ``h [B, H, D]``,
            ``reward [B, H]``, ``cont [B, H]`` (probabilities).
        """
        self.check_rollout(context_obs, context_actions, future_actions)
        self.check_mode(mode)
        with evaluating(self):
            return self._latent_rollout(
                context_obs, context_actions, future_actions, mode, use_cache
            )  # fmt: skip

    def _latent_rollout(
        self, obs: Tensor, actions: Tensor, future: Tensor, mode: ImagineMode, use_cache: bool
    ) -> LatentRollout:
        """Encode the C context frames, prefill the KV cache with their tokens in one pass,
        then H times: draw ``z`` from the prior of the last ``h`` and append its token
        (with ``use_cache=False``, re-run the whole causal forward pass instead)."""
        horizon = future.shape[1] + 1
        z = self.vae.sample(self.encode(obs), mode)  # [B, C, K, V]
        cache = self.transformer.new_cache(obs.shape[0]) if use_cache else None
        seq_z, seq_a = z, actions
        h = self.embed.states(self.transformer(self.tokens(z, actions), cache))[:, -1]
        hs, zs = [], []
        for k in range(horizon):
            z_next = self.prior.sample(h, mode)  # [B, K, V]
            hs.append(h)
            zs.append(z_next)
            if k == horizon - 1:
                break
            a = future[:, k : k + 1]
            if use_cache:
                out = self.transformer(self.tokens(z_next[:, None], a), cache)
            else:
                seq_z = torch.cat([seq_z, z_next[:, None]], 1)
                seq_a = torch.cat([seq_a, a], 1)
                out = self.transformer(self.tokens(seq_z, seq_a))
            h = self.embed.states(out)[:, -1]
        h_all = torch.stack(hs, 1)  # [B, H, D]
        reward = self.reward_head.predict(self.reward_head(h_all))
        cont = torch.sigmoid(self.cont_head(h_all))
        return LatentRollout(z=torch.stack(zs, 1), h=h_all, reward=reward, cont=cont)

    def _teacher_forced(
        self, obs: Tensor, action: Tensor, mode: ImagineMode
    ) -> tuple[Tensor, Tensor]:
        """Posterior samples ``[B, T, K, V]`` and ``h_0..h_{T-2}`` ``[B, T-1, D]``."""
        self.check_window(obs, action)
        z = self.vae.sample(self.encode(obs), mode)
        return z, self.sequence(z, action)[:, :-1]

    def predict_one_step(
        self, obs: Tensor, action: Tensor, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Teacher-forced predictions of frames 1..T-1 from the real history up to t.

        Shapes:
            ``obs [B, T, 3, S, S], action [B, T] -> [B, T-1, 3, S, S]`` in [0, 1].
        """
        with evaluating(self):
            _, h = self._teacher_forced(obs, action, mode)
            return self.decode(self.prior.sample(h, mode)).clamp(0.0, 1.0)

    def latent_predictions(self, obs: Tensor, action: Tensor) -> LatentPredictions:
        """The posterior ``q(z_t | o_t)`` of every frame, and the prior of ``z_{t+1}`` from
        ``h_t`` over the posterior-argmax tokens of the real history (for the MaskGIT head
        its all-masked prediction, what its one-round draft samples from).

        Shapes:
            ``obs [B, T, 3, S, S], action [B, T] ->`` posterior ``[B, T, K, V]``, prior
            ``[B, T-1, K, V]`` (log-probabilities).
        """
        with evaluating(self):
            self.check_window(obs, action)
            posterior = self.encode(obs)
            h = self.sequence(self.vae.sample(posterior, "mode"), action)[:, :-1]
            return LatentPredictions(posterior, self.prior(h))

    def attention_maps(self, obs: Tensor, action: Tensor) -> Tensor:
        """Attention weights for one window (posterior mode tokens).

        Shapes:
            ``obs [B, T, 3, S, S], action [B, T] -> [layers, B, heads, N, N]``,
            N = T (fused) or 2T (interleaved).
        """
        with evaluating(self):
            self.check_window(obs, action)
            z = self.vae.sample(self.encode(obs), "mode")
            return self.transformer.attention_maps(self.tokens(z, action))
