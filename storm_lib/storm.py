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

from .config import Config
from .losses import token_nll
from .nets.heads import ContinueHead, RewardHead
from .nets.maskgit import build_dynamics_head
from .nets.transformer import ActionMixer, CausalTransformer, InterleavedEmbedding
from .nets.vae import CategoricalVAE, frames_channels_last
from .types import Batch, ImagineMode, Rollout
from .utils import evaluating


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


class STORMWorldModel(nn.Module):
    """STORM: categorical VAE, action mixer, causal Transformer, dynamics/reward/cont heads.

    Args:
        config: the whole profile (``vae``, ``transformer``, ``heads``, ``loss``, ``data``).
        action_dim: A, the number of discrete actions.

    Attributes:
        max_length: the longest window, in time steps, the positional table covers
            (``loss`` needs ``T <= max_length``, ``imagine`` needs ``C + H - 1 <= max_length``).
    """

    kind = "storm"

    def __init__(self, config: Config, action_dim: int) -> None:
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        self.config, self.action_dim = config, action_dim
        tcfg, vcfg = config.transformer, config.vae
        self.max_length = tcfg.max_length
        self.image_size = config.data.image_size
        self.k, self.v = vcfg.categoricals, vcfg.classes
        d = tcfg.width
        self.vae = CategoricalVAE(vcfg, self.image_size)
        if tcfg.token_layout == "fused":
            self.embed: ActionMixer | InterleavedEmbedding = ActionMixer(
                self.k * self.v, action_dim, d
            )
        elif tcfg.token_layout == "interleaved":
            self.embed = InterleavedEmbedding(self.k * self.v, action_dim, d)
        else:
            raise ValueError(
                f"token_layout must be 'fused' or 'interleaved', got {tcfg.token_layout!r}"
            )
        self.transformer = CausalTransformer(tcfg)
        self.dynamics = build_dynamics_head(config, d)  # MLP (STORM) or MaskGIT (GIT-STORM)
        self.reward_head = RewardHead(d, d, config.heads)
        self.cont_head = ContinueHead(d, d, config.heads)

    @classmethod
    def from_checkpoint(
        cls, path: str, device: torch.device | str | None = None
    ) -> STORMWorldModel:
        """Rebuild from a file of ``storm_lib.checkpoint.save_checkpoint`` (eval mode)."""
        from .checkpoint import load_checkpoint  # checkpoint.py imports the model classes

        return load_checkpoint(path, device, kind="storm")  # type: ignore[return-value]

    def parts(self) -> dict[str, nn.Module]:
        """Named parts for parameter counts (the encoder includes its posterior Linear)."""
        return {
            "encoder": self.vae.encoder,
            "sequence model": nn.ModuleList([self.embed, self.transformer]),
            "prior head": self.dynamics,
            "decoder": self.vae.decoder,
            "reward head": self.reward_head,
            "continuation head": self.cont_head,
        }

    # ----------------------------------------------------------------- building blocks
    def _check(
        self, obs: Tensor, action: Tensor, *, what: str = "obs", values: bool = True
    ) -> None:
        """Shapes and dtypes; and, with ``values``, the action range (a host sync)."""
        s = self.image_size
        if obs.dim() != 5 or obs.shape[2:] != (3, s, s):
            raise ValueError(f"{what} must be [B, T, 3, {s}, {s}], got {tuple(obs.shape)}")
        if action.shape != obs.shape[:2]:
            raise ValueError(
                f"actions must be [B, T] = {tuple(obs.shape[:2])}, got {tuple(action.shape)}"
            )
        if action.is_floating_point():
            raise ValueError(f"actions must be integer indices, got dtype {action.dtype}")
        if values:
            self._check_actions(action)

    def _check_actions(self, action: Tensor) -> None:
        if action.is_floating_point():
            raise ValueError(f"actions must be integer indices, got dtype {action.dtype}")
        # One host sync per call (rollouts, diagnostics); an out-of-range index would
        # otherwise be an opaque device assert. ``loss`` skips it: fit() checks the data.
        if action.numel() and bool(((action < 0) | (action >= self.action_dim)).any()):
            raise ValueError(
                f"actions must be in [0, {self.action_dim}) for this model (action_dim="
                f"{self.action_dim}); got values in [{int(action.min())}, {int(action.max())}]"
            )

    def _check_length(self, steps: int, what: str) -> None:
        if steps > self.max_length:
            raise ValueError(f"{what} has {steps} steps > max_length={self.max_length}")

    def encode(self, obs: Tensor) -> Tensor:
        """Posterior log-probs: ``[B, T, 3, S, S] -> [B, T, K, V]`` (one encoder call)."""
        return self.vae.encode(frames_channels_last(obs)).view(*obs.shape[:2], self.k, self.v)

    def decode(self, z: Tensor) -> Tensor:
        """Frames from latents: ``[B, T, K, V] -> [B, T, 3, S, S]`` (unclamped)."""
        s = self.image_size
        return self.vae.decode(z.flatten(0, 1)).reshape(*z.shape[:2], 3, s, s)

    def tokens(self, z: Tensor, action: Tensor) -> Tensor:
        """``z [B, T, K, V], action [B, T] -> [B, T * tokens_per_step, D]``."""
        return self.embed(z.flatten(-2), action)

    def sequence(self, z: Tensor, action: Tensor) -> Tensor:
        """Full causal forward: ``z [B, T, K, V], action [B, T] -> h [B, T, D]``."""
        return self.embed.hidden(self.transformer(self.tokens(z, action)))

    # ----------------------------------------------------------------------- training
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """STORM's world-model loss (eq. 3-5) on a batch of windows.

        ``rec`` is the per-frame sum of squared errors over C,H,W (the paper's
        ``||o_hat - o||^2`` as the reference code computes it), averaged over B, T.
        ``dyn``/``rep`` compare ``prior(h_t)`` with ``post(z_{t+1})`` for t < T-1; the
        dynamics head computes them (``heads.dynamics_head``): over all K categoricals for
        the MLP prior, over the masked ones (rescaled to K) for the MaskGIT prior
        (``storm_lib.nets.maskgit``, GIT-STORM eq. 3-4), and so is ``token_nll``.

        Args:
            batch: ``obs [B, T, 3, S, S]``, ``action/reward/cont [B, T]``.

        Returns:
            The scalar total and detached 0-d metric tensors (``loss/total``, ``loss/rec``,
            ``loss/reward``, ``loss/cont``, ``loss/dyn``, ``loss/rep``, ``kl/dyn_raw``,
            ``token_nll`` in nats per frame).
        """
        self._check(batch.obs, batch.action, values=False)  # no per-step sync: fit checks data
        b, t = batch.action.shape
        self._check_length(t, "batch")
        if t < 2:
            raise ValueError(f"loss needs windows of at least 2 steps, got T={t}")
        # the squared error in the decoder's layout (training step 1.06x, 25 pairs)
        frames = frames_channels_last(batch.obs)  # [B*T, 3, S, S]
        post = self.vae.encode(frames).view(b, t, self.k, self.v)  # [B, T, K, V]
        z = self.vae.sample(post)
        rec = (self.vae.decode(z.flatten(0, 1)) - frames).square().sum((1, 2, 3)).mean()
        h = self.sequence(z, batch.action)  # [B, T, D]
        # the prior of z_1..z_{T-1} from h_0..h_{T-2}
        dyn, rep, dyn_raw, nll = self.dynamics.losses(
            h[:, :-1], post[:, 1:], z[:, 1:], self.config.loss.free_bits
        )
        reward = self.reward_head.loss(self.reward_head(h), batch.reward)
        cont = F.binary_cross_entropy_with_logits(self.cont_head(h), batch.cont.to(h.dtype))
        lc = self.config.loss
        total = rec + reward + cont + lc.dyn_scale * dyn + lc.rep_scale * rep
        metrics = {
            "loss/total": total,
            "loss/rec": rec,
            "loss/reward": reward,
            "loss/cont": cont,
            "loss/dyn": dyn,
            "loss/rep": rep,
            "kl/dyn_raw": dyn_raw,
            "token_nll": nll,
        }
        return total, {k: v.detach() for k, v in metrics.items()}

    # ---------------------------------------------------------------------- inference
    def reconstruct(
        self, obs: Tensor, action: Tensor | None = None, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Encode -> posterior argmax (``mode="mode"``) or sample (``"sample"``) -> decode,
        clamped: ``[B, T, 3, S, S] -> same``. STORM's decoder sees ``z`` alone, so the
        actions are not needed (the argument keeps one signature for both models)."""
        with evaluating(self):
            return self.decode(self.vae.sample(self.encode(obs), mode)).clamp(0.0, 1.0)

    def posterior_log_probs(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """``q(z_t | o_t)`` as log-probabilities: ``[B, T, 3, S, S] -> [B, T, K, V]``."""
        with evaluating(self):
            return self.encode(obs)

    def imagine(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
        use_cache: bool = True,
    ) -> Rollout:
        """Open-loop rollout of H frames after C real ones, feeding back prior samples.

        :meth:`imagine_latent` (the rollout itself, in latent space), then one decoder
        call on all ``B * H`` latents. The Transformer sees C + H - 1 time steps (the last
        imagined frame needs no token), so ``C + H - 1 <= max_length`` is required.

        Args:
            context_obs: ``[B, C, 3, S, S]`` real frames.
            context_actions: ``[B, C]`` the action taken in each of them.
            future_actions: ``[B, H-1]`` the action after each imagined frame but the last.
            mode: ``"sample"`` draws posterior and prior latents, ``"mode"`` takes argmaxes.
            use_cache: prefill a KV cache once and append one step at a time; ``False``
                re-runs the full causal forward every step (slow reference path).

        Returns:
            :class:`Rollout` with ``obs [B, H, 3, S, S]`` in [0, 1], ``reward [B, H]``,
            ``cont [B, H]`` (probabilities).
        """
        latent = self.imagine_latent(
            context_obs, context_actions, future_actions, mode=mode, use_cache=use_cache
        )
        with evaluating(self):
            frames = self.decode(latent.z).clamp(0.0, 1.0)
        return Rollout(obs=frames, reward=latent.reward, cont=latent.cont)

    def imagine_latent(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
        use_cache: bool = True,
    ) -> LatentRollout:
        """The rollout of :meth:`imagine` without decoding frames (what policy learning uses).

        STORM's agent learns in imagination from ``(z, h)``, reward and continuation alone;
        only figures need pixels. At the cpu profile's widths the decoder costs more than
        the Transformer steps, so this is the path whose cost the KV cache decides.
        Same arguments, checks and random draws as :meth:`imagine`.

        Returns:
            :class:`LatentRollout`: ``z [B, H, K, V]`` one-hot, ``h [B, H, D]``,
            ``reward [B, H]``, ``cont [B, H]`` (probabilities).
        """
        self._check(context_obs, context_actions, what="context_obs")
        b, c = context_actions.shape
        if future_actions.dim() != 2 or future_actions.shape[0] != b:
            raise ValueError(
                f"future_actions must be [B={b}, H-1], got {tuple(future_actions.shape)}"
            )
        self._check_actions(future_actions)
        horizon = future_actions.shape[1] + 1
        if c + horizon - 1 > self.max_length:
            raise ValueError(
                f"context {c} + horizon {horizon} - 1 = {c + horizon - 1} time steps exceed "
                f"max_length={self.max_length}"
            )
        with evaluating(self):
            z = self.vae.sample(self.encode(context_obs), mode)  # [B, C, K, V]
            cache = self.transformer.new_cache(b) if use_cache else None
            seq_z, seq_a = z, context_actions
            h = self.embed.hidden(self.transformer(self.tokens(z, context_actions), cache))[:, -1]
            hs, zs = [], []
            for k in range(horizon):
                z_next = self.dynamics.sample(h, mode)  # [B, K, V]
                hs.append(h)
                zs.append(z_next)
                if k == horizon - 1:
                    break
                a = future_actions[:, k : k + 1]
                if use_cache:
                    out = self.transformer(self.tokens(z_next[:, None], a), cache)
                else:
                    seq_z = torch.cat([seq_z, z_next[:, None]], 1)
                    seq_a = torch.cat([seq_a, a], 1)
                    out = self.transformer(self.tokens(seq_z, seq_a))
                h = self.embed.hidden(out)[:, -1]
            h_all = torch.stack(hs, 1)  # [B, H, D]
            reward = self.reward_head.predict(self.reward_head(h_all))
            cont = torch.sigmoid(self.cont_head(h_all))
        return LatentRollout(z=torch.stack(zs, 1), h=h_all, reward=reward, cont=cont)

    def _teacher_forced(
        self, obs: Tensor, action: Tensor, mode: ImagineMode
    ) -> tuple[Tensor, Tensor]:
        """Posterior samples ``[B, T, K, V]`` and ``h_0..h_{T-2}`` ``[B, T-1, D]``."""
        self._check(obs, action)
        self._check_length(obs.shape[1], "obs")
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
            return self.decode(self.dynamics.sample(h, mode)).clamp(0.0, 1.0)

    def token_nll_per_step(self, obs: Tensor, action: Tensor) -> Tensor:
        """Teacher-forced ``-log p_prior(z_{t+1} | history)`` of the posterior mode, in nats.

        The prior is the head's ``forward(h_t)``: for the MaskGIT head, the all-masked
        prediction (what its one-round draft samples from).

        Shapes:
            ``obs [B, T, 3, S, S], action [B, T] -> [B, T-1]``.
        """
        with evaluating(self):
            z, h = self._teacher_forced(obs, action, "mode")
            return token_nll(z[:, 1:], self.dynamics(h))

    def attention_maps(self, obs: Tensor, action: Tensor) -> Tensor:
        """Attention weights for one window (posterior mode tokens).

        Shapes:
            ``obs [B, T, 3, S, S], action [B, T] -> [layers, B, heads, N, N]``,
            N = T (fused) or 2T (interleaved).
        """
        with evaluating(self):
            self._check(obs, action)
            self._check_length(obs.shape[1], "obs")
            z = self.vae.sample(self.encode(obs), "mode")
            return self.transformer.attention_maps(self.tokens(z, action))
