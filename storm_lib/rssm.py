"""DreamerV3-style RSSM world model (the P03 baseline) and the P03 checkpoint loader.

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

Reward convention: ``batch.reward[t]``/``cont[t]`` follow taking ``action[t]`` in
``obs[t]``. The state at t+1 is the first one that has seen ``a_t``, so the RSSM predicts
them from feat_{t+1} (DreamerV3: the reward of the transition *into* a state is read from
that state). In ``loss`` this uses t = 0..T-2; the last step has no next state.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    load_state_strict,
    read_checkpoint,
    safe_torch_load,
    save_checkpoint,
    strip_compile_prefix,
)
from .config import Config, get_profile
from .losses import kl_losses, straight_through_sample, token_nll, unimix_logits
from .nets.heads import ContinueHead, RewardHead
from .nets.vae import Decoder, Encoder
from .types import Batch, ImagineMode, Rollout
from .utils import default_device


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


@contextlib.contextmanager
def _eval_no_grad(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the previous train/eval mode is restored."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _block(in_dim: int, hidden: int) -> list[nn.Module]:
    return [nn.Linear(in_dim, hidden, bias=False), nn.LayerNorm(hidden), nn.SiLU()]


class RSSMWorldModel(nn.Module):
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
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        self.config, self.action_dim, self.max_length = config, int(action_dim), None
        vae, rssm = config.vae, config.rssm
        self.k, self.v, self.unimix = vae.categoricals, vae.classes, vae.unimix
        self.image_size = config.data.image_size
        stoch_dim, feat_dim = self.k * self.v, rssm.deter + self.k * self.v
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
        return unimix_logits(logits.unflatten(-1, (self.k, self.v)), self.unimix)

    def _one_hot(self, action: Tensor) -> Tensor:
        """Indices ``[...]`` (int) or one-hot ``[..., A]`` (float) -> float one-hot ``[..., A]``."""
        if action.is_floating_point():
            if action.shape[-1] != self.action_dim:
                raise ValueError(
                    f"one-hot actions need {self.action_dim} columns, got {action.shape}"
                )
            return action
        self._check_actions(action)
        return F.one_hot(action.long(), self.action_dim).float()

    def _check_actions(self, action: Tensor) -> None:
        if action.is_floating_point() or action.dtype == torch.bool:
            raise ValueError(f"actions must be integer indices, got dtype {action.dtype}")
        if action.numel() and (int(action.min()) < 0 or int(action.max()) >= self.action_dim):
            raise ValueError(
                f"actions must be in [0, {self.action_dim}), got range "
                f"[{int(action.min())}, {int(action.max())}]: wrong action count for this model?"
            )

    def _check_obs(self, obs: Tensor) -> None:
        s = self.image_size
        if obs.dim() != 5 or tuple(obs.shape[2:]) != (3, s, s):
            raise ValueError(f"obs must be [B, T, 3, {s}, {s}], got {tuple(obs.shape)}")

    def embed(self, obs: Tensor) -> Tensor:
        """Encoder features of all frames in one call: ``[B, T, 3, S, S] -> [B, T, E]``."""
        self._check_obs(obs)
        flat = obs.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        return self.encoder.features(flat).unflatten(0, obs.shape[:2])

    def decode(self, feat: Tensor) -> Tensor:
        """Features ``[B, T, deter + K*V] -> [B, T, 3, S, S]`` (unclamped)."""
        return self.decoder(feat.flatten(0, 1)).unflatten(0, feat.shape[:2])

    # ------------------------------------------------------------- vocabulary
    def initial(self, batch_size: int, device: torch.device | str | None = None) -> RSSMState:
        """All-zero deter and stoch, uniform logits (DreamerV3 can learn it; we don't)."""
        device = device if device is not None else self.gru.weight_hh.device
        deter = torch.zeros(batch_size, self.config.rssm.deter, device=device)
        stoch = torch.zeros(batch_size, self.k, self.v, device=device)
        return RSSMState(deter, stoch, torch.full_like(stoch, -math.log(self.v)))

    def _deter_step(self, state: RSSMState, action_oh: Tensor) -> Tensor:
        x = self.img_in(torch.cat([state.stoch.flatten(1), action_oh], -1))
        return self.gru(x, state.deter)

    def img_step(
        self, state: RSSMState, action: Tensor, *, mode: ImagineMode = "sample"
    ) -> RSSMState:
        """One prior step: ``h' = GRU(img_in([z, a]), h)``, ``z' ~ p(z' | h')``.

        Args:
            state: the current state (``[B, ...]``).
            action: ``[B]`` int indices or ``[B, A]`` one-hot, taken in ``state``.
            mode: ``"sample"`` or ``"mode"`` (argmax of each categorical).
        """
        deter = self._deter_step(state, self._one_hot(action))
        logits = self._dist(self.prior(deter))
        return RSSMState(deter, straight_through_sample(logits, mode), logits)

    def obs_step(
        self, state: RSSMState, action: Tensor, embed: Tensor, *, mode: ImagineMode = "sample"
    ) -> tuple[RSSMState, RSSMState]:
        """Prior step, then the posterior from ``[h', e]``: ``(post, prior)``; embed ``[B, E]``."""
        prior = self.img_step(state, action, mode=mode)
        logits = self._dist(self.posterior(torch.cat([prior.deter, embed], -1)))
        return RSSMState(prior.deter, straight_through_sample(logits, mode), logits), prior

    def _observe(
        self, embed: Tensor, action: Tensor, state: RSSMState | None, mode: ImagineMode
    ) -> tuple[RSSMState, Tensor]:
        """Posterior states ``[B, T, ...]`` and prior log-probs ``[B, T, K, V]`` (batched)."""
        b, t = embed.shape[:2]
        if action.shape != (b, t):
            raise ValueError(f"action must be [B, T] = {(b, t)}, got {tuple(action.shape)}")
        prev = self._one_hot(action)
        prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)  # a_{t-1}; a_{-1} = 0
        state = state if state is not None else self.initial(b, embed.device)
        posts = []
        for i in range(t):
            deter = self._deter_step(state, prev[:, i])
            logits = self._dist(self.posterior(torch.cat([deter, embed[:, i]], -1)))
            state = RSSMState(deter, straight_through_sample(logits, mode), logits)
            posts.append(state)
        post = _stack(posts)
        return post, self._dist(self.prior(post.deter))

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
        obs, action = batch.obs, batch.action
        self._check_obs(obs)
        b, t = obs.shape[:2]
        if t < 2:
            raise ValueError(f"the RSSM loss needs T >= 2 steps, got T={t}")
        for name in ("action", "reward", "cont"):
            if tuple(getattr(batch, name).shape) != (b, t):
                raise ValueError(f"batch.{name} must be [B, T] = {(b, t)}")
        self._check_actions(action)
        post, prior_logits = self._observe(self.embed(obs), action, None, "sample")
        feat = post.feat
        rec = (self.decode(feat) - obs).pow(2).sum((2, 3, 4)).mean()
        reward = self.reward_head.loss(self.reward_head(feat[:, 1:]), batch.reward[:, :-1])
        cont = F.binary_cross_entropy_with_logits(self.cont_head(feat[:, 1:]), batch.cont[:, :-1])
        dyn, rep, dyn_raw = kl_losses(post.logits, prior_logits, self.config.loss.free_bits)
        lc = self.config.loss
        total = rec + reward + cont + lc.dyn_scale * dyn + lc.rep_scale * rep
        nll = token_nll(post.stoch[:, 1:], prior_logits[:, 1:]).mean()
        metrics = {
            "loss/total": total, "loss/rec": rec, "loss/reward": reward, "loss/cont": cont,
            "loss/dyn": dyn, "loss/rep": rep, "kl/dyn_raw": dyn_raw, "token_nll": nll,
        }  # fmt: skip
        return total, {k: v.detach() for k, v in metrics.items()}

    # ------------------------------------------------------------- evaluation
    def imagine(
        self,
        context_obs: Tensor,
        context_actions: Tensor,
        future_actions: Tensor,
        *,
        mode: ImagineMode = "sample",
    ) -> Rollout:
        """Observe C context frames, then roll the prior open-loop for H frames.

        The first imagined step takes the last context action, then ``future_actions``.
        ``Rollout.reward[:, k-1]``/``cont[:, k-1]`` are read from imagined state k (the
        transition into it). Runs in eval mode without gradients; restores the mode.

        Shapes:
            context_obs ``[B, C, 3, S, S]``, context_actions ``[B, C]``,
            future_actions ``[B, H-1]`` -> obs ``[B, H, 3, S, S]`` in [0, 1],
            reward and cont ``[B, H]``.
        """
        if mode not in ("sample", "mode"):
            raise ValueError(f"mode must be 'sample' or 'mode', got {mode!r}")
        b = context_obs.shape[0]
        if future_actions.dim() != 2 or future_actions.shape[0] != b:
            raise ValueError(f"future_actions must be [B, H-1], got {tuple(future_actions.shape)}")
        self._check_actions(future_actions)
        with _eval_no_grad(self):
            post, _ = self._observe(self.embed(context_obs), context_actions, None, mode)
            state = RSSMState(post.deter[:, -1], post.stoch[:, -1], post.logits[:, -1])
            actions = torch.cat([context_actions[:, -1:], future_actions], 1)
            states = []
            for k in range(actions.shape[1]):
                state = self.img_step(state, actions[:, k], mode=mode)
                states.append(state)
            feat = _stack(states).feat
            return Rollout(
                obs=self.decode(feat).clamp(0.0, 1.0),
                reward=self.reward_head.predict(self.reward_head(feat)),
                cont=torch.sigmoid(self.cont_head(feat)),
            )

    def reconstruct(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """Filter with the posterior (argmax samples) and decode: ``[B, T, 3, S, S]`` in [0, 1].

        A recurrent model needs the actions; without them action 0 (NOOP in ALE) is
        assumed at every step. Eval mode, no gradients.
        """
        action = action if action is not None else obs.new_zeros(obs.shape[:2], dtype=torch.long)
        with _eval_no_grad(self):
            post, _ = self._observe(self.embed(obs), action, None, "mode")
            return self.decode(post.feat).clamp(0.0, 1.0)

    def predict_one_step(
        self, obs: Tensor, action: Tensor, *, mode: ImagineMode = "mode"
    ) -> Tensor:
        """Teacher-forced one-step predictions: ``[B, T, ...] -> [B, T-1, 3, S, S]``.

        Entry t is frame t+1 decoded from the prior at t+1 (h_{t+1} from the posterior at t
        and ``action[:, t]``), with the real history. ``mode`` samples posterior and prior.
        """
        with _eval_no_grad(self):
            _, prior = self.observe(self.embed(obs), action, mode=mode)
            return self.decode(prior.feat[:, 1:]).clamp(0.0, 1.0)

    def token_nll_per_step(self, obs: Tensor, action: Tensor) -> Tensor:
        """-log p_prior(z_{t+1}) of the posterior argmax at t+1, t = 0..T-2: ``[B, T-1]`` nats."""
        with _eval_no_grad(self):
            post, prior_logits = self._observe(self.embed(obs), action, None, "mode")
            return token_nll(post.stoch[:, 1:], prior_logits[:, 1:])


# --------------------------------------------------------------------- P03 checkpoints
def save_p03_checkpoint(
    model: RSSMWorldModel,
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    history: dict[str, list[dict[str, float]]] | None = None,
) -> Path:
    """Save an RSSM where a P03 checkpoint goes, in this project's one-file format.

    Format (``storm_lib.checkpoint.FORMAT``, written atomically)::

        {"format": "storm_lib/1", "model": "rssm", "config": Config.to_dict(),
         "action_dim": int, "state_dict": {name: Tensor}, "optimizer": dict | None,
         "step": int, "history": dict | None, "train_state": None}

    State-dict names (module: keys) of :class:`RSSMWorldModel`:

    * ``encoder.convs.{3i}`` Conv2d, ``encoder.convs.{3i+1}`` BatchNorm2d (i < stages)
    * ``img_in.0`` Linear(K*V + A -> hidden, no bias), ``img_in.1`` LayerNorm
    * ``gru`` GRUCell(hidden -> deter): ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``
    * ``prior.0`` Linear(deter -> hidden), ``prior.1`` LayerNorm, ``prior.3`` Linear(-> K*V)
    * ``posterior.0`` Linear(deter + E -> hidden), ``posterior.1`` LayerNorm,
      ``posterior.3`` Linear(-> K*V); E = encoder features (final channels * final size**2)
    * ``decoder.stem.0`` Linear(deter + K*V -> ...), ``decoder.stem.1`` BatchNorm1d,
      ``decoder.deconvs.{3i}`` ConvTranspose2d, ``decoder.deconvs.{3i+1}`` BatchNorm2d
    * ``reward_head.net.{3j}`` Linear / ``.{3j+1}`` LayerNorm (last Linear: reward bins),
      ``cont_head.net.*`` likewise (last Linear: 1 output)

    A student's P03 notebook can write a compatible file either with this function, or
    with ``torch.save(model.state_dict(), path)`` when its modules carry these names (a
    ``torch.compile`` ``_orig_mod.`` prefix and nesting under ``"state_dict"`` or
    ``"model"`` are accepted): :func:`load_rssm_checkpoint` infers the sizes from shapes.
    """
    if not isinstance(model, RSSMWorldModel):
        raise TypeError(f"expected an RSSMWorldModel, got {type(model).__name__}")
    return save_checkpoint(path, model, optimizer=optimizer, step=step, history=history)


def _unwrap_state_dict(raw: Any, source: str) -> dict[str, Tensor]:
    """A plain dict of tensors, possibly nested under ``"state_dict"``/``"model"`` keys."""
    for _ in range(3):
        if not isinstance(raw, dict):
            break
        inner = [raw[k] for k in ("state_dict", "model") if isinstance(raw.get(k), dict)]
        if not inner:
            break
        raw = inner[0]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{source}: neither a storm_lib checkpoint nor a state dict")
    bad = [k for k, v in raw.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(f"{source}: not a state dict (entry {bad[0]!r} is not a tensor)")
    return strip_compile_prefix(raw)


def _max_index(sd: dict[str, Tensor], prefix: str) -> int:
    """Largest ``i`` among keys ``prefix.{i}.*`` (-1 if none)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return max((int(m.group(1)) for k in sd if (m := pattern.match(k))), default=-1)


def _infer_config(sd: dict[str, Tensor], source: str) -> tuple[Config, int, str]:
    """Config and action count of the RSSM that ``sd`` belongs to, and a note of the sizes.

    deter and hidden from ``gru.weight_ih`` [3*deter, hidden]; K*V from ``prior.3.weight``;
    A = ``img_in.0.weight`` columns - K*V; stem channels, stages and BatchNorm from the
    encoder convs; E from ``posterior.0.weight`` columns - deter, hence the image size;
    reward bins and MLP layers from the reward head. K and V do not change any shape:
    the profile defaults are kept when K*V matches them, else K = V = sqrt(K*V) for a
    square, else V = default and K = K*V / V. Reward bin range and unimix are defaults.
    """

    def shape(key: str, dims: int) -> tuple[int, ...]:
        if key not in sd or sd[key].dim() != dims:
            found = ", ".join(sorted(sd)[:8])
            raise CheckpointError(
                f"{source}: cannot infer the RSSM sizes: missing key {key!r} "
                f"({dims}-d tensor); the file has keys like: {found}"
            )
        return tuple(sd[key].shape)

    config = get_profile("paper")
    config.name = "p03"
    three_deter, hidden = shape("gru.weight_ih", 2)
    deter = shape("gru.weight_hh", 2)[1]
    stoch = shape("prior.3.weight", 2)[0]
    action_dim = shape("img_in.0.weight", 2)[1] - stoch
    stem = shape("encoder.convs.0.weight", 4)[0]
    stages = _max_index(sd, "encoder.convs") // 3 + 1
    batch_norm = "encoder.convs.1.running_mean" in sd
    embed = shape("posterior.0.weight", 2)[1] - deter
    final_channels = stem * 2 ** (stages - 1)
    final_size = math.isqrt(max(embed // final_channels, 0))
    last = max(_max_index(sd, "reward_head.net"), 0)
    bins, mlp_layers = shape(f"reward_head.net.{last}.weight", 2)[0], last // 3 + 1
    vae = config.vae
    if stoch == vae.categoricals * vae.classes:
        k, v = vae.categoricals, vae.classes
    elif math.isqrt(stoch) ** 2 == stoch:
        k = v = math.isqrt(stoch)
    else:
        v = vae.classes if stoch % vae.classes == 0 else stoch
        k = stoch // v
    note = (
        f"inferred: deter={deter}, hidden={hidden}, K*V={stoch} (K={k}, V={v} assumed), "
        f"action_dim={action_dim}, stem_channels={stem}, stages={stages}, "
        f"batch_norm={batch_norm}, image_size={final_size * 2**stages}, "
        f"reward_bins={bins}, mlp_layers={mlp_layers}"
    )
    if (
        three_deter != 3 * deter
        or action_dim < 1
        or final_size < 1
        or final_channels * final_size**2 != embed
    ):
        raise CheckpointError(f"{source}: inconsistent RSSM tensor shapes\n  {note}")
    config.rssm.deter, config.rssm.hidden = deter, hidden
    vae.stem_channels, vae.stages, vae.batch_norm = stem, stages, batch_norm
    vae.categoricals, vae.classes = k, v
    config.data.image_size = final_size * 2**stages
    config.heads.reward_bins, config.heads.mlp_layers = bins, mlp_layers
    return config, action_dim, note


def load_rssm_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    *,
    action_dim: int | None = None,
) -> RSSMWorldModel:
    """Load an RSSM (P03) checkpoint: this project's format or a bare state dict.

    A bare state dict (``torch.save(model.state_dict())``, optionally under ``"state_dict"``
    or ``"model"``, optionally with ``_orig_mod.`` prefixes) must use the key names listed
    in :func:`save_p03_checkpoint`; the sizes are inferred from the tensor shapes and any
    mismatch names the missing and unexpected keys, the shape mismatches and the inferred
    sizes. Files are always read with ``weights_only=True`` and ``map_location``.

    Args:
        path: the file.
        device: where to put the model (default: CUDA if available, else CPU).
        action_dim: if given, the dataset's action count, which the model must match.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CheckpointError: unreadable, foreign or malicious file, a STORM checkpoint, a
            wrong action count, or weights that do not fit.
    """
    device = default_device(device)
    source = str(path)
    raw = safe_torch_load(path, device)
    note = ""
    if isinstance(raw, dict) and "format" in raw:
        payload = read_checkpoint(path, device)
        if payload["model"] != RSSMWorldModel.kind:
            kind = str(payload["model"]).upper()
            raise CheckpointError(f"{source}: holds a {kind} model, expected RSSM")
        config, found_actions, state_dict = (
            payload["config"],
            payload["action_dim"],
            payload["state_dict"],
        )
    else:
        state_dict = _unwrap_state_dict(raw, source)
        config, found_actions, note = _infer_config(state_dict, source)
    if action_dim is not None and found_actions != action_dim:
        raise CheckpointError(
            f"{source}: wrong action count for the dataset: the model has {found_actions} "
            f"actions, the data has {action_dim}"
        )
    try:
        model = RSSMWorldModel(config, found_actions)
    except ValueError as exc:
        raise CheckpointError(f"{source}: cannot build the RSSM: {exc}\n  {note}") from None
    load_state_strict(model, state_dict, source, note=note)
    return model.to(device).eval()
