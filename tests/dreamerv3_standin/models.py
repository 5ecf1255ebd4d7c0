"""Stand-in for NM512/dreamerv3-torch's models.py: ``WorldModel`` (encoder, RSSM, heads, its
own ``_train``) and a minimal ``ImagBehavior`` whose weights sit beside the world model's
in an agent's state dict. Written here; the interface is the original's."""

from __future__ import annotations

import networks
import torch
from torch import nn


class WorldModel(nn.Module):
    def __init__(self, obs_space, act_space, step, config):
        super().__init__()
        self._config = config
        shapes = {k: tuple(v.shape) for k, v in obs_space.spaces.items()}
        self.encoder = networks.MultiEncoder(shapes, **config.encoder)
        self.embed_size = self.encoder.outdim
        self.dynamics = networks.RSSM(
            config.dyn_stoch, config.dyn_deter, config.dyn_hidden, config.dyn_rec_depth,
            config.dyn_discrete, config.act, config.norm, config.dyn_mean_act,
            config.dyn_std_act, config.dyn_min_std, config.unimix_ratio, config.initial,
            config.num_actions, self.embed_size, config.device,
        )  # fmt: skip
        feat = config.dyn_stoch * config.dyn_discrete + config.dyn_deter
        self.heads = nn.ModuleDict()
        self.heads["decoder"] = networks.MultiDecoder(feat, shapes, **config.decoder)
        self.heads["reward"] = networks.MLP(
            feat, (255,), config.reward_head["layers"], config.units, config.act, config.norm,
            dist=config.reward_head["dist"], device=config.device, name="Reward",
        )  # fmt: skip
        self.heads["cont"] = networks.MLP(
            feat, (), config.cont_head["layers"], config.units, config.act, config.norm,
            dist="binary", device=config.device, name="Cont",
        )  # fmt: skip
        self._model_opt = torch.optim.Adam(self.parameters(), lr=config.model_lr)
        print(f"Optimizer model_opt has {sum(p.numel() for p in self.parameters())} variables.")

    def preprocess(self, obs):
        obs = {
            k: torch.as_tensor(v, device=self._config.device, dtype=torch.float32)
            for k, v in obs.items()
        }
        obs["image"] = obs["image"] / 255.0
        obs["cont"] = (1.0 - obs["is_terminal"]).unsqueeze(-1)
        return obs

    def _train(self, data):
        data = self.preprocess(data)
        embed = self.encoder(data)
        post, prior = self.dynamics.observe(embed, data["action"], data["is_first"])
        c = self._config
        kl, *_ = self.dynamics.kl_loss(post, prior, c.kl_free, c.dyn_scale, c.rep_scale)
        feat = self.dynamics.get_feat(post)
        losses = {"image": -self.heads["decoder"](feat)["image"].log_prob(data["image"])}
        losses["reward"] = -self.heads["reward"](feat).log_prob(data["reward"].unsqueeze(-1))
        losses["cont"] = -self.heads["cont"](feat).log_prob(data["cont"])
        loss = (sum(losses.values()) + kl).mean()
        self._model_opt.zero_grad()
        loss.backward()
        self._model_opt.step()
        return {k: float(v.detach().mean()) for k, v in losses.items()}


class ImagBehavior(nn.Module):
    def __init__(self, config, world_model):
        super().__init__()
        self._world_model = world_model  # a submodule: its weights appear here again
        feat = config.dyn_stoch * config.dyn_discrete + config.dyn_deter
        self.actor = networks.MLP(feat, (config.num_actions,), 1, config.units, name="Actor")
