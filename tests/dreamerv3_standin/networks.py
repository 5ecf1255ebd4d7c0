"""Stand-in for NM512/dreamerv3-torch's networks.py: the same interface, written here.

What storm_lib's preset relies on is kept: the class and argument names, the attribute
names that make up the state-dict keys, the tensor shapes, and the behaviours that trip
people up (the encoder takes a dict and shifts its input in place; the decoder wants
``[B, T, F]`` features and returns a dict of distributions; ``RSSM.observe`` takes no
sample flag while ``obs_step`` and ``img_step`` do). Only discrete latents are written.
"""

from __future__ import annotations

import math
import re

import tools
import torch
import torch.nn.functional as F
from torch import nn


def _norm_act(width, norm, act):
    return [nn.LayerNorm(width, eps=1e-3)] * bool(norm) + [getattr(nn, act)()]


class GRUCell(nn.Module):
    def __init__(self, inp_size, size, norm=True):
        super().__init__()
        self._size = size
        self.layers = nn.Sequential()
        self.layers.add_module("GRU_linear", nn.Linear(inp_size + size, 3 * size, bias=False))
        if norm:
            self.layers.add_module("GRU_norm", nn.LayerNorm(3 * size, eps=1e-3))

    def forward(self, inputs, state):
        reset, cand, update = self.layers(torch.cat([inputs, state[0]], -1)).chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        out = update * cand + (1 - update) * state[0]
        return out, [out]


class RSSM(nn.Module):
    def __init__(
        self, stoch=30, deter=200, hidden=200, rec_depth=1, discrete=False, act="SiLU",
        norm=True, mean_act="none", std_act="softplus", min_std=0.1, unimix_ratio=0.01,
        initial="learned", num_actions=None, embed=None, device=None,
    ):  # fmt: skip
        super().__init__()
        assert discrete, "the stand-in has discrete latents only"
        self._stoch, self._discrete, self._deter = stoch, discrete, deter
        self._unimix_ratio, self._initial = unimix_ratio, initial
        self._num_actions, self._device = num_actions, device
        flat = stoch * discrete
        self._img_in_layers = nn.Sequential(
            nn.Linear(flat + num_actions, hidden, bias=False), *_norm_act(hidden, norm, act)
        )
        self._cell = GRUCell(hidden, deter, norm=norm)
        self._img_out_layers = nn.Sequential(
            nn.Linear(deter, hidden, bias=False), *_norm_act(hidden, norm, act)
        )
        self._obs_out_layers = nn.Sequential(
            nn.Linear(deter + embed, hidden, bias=False), *_norm_act(hidden, norm, act)
        )
        self._imgs_stat_layer = nn.Linear(hidden, flat)
        self._obs_stat_layer = nn.Linear(hidden, flat)
        if initial == "learned":
            self.W = nn.Parameter(torch.zeros(1, deter, device=torch.device(device)))

    def initial(self, batch_size):
        zeros = torch.zeros(batch_size, self._stoch, self._discrete, device=self._device)
        state = {"logit": zeros, "stoch": zeros.clone()}
        state["deter"] = torch.zeros(batch_size, self._deter, device=self._device)
        if self._initial == "learned":
            state["deter"] = torch.tanh(self.W).expand(batch_size, -1)
            state["stoch"] = self.get_stoch(state["deter"])
        return state

    def get_dist(self, state):
        return tools.OneHotDist(state["logit"], unimix_ratio=self._unimix_ratio)

    def get_stoch(self, deter):
        logit = self._stats(self._imgs_stat_layer, self._img_out_layers(deter))
        return self.get_dist({"logit": logit}).mode()

    def get_feat(self, state):
        return torch.cat([state["stoch"].flatten(-2), state["deter"]], -1)

    def _stats(self, layer, x):
        return layer(x).unflatten(-1, (self._stoch, self._discrete))

    def img_step(self, prev_state, prev_action, sample=True):
        x = self._img_in_layers(torch.cat([prev_state["stoch"].flatten(-2), prev_action], -1))
        _, (deter,) = self._cell(x, [prev_state["deter"]])
        logit = self._stats(self._imgs_stat_layer, self._img_out_layers(deter))
        dist = self.get_dist({"logit": logit})
        return {"stoch": dist.sample() if sample else dist.mode(), "deter": deter, "logit": logit}

    def obs_step(self, prev_state, prev_action, embed, is_first, sample=True):
        if prev_state is None or bool(is_first.bool().all()):
            prev_state = self.initial(len(is_first))
            prev_action = torch.zeros(len(is_first), self._num_actions, device=self._device)
        elif bool(is_first.bool().any()):
            keep = 1.0 - is_first.float()
            init = self.initial(len(is_first))
            prev_action = prev_action * keep[:, None]
            prev_state = {
                k: v * keep.view(-1, *[1] * (v.ndim - 1))
                + init[k] * (1 - keep).view(-1, *[1] * (v.ndim - 1))
                for k, v in prev_state.items()
            }
        prior = self.img_step(prev_state, prev_action)
        x = self._obs_out_layers(torch.cat([prior["deter"], embed], -1))
        logit = self._stats(self._obs_stat_layer, x)
        dist = self.get_dist({"logit": logit})
        stoch = dist.sample() if sample else dist.mode()
        return {"stoch": stoch, "deter": prior["deter"], "logit": logit}, prior

    def observe(self, embed, action, is_first, state=None):
        posts, priors = [], []
        for t in range(embed.shape[1]):  # always samples, as the original does
            state, prior = self.obs_step(state, action[:, t], embed[:, t], is_first[:, t])
            posts.append(state)
            priors.append(prior)

        def stack(steps):
            return {k: torch.stack([s[k] for s in steps], 1) for k in steps[0]}

        return stack(posts), stack(priors)

    def kl_loss(self, post, prior, free, dyn_scale, rep_scale):
        def kl(p, q):
            lp, lq = p["logit"].log_softmax(-1), q["logit"].log_softmax(-1)
            return (lp.exp() * (lp - lq)).sum((-2, -1))

        sg = {k: v.detach() for k, v in prior.items()}
        rep = kl(post, sg).clamp(min=free)
        dyn = kl({k: v.detach() for k, v in post.items()}, prior).clamp(min=free)
        return dyn_scale * dyn + rep_scale * rep, rep, dyn, rep


