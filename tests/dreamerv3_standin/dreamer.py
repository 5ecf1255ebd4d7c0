"""Stand-in for NM512/dreamerv3-torch's dreamer.py: how a run builds its config and saves
``latest.pt``. The agent holds ``_wm`` (compiled when ``config.compile``: keys gain
``_orig_mod.``), ``_task_behavior`` and ``_expl_behavior`` (for "greedy", the same module
again), and ``latest.pt`` is ``{"agent_state_dict", "optims_state_dict"}``."""

from __future__ import annotations

import argparse
import pathlib

import models
import torch
import yaml
from torch import nn

HERE = pathlib.Path(__file__).parent


def _number(value):
    """configs.yaml is read as YAML 1.2, where ``1e-4`` is a float (PyYAML says str)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: _number(v) for k, v in value.items()}
    return value


def make_config(names, **overrides):
    """``python dreamer.py --configs NAMES --key value ...``, as a Namespace."""
    blocks = yaml.safe_load((HERE / "configs.yaml").read_text())
    config = {}

    def update(base, new):
        for k, v in new.items():
            if isinstance(v, dict) and k in base:
                update(base[k], v)
            else:
                base[k] = v

    for name in ["defaults", *names]:
        update(config, _number(blocks[name]))
    update(config, overrides)
    return argparse.Namespace(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in config.items()})  # fmt: skip


class Space:
    def __init__(self, shape):
        self.shape = shape


class Spaces:
    def __init__(self, spaces):
        self.spaces = spaces


class Dreamer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self._config = config
        obs_space = Spaces({"image": Space((*config.size, 3))})
        self._wm = models.WorldModel(obs_space, None, 0, config)
        self._task_behavior = models.ImagBehavior(config, self._wm)
        if config.compile:  # compiles lazily: nothing runs until called
            self._wm = torch.compile(self._wm)
            self._task_behavior = torch.compile(self._task_behavior)
        self._expl_behavior = self._task_behavior  # expl_behavior: greedy


def save_latest(agent, logdir):
    items = {
        "agent_state_dict": agent.state_dict(),
        "optims_state_dict": {"_wm._model_opt": agent._wm._model_opt.state_dict()},
    }
    path = pathlib.Path(logdir) / "latest.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(items, path)
    return path
