"""A stand-in for a student's own P03 code, as an instructor receives it.

Nothing here follows storm_lib's conventions: its own class and module names
(``nn.GRU``, ``self.enc``, ``self.dec``), its own sizes, channels-last frames with pixels
in [-0.5, 0.5], one-hot actions, and DreamerV3's convention that the action stored with
a frame is the one that led to it. The student saved ``torch.save(model.state_dict())``.
The instructor's only addition is ``load``, which wraps the model with storm_lib's
``DreamerAdapter``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storm_lib.outside import DreamerAdapter


class StudentRSSM(nn.Module):
    def __init__(self, action_dim: int = 18, deter: int = 48, stoch: int = 8, classes: int = 8):
        super().__init__()
        self.action_dim, self.stoch, self.classes = action_dim, stoch, classes
        latent = stoch * classes
        self.enc = nn.Sequential(
            nn.Conv2d(3, 8, 4, 2, 1), nn.ELU(), nn.Conv2d(8, 16, 4, 2, 1), nn.ELU(),
            nn.Flatten(), nn.Linear(16 * 16 * 16, 64),
        )  # fmt: skip
        self.gru = nn.GRU(latent + action_dim, deter, batch_first=True)
        self.prior_net = nn.Linear(deter, latent)
        self.post_net = nn.Linear(deter + 64, latent)
        self.dec = nn.Sequential(
            nn.Linear(deter + latent, 16 * 16 * 16), nn.Unflatten(1, (16, 16, 16)),
            nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ELU(), nn.ConvTranspose2d(8, 3, 4, 2, 1),
        )  # fmt: skip

    def encode(self, obs: Tensor) -> Tensor:
        """``[B, T, 64, 64, 3]`` in [-0.5, 0.5] -> ``[B, T, 64]``."""
        b, t = obs.shape[:2]
        return self.enc(obs.flatten(0, 1).permute(0, 3, 1, 2)).unflatten(0, (b, t))

    def _stoch(self, logits: Tensor) -> Tensor:
        probs = logits.unflatten(-1, (self.stoch, self.classes)).softmax(-1)
        hard = F.one_hot(probs.argmax(-1), self.classes).float()
        return (hard + probs - probs.detach()).flatten(-2)

    def img_step(self, state: dict, action: Tensor) -> dict:
        """One prior step: ``state {deter [B, D], stoch [B, K*V]}``, ``action [B, A]`` one-hot."""
        x = torch.cat([state["stoch"], action], -1)[:, None]
        _, h = self.gru(x, state["deter"][None].contiguous())
        deter = h[0]
        return {"deter": deter, "stoch": self._stoch(self.prior_net(deter))}

    def observe(self, embed: Tensor, prev_action: Tensor, is_first: Tensor) -> dict:
        """Posterior states ``{deter [B, T, D], stoch [B, T, K*V]}``."""
        b = embed.shape[0]
        state = {
            "deter": embed.new_zeros(b, self.gru.hidden_size),
            "stoch": embed.new_zeros(b, self.stoch * self.classes),
        }
        out = []
        for t in range(embed.shape[1]):
            keep = (~is_first[:, t]).float()[:, None]
            state = {k: v * keep for k, v in state.items()}
            prior = self.img_step(state, prev_action[:, t])
            post = self.post_net(torch.cat([prior["deter"], embed[:, t]], -1))
            state = {"deter": prior["deter"], "stoch": self._stoch(post)}
            out.append(state)
        return {k: torch.stack([s[k] for s in out], 1) for k in out[0]}

    def decode(self, state: dict) -> Tensor:
        """``{deter [B, D], stoch [B, K*V]}`` -> ``[B, 64, 64, 3]`` in [-0.5, 0.5]."""
        x = self.dec(torch.cat([state["deter"], state["stoch"]], -1))
        return 0.5 * torch.tanh(x).permute(0, 2, 3, 1)

    def train_step(self, obs: Tensor, prev_action: Tensor, opt: torch.optim.Optimizer) -> float:
        """One reconstruction step (the student's notebook has a fuller loss)."""
        is_first = torch.zeros(obs.shape[:2], dtype=torch.bool)
        is_first[:, 0] = True
        states = self.observe(self.encode(obs), prev_action, is_first)
        flat = {k: v.flatten(0, 1) for k, v in states.items()}
        loss = (self.decode(flat) - obs.flatten(0, 1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())


def load(weights: dict, device: torch.device) -> DreamerAdapter:
    """What an instructor writes: build the student's model, load the weights, wrap it."""
    model = StudentRSSM()
    model.load_state_dict(weights)
    model.to(device).eval()
    return DreamerAdapter(
        encode=model.encode, observe=model.observe, img_step=model.img_step,
        decode=model.decode, action_dim=model.action_dim, pixels="-0.5-0.5",
        actions="onehot", channels_last=True,
    )  # fmt: skip