class Conv2dSamePad(nn.Conv2d):
    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, [left, right, top, bottom]))


class ImgChLayerNorm(nn.Module):
    def __init__(self, ch, eps=1e-3):
        super().__init__()
        self.norm = nn.LayerNorm(ch, eps=eps)

    def forward(self, x):
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ConvEncoder(nn.Module):
    def __init__(self, input_shape, depth=32, act="SiLU", norm=True, kernel_size=4, minres=4):
        super().__init__()
        side, _, channels = input_shape
        stages = int(math.log2(side) - math.log2(minres))
        layers, width = [], depth
        for _ in range(stages):
            layers.append(Conv2dSamePad(channels, width, kernel_size, 2, bias=False))
            layers += [ImgChLayerNorm(width)] * bool(norm) + [getattr(nn, act)()]
            channels, width, side = width, width * 2, side // 2
        self.layers = nn.Sequential(*layers)
        self.outdim = channels * side * side

    def forward(self, obs):
        obs -= 0.5  # in place, on the caller's tensor, as the original does
        x = self.layers(obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2))
        return x.reshape(*obs.shape[:-3], -1)


class ConvDecoder(nn.Module):
    def __init__(
        self, feat_size, shape=(3, 64, 64), depth=32, act="ELU", norm=True, kernel_size=4,
        minres=4, outscale=1.0, cnn_sigmoid=False,
    ):  # fmt: skip
        super().__init__()
        self._shape, self._minres, self._cnn_sigmoid = shape, minres, cnn_sigmoid
        count = int(math.log2(shape[1]) - math.log2(minres))
        self._embed_size = minres**2 * depth * 2 ** (count - 1)
        self._linear_layer = nn.Linear(feat_size, self._embed_size)
        pad = math.ceil((kernel_size - 2) / 2)  # "same" for stride 2
        layers, width = [], depth * 2 ** (count - 1)
        for i in range(count):
            last = i == count - 1
            out = shape[0] if last else width // 2
            extra = 2 * pad - kernel_size + 2
            layers.append(nn.ConvTranspose2d(width, out, kernel_size, 2, pad, extra, bias=last))
            if not last:
                layers += [ImgChLayerNorm(out)] * bool(norm) + [getattr(nn, act)()]
            width = out
        self.layers = nn.Sequential(*layers)

    def forward(self, features):
        x = self._linear_layer(features).reshape(-1, self._minres, self._minres,
                                                 self._embed_size // self._minres**2)  # fmt: skip
        x = self.layers(x.permute(0, 3, 1, 2))
        mean = x.reshape(features.shape[:-1] + self._shape).permute(0, 1, 3, 4, 2)  # [B, T] only
        return torch.sigmoid(mean) if self._cnn_sigmoid else mean + 0.5


def _image_keys(shapes, keys):
    return {k: v for k, v in shapes.items() if len(v) == 3 and re.match(keys, k)}


class MultiEncoder(nn.Module):
    def __init__(
        self, shapes, mlp_keys, cnn_keys, act, norm, cnn_depth, kernel_size, minres,
        mlp_layers, mlp_units, symlog_inputs,
    ):  # fmt: skip
        super().__init__()
        self.cnn_shapes = _image_keys(shapes, cnn_keys)
        first = next(iter(self.cnn_shapes.values()))
        channels = sum(v[-1] for v in self.cnn_shapes.values())
        self._cnn = ConvEncoder((*first[:2], channels), cnn_depth, act, norm, kernel_size, minres)
        self.outdim = self._cnn.outdim

    def forward(self, obs):
        return self._cnn(torch.cat([obs[k] for k in self.cnn_shapes], -1))


class MultiDecoder(nn.Module):
    def __init__(
        self, feat_size, shapes, mlp_keys, cnn_keys, act, norm, cnn_depth, kernel_size, minres,
        mlp_layers, mlp_units, cnn_sigmoid, image_dist, vector_dist, outscale,
    ):  # fmt: skip
        super().__init__()
        self.cnn_shapes = _image_keys(shapes, cnn_keys)
        first = next(iter(self.cnn_shapes.values()))
        shape = (sum(v[-1] for v in self.cnn_shapes.values()), *first[:-1])
        self._cnn = ConvDecoder(feat_size, shape, cnn_depth, act, norm, kernel_size, minres,
                                outscale, cnn_sigmoid)  # fmt: skip

    def forward(self, features):
        parts = self._cnn(features).split([v[-1] for v in self.cnn_shapes.values()], -1)
        return {k: tools.MSEDist(x) for k, x in zip(self.cnn_shapes, parts, strict=True)}


class MLP(nn.Module):
    def __init__(self, inp_dim, shape, layers, units, act="SiLU", norm=True, dist="normal",
                 outscale=1.0, device="cuda", name="NoName"):  # fmt: skip
        super().__init__()
        self._shape = (shape,) if isinstance(shape, int) else tuple(shape) or (1,)
        self._dist = dist
        self.layers = nn.Sequential()
        for i in range(layers):
            self.layers.add_module(f"{name}_linear{i}", nn.Linear(inp_dim, units, bias=False))
            if norm:
                self.layers.add_module(f"{name}_norm{i}", nn.LayerNorm(units, eps=1e-3))
            self.layers.add_module(f"{name}_act{i}", getattr(nn, act)())
            inp_dim = units
        self.mean_layer = nn.Linear(inp_dim, math.prod(self._shape))

    def forward(self, features):
        out = self.mean_layer(self.layers(features))
        return tools.Bernoulli(out) if self._dist == "binary" else tools.DiscDist(out)
