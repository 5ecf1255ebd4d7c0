"""DreamerV3-style RSSM world model, the P03 baseline (its loader is ``storm_lib/p03.py``).

The RSSM shares STORM's encoder/decoder family, heads, loss weights and free bits, so a
comparison of the two is a comparison of the dynamics backbone (GRU vs Transformer).

Structure (Hafner et al. 2023, DreamerV3), per step t::

    x_t      = SiLU(LN(Linear([z_{t-1}, a_{t-1}])))     img_in
    h_t      = GRUCell(x_t, h_{t-1})                    gru (deterministic state "deter")
    prior    = Linear(SiLU(LN(Linear(h_t))))            p(z_t | h_t), K x V logits, unimix
    post     = Linear(SiLU(LN(Linear([h_t, e_t]))))     q(z_t | h_t, e_t), e_t = encoder features
    feat_t   = [h_t, z_t]                               decoder, reward and continuation input

Departures from DreamerV3, on purpose: ``nn.GRUCell`` (PyTorch's fused cell) instead of
DreamerV3's LayerNorm GRU with update bias -1; SiLU (DreamerV3's activation) in the RSSM
MLPs while the shared heads keep STORM's ReLU; the initial state is all zeros (deter and
stoch, with a zero "previous action") instead of a learned one; KL free bits clamp the
batch mean (STORM's rule, shared with STORM) instead of each element.
The encoder's own Linear to K x V logits is removed: the posterior MLP, which also sees
h_t, plays that role, and the embedding is the flattened conv features.

Speed: filtering runs a Python loop over T. ``_filter_plain`` is the readable loop;
``_filter_precomputed`` (on by default, a speed-up of ``speedups.py``) computes the input
projections that do not depend on the recurrence for all T before the loop. On a GPU
``fit()`` can also replay the whole training step as one CUDA graph (``graphs.py``).

Reward convention: ``batch.reward[t]``/``cont[t]`` follow taking ``action[t]`` in
``obs[t]``. The state at t+1 is the first one that has seen ``a_t``, so the RSSM predicts
them from feat_{t+1} (DreamerV3: the reward of the transition *into* a state is read from
that state). In ``loss`` this uses t = 0..T-2; the last step has no next state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..losses import kl_losses, token_nll
from ..types import Batch, ImagineMode, Rollout
from ..utils import evaluating
from . import speedups
from .base import LatentPredictions, WorldModel
from .heads import ContinueHead, PriorLosses, RewardHead
from .vae import Decoder, Encoder, frames_for_convs, straight_through_sample, unimix_logits


@dataclass
class RSSMState:
    """One RSSM state, or a sequence of them (``[B, T, ...]``) as returned by ``observe``.

    Shapes:
        deter: ``[B, deter]`` GRU state.
        stoch: ``[B, K, V]`` one-hot sample (straight-through).
        logits: ``[B, K, V]`` log-probabilities (with unimix) the sample was drawn from.
    """

    deter: Tensor
    stoch: Tensor
    logits: Tensor

    @property
    def feat(self) -> Tensor:
        """``[..., deter + K*V]``: the decoder/heads input (DreamerV3 uses the full state)."""
        return torch.cat([self.deter, self.stoch.flatten(-2)], -1)


def _stack(states: list[RSSMState]) -> RSSMState:
    return RSSMState(
        *(torch.stack([getattr(s, n) for s in states], 1) for n in RSSMState.__annotations__)
    )


def _block(in_dim: int, hidden: int) -> list[nn.Module]:
    return [nn.Linear(in_dim, hidden, bias=False), nn.LayerNorm(hidden), nn.SiLU()]


class RSSMWorldModel(WorldModel):
    """DreamerV3-style recurrent state-space world model (see the module docstring).

    Args:
        config: ``config.vae`` (encoder/decoder, K, V, unimix), ``config.rssm`` (deter,
            hidden), ``config.heads``, ``config.loss`` and ``config.data.image_size``.
        action_dim: A, number of discrete actions.

    Shapes:
        loss: Batch of ``[B, T, ...]`` (T >= 2) -> scalar and metrics.
        observe: embed ``[B, T, E]``, action ``[B, T]`` -> posts, priors (``[B, T, ...]``).
        imagine: ``[B, C, 3, S, S], [B, C], [B, H-1] -> Rollout`` of H frames.

    Example:
        >>> m = RSSMWorldModel(get_profile("smoke"), action_dim=4)
        >>> ro = m.imagine(torch.rand(2, 3, 3, 64, 64), torch.zeros(2, 3).long(),
        ...                torch.zeros(2, 4).long(), mode="mode")
        >>> ro.obs.shape, ro.reward.shape
        (torch.Size([2, 5, 3, 64, 64]), torch.Size([2, 5]))
    """

    kind = "rssm"

    def __init__(self, config: Config, action_dim: int) -> None:
        super().__init__(config, action_dim)
        vae, rssm = config.vae, config.rssm
        self.unimix = vae.unimix
        stoch_dim = self.categoricals * self.classes
        feat_dim = rssm.deter + stoch_dim
        self.encoder = Encoder(vae, self.image_size)
        del self.encoder.to_logits  # unused: the posterior below maps features to logits
        self.img_in = nn.Sequential(*_block(stoch_dim + self.action_dim, rssm.hidden))
        self.gru = nn.GRUCell(rssm.hidden, rssm.deter)
        self.prior = nn.Sequential(
            *_block(rssm.deter, rssm.hidden), nn.Linear(rssm.hidden, stoch_dim)
        )
        self.posterior = nn.Sequential(
            *_block(rssm.deter + self.encoder.feature_dim, rssm.hidden),
            nn.Linear(rssm.hidden, stoch_dim),
        )
        self.decoder = Decoder(vae, in_dim=feat_dim, image_size=self.image_size)
        self.reward_head = RewardHead(feat_dim, rssm.hidden, config.heads)
        self.cont_head = ContinueHead(feat_dim, rssm.hidden, config.heads)

    # ----------------------------------------------------------------- helpers
    def parts(self) -> dict[str, nn.Module]:
        """Named parts for parameter counts (names as STORM's; the posterior net is extra)."""
        return {
            "encoder": self.encoder,
            "sequence model": nn.ModuleList([self.img_in, self.gru]),
            "prior head": self.prior,
            "posterior": self.posterior,
            "decoder": self.decoder,
            "reward head": self.reward_head,
            "continuation head": self.cont_head,
        }

    def _dist(self, logits: Tensor) -> Tensor:
        """``[..., K*V]`` raw logits -> ``[..., K, V]`` log-probs with unimix."""
        return unimix_logits(logits.unflatten(-1, (self.categoricals, self.classes)), self.unimix)

    def _one_hot(self, action: Tensor) -> Tensor:
        """Indices ``[...]`` (int) or one-hot ``[..., A]`` (float) -> float one-hot ``[..., A]``."""
        if action.is_floating_point():
            if action.shape[-1] != self.action_dim:
                raise ValueError(
                    f"one-hot actions need {self.action_dim} columns, got {action.shape}"
                )
            return action
        if action.dtype == torch.bool:
            raise ValueError(f"actions must be integer indices, got dtype {action.dtype}")
        return F.one_hot(action.long(), self.action_dim).float()

    def embed(self, obs: Tensor) -> Tensor:
        """Encoder features of all frames in one call: ``[B, T, 3, S, S] -> [B, T, E]``."""
        self.check_obs(obs)
        return self.encoder.features(frames_for_convs(obs)).unflatten(0, obs.shape[:2])

    def decode(self, feat: Tensor) -> Tensor:
        """Features ``[B, T, deter + K*V] -> [B, T, 3, S, S]`` (unclamped)."""
        return self.decoder(feat.flatten(0, 1)).unflatten(0, feat.shape[:2])

    # ------------------------------------------------------------- vocabulary
    def initial(self, batch_size: int, device: torch.device | str | None = None) -> RSSMState:
        """All-zero deter and stoch, uniform logits (DreamerV3 can learn it; we don't)."""
        device = device if device is not None else self.gru.weight_hh.device
        deter = torch.zeros(batch_size, self.config.rssm.deter, device=device)
        stoch = torch.zeros(batch_size, self.categoricals, self.classes, device=device)
        return RSSMState(deter, stoch, torch.full_like(stoch, -math.log(self.classes)))

    def _deter_step(self, state: RSSMState, action_oh: Tensor) -> Tensor:
        x = self.img_in(torch.cat([state.stoch.flatten(1), action_oh], -1))
        return self.gru(x, state.deter)

    def img_step(
        self,
        state: RSSMState,
        action: Tensor,
        *,
        mode: ImagineMode = "sample",
        check: bool = True,
    ) -> RSSMState:
        """One prior step: ``h' = GRU(img_in([z, a]), h)``, ``z' ~ p(z' | h')``.

        Args:
            state: the current state (``[B, ...]``).
            action: ``[B]`` int indices or ``[B, A]`` one-hot, taken in ``state``.
            mode: ``"sample"`` or ``"mode"`` (argmax of each categorical).
            check: validate index actions (a host sync; ``imagine`` checks once instead).
        """
        if check and not action.is_floating_point():
            self.check_actions(action)
        deter = self._deter_step(state, self._one_hot(action))
        logits = self._dist(self.prior(deter))
        return RSSMState(deter, straight_through_sample(logits, mode), logits)

    def obs_step(
        self, state: RSSMState, action: Tensor, embed: Tensor, *, mode: ImagineMode = "sample"
    ) -> tuple[RSSMState, RSSMState]:
        """Prior step, then the posterior from ``[h', e]``: ``(post, prior)``; embed ``[B, E]``."""
        prior = self.img_step(state, action, mode=mode)
        return self._posterior(prior.deter, embed, mode), prior

    def _posterior(self, deter: Tensor, embed: Tensor, mode: ImagineMode) -> RSSMState:
        """``q(z | h, e)``: the state with deter ``h [B, deter]`` and a latent drawn from
        the posterior of ``[h, e]`` (embed ``e [B, E]``)."""
        logits = self._dist(self.posterior(torch.cat([deter, embed], -1)))
        return RSSMState(deter, straight_through_sample(logits, mode), logits)

    def _observe(
        self,
        embed: Tensor,
        action: Tensor,
        state: RSSMState | None,
        mode: ImagineMode,
        *,
        check: bool = True,
    ) -> tuple[RSSMState, Tensor]:
        """Posterior states ``[B, T, ...]`` and prior log-probs ``[B, T, K, V]`` (batched).
        ``check=False`` skips the action-range check (``loss``: fit() checks the data)."""
        b, t = embed.shape[:2]
        if action.shape != (b, t):
            raise ValueError(f"action must be [B, T] = {(b, t)}, got {tuple(action.shape)}")
        if check and not action.is_floating_point():
            self.check_actions(action)
        prev = self._one_hot(action)
        prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)  # a_{t-1}; a_{-1} = 0
        state = state if state is not None else self.initial(b, embed.device)
        if speedups.enabled("rssm_inputs"):
            posts = self._filter_precomputed(embed, prev, state, mode)
        else:
            posts = self._filter_plain(embed, prev, state, mode)
        post = _stack(posts)
        return post, self._dist(self.prior(post.deter))

    def _filter_plain(
        self, embed: Tensor, prev: Tensor, state: RSSMState, mode: ImagineMode
    ) -> list[RSSMState]:
        """The posterior states of steps 0..T-1, one :meth:`obs_step` (without its unused
        prior sample) per step: the readable version.

        Shapes:
            embed ``[B, T, E]``, prev ``[B, T, A]`` (one-hot ``a_{t-1}``) -> T states ``[B, ...]``.
        """
        posts = []
        for i in range(embed.shape[1]):
            state = self._posterior(self._deter_step(state, prev[:, i]), embed[:, i], mode)
            posts.append(state)
        return posts

    def _filter_precomputed(
        self, embed: Tensor, prev: Tensor, state: RSSMState, mode: ImagineMode
    ) -> list[RSSMState]:
        """:meth:`_filter_plain` with what does not depend on the recurrence done first.

        ``img_in`` starts with ``Linear([z, a]) = z W_z^T + a W_a^T`` and the posterior with
        ``Linear([h, e]) = h W_h^T + e W_e^T`` (no biases; each weight split by columns).
        The ``a`` and ``e`` terms are computed for all T in one matmul each, before the
        loop; each step then runs one ``addmm`` per layer instead of a ``cat``, a
        transpose and a matmul, and the inputs are split by one ``unbind`` rather than a
        slice per step (whose backward would be a zero-filled ``[B, T, E]`` each). Same
        parameters, same function and the same random draws; only float rounding differs
        (the two halves of each dot product are summed apart). ``speedups.plain`` or
        ``speedups.plain("rssm_inputs")`` runs the plain loop instead.
        """
        stoch_dim = self.categoricals * self.classes
        w_in, w_post = self.img_in[0].weight, self.posterior[0].weight  # [hidden, in]
        from_action = F.linear(prev, w_in[:, stoch_dim:]).unbind(1)  # T x [B, hidden]
        from_embed = F.linear(embed, w_post[:, self.config.rssm.deter :]).unbind(1)
        # Under autocast F.linear returns the autocast dtype; casting the recurrent halves to
        # it here, once, spares a cast per step (autocast caches casts of leaf weights only).
        w_z = w_in[:, :stoch_dim].t().to(from_action[0].dtype)  # [K*V, hidden]
        w_h = w_post[:, : self.config.rssm.deter].t().to(from_embed[0].dtype)  # [deter, hidden]
        in_rest, post_rest = self.img_in[1:], self.posterior[1:]  # LayerNorm, SiLU(, Linear)
        posts = []
        for a_term, e_term in zip(from_action, from_embed, strict=True):
            x = in_rest(torch.addmm(a_term, state.stoch.flatten(1), w_z))  # img_in([z, a])
            deter = self.gru(x, state.deter)
            logits = self._dist(post_rest(torch.addmm(e_term, deter, w_h)))  # posterior([h, e])
            state = RSSMState(deter, straight_through_sample(logits, mode), logits)
            posts.append(state)
        return posts

    def observe(
        self,
        embed: Tensor,
        action: Tensor,
        state: RSSMState | None = None,
        *,
        mode: ImagineMode = "sample",
    ) -> tuple[RSSMState, RSSMState]:
        """Filter a sequence: ``(posts, priors)``, each ``[B, T, ...]``.

        State t is conditioned on ``(z_{t-1}, a_{t-1})`` through the GRU and on ``embed[:, t]``
        through the posterior. ``action[:, t]`` is the action taken in frame t (Batch
        convention), so step t uses ``action[:, t-1]``; step 0 starts from ``state``
        (default :meth:`initial`) with a zero previous action, and ``action[:, -1]`` is unused.

        Args:
            embed: ``[B, T, E]`` encoder features (:meth:`embed`).
            action: ``[B, T]`` int64.
            state: the state before step 0.
            mode: sampling of posterior and prior, ``"sample"`` or ``"mode"``.
        """
        post, prior_logits = self._observe(embed, action, state, mode)
        prior = RSSMState(post.deter, straight_through_sample(prior_logits, mode), prior_logits)
        return post, prior

    # ------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """World-model loss: rec + reward + cont + dyn_scale*dyn + rep_scale*rep (as STORM).

        ``rec`` is the per-frame sum of squared errors (mean over B, T) of frames decoded
        from posterior features; KL over all T steps (prior from h_t, posterior from h_t and
        e_t); reward/cont for t = 0..T-2 from feat_{t+1}. ``token_nll`` is the mean over B
        and t >= 1 of -log p_prior(z_t | h_t) of the posterior sample, nats/frame.

        Returns:
            The scalar total and detached 0-d metrics (``loss/total``, ``loss/rec``,
            ``loss/reward``, ``loss/cont``, ``loss/dyn``, ``loss/rep``, ``kl/dyn_raw``,
            ``token_nll``).
        """
        b, t = self.check_batch(batch)
        frames = frames_for_convs(batch.obs)  # [B*T, 3, S, S], the decoder's output layout
        embedded = self.encoder.features(frames).unflatten(0, (b, t))
        post, prior_logits = self._observe(embedded, batch.action, None, "sample", check=False)
        feat = post.feat
        rec = self.reconstruction_loss(self.decoder(feat.flatten(0, 1)), frames)
        reward = self.reward_head.loss(self.reward_head(feat[:, 1:]), batch.reward[:, :-1])
        cont = F.binary_cross_entropy_with_logits(self.cont_head(feat[:, 1:]), batch.cont[:, :-1])
        kl = kl_losses(post.logits, prior_logits, self.config.loss.free_bits)
        nll = token_nll(post.stoch[:, 1:], prior_logits[:, 1:]).mean().detach()
        return self.total_loss(rec, reward, cont, PriorLosses(*kl, nll))

    # ------------------------------------------------------------- evaluation
    def _rollout(
        self, obs: Tensor, actions: Tensor, future: Tensor, mode: ImagineMode, use_cache: bool
    ) -> Rollout:
        """:meth:`imagine` after its checks, in eval mode: observe the C context frames,
        then roll the prior open-loop for H frames. The first imagined step takes the last
        context action, then ``future``. ``Rollout.reward[:, k-1]``/``cont[:, k-1]`` are read
        from imagined state k (the transition into it). The recurrent state is this model's
        cache, so ``use_cache`` changes nothing here."""
        post, _ = self._observe(self.embed(obs), actions, None, mode, check=False)  # checked
        state = RSSMState(post.deter[:, -1], post.stoch[:, -1], post.logits[:, -1])
        steps = torch.cat([actions[:, -1:], future], 1)
        states = []
        for k in range(steps.shape[1]):
            state = self.img_step(state, steps[:, k], mode=mode, check=False)
            states.append(state)
        feat = _stack(states).feat
        return Rollout(
            obs=self.decode(feat).clamp(0.0, 1.0),
            reward=self.reward_head.predict(self.reward_head(feat)),
            cont=torch.sigmoid(self.cont_head(feat)),
        )

    def reconstruct(
        self, obs: Tensor, action: Tensor | None = None, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Filter with the posterior (argmax latents, or samples with ``mode="sample"``) and
        decode ``(h_t, z_t)``: ``[B, T, 3, S, S]`` in [0, 1].

        A recurrent model needs the actions; without them action 0 (NOOP in ALE) is
        assumed at every step. Eval mode, no gradients.
        """
        action = self.default_actions(obs, action)
        with evaluating(self):
            post, _ = self._observe(self.embed(obs), action, None, mode)
            return self.decode(post.feat).clamp(0.0, 1.0)

    def posterior_log_probs(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """``q(z_t | h_t, o_t)`` as log-probabilities (argmax filtering): ``[B, T, K, V]``."""
        action = self.default_actions(obs, action)
        with evaluating(self):
            return self._observe(self.embed(obs), action, None, "mode")[0].logits

    def predict_one_step(
        self, obs: Tensor, action: Tensor, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Teacher-forced one-step predictions: ``[B, T, ...] -> [B, T-1, 3, S, S]``.

        Entry t is frame t+1 decoded from the prior at t+1 (h_{t+1} from the posterior at t
        and ``action[:, t]``), with the real history. ``mode`` samples posterior and prior.
        """
        with evaluating(self):
            _, prior = self.observe(self.embed(obs), action, mode=mode)
            return self.decode(prior.feat[:, 1:]).clamp(0.0, 1.0)

    def latent_predictions(self, obs: Tensor, action: Tensor) -> LatentPredictions:
        """Argmax filtering: the posterior ``q(z_t | h_t, o_t)`` of every frame, and the prior
        ``p(z_{t+1} | h_{t+1})``, whose ``h_{t+1}`` has seen ``z_t`` and ``a_t``.

        Shapes:
            ``obs [B, T, 3, S, S], action [B, T] ->`` posterior ``[B, T, K, V]``, prior
            ``[B, T-1, K, V]`` (log-probabilities).
        """
        with evaluating(self):
            post, prior_logits = self._observe(self.embed(obs), action, None, "mode")
            return LatentPredictions(post.logits, prior_logits[:, 1:])
