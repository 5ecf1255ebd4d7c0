"""Presets: a student's model from a known public code base, built and wrapped in one call.

:func:`dreamerv3_torch` is for NM512/dreamerv3-torch, the PyTorch DreamerV3 most P03
students start from. It imports the student's own checkout (``models.py``,
``networks.py``, ``tools.py``; **their code runs**), rebuilds their ``WorldModel`` from
their ``configs.yaml`` as ``dreamer.py --configs ...`` does, loads the weights as they
saved them, and wraps it in a :class:`~storm_lib.adapter.DreamerAdapter`::

    from storm_lib.outside import dreamerv3_torch
    def load(weights, device):
        return dreamerv3_torch("/path/to/their/dreamerv3-torch", weights, device,
                               configs=["atari100k"])

Facts of that code base this relies on: ``WorldModel(obs_space, act_space, step,
config)`` with ``.encoder`` (``MultiEncoder``: a dict ``{"image": [B, T, S, S, 3]}`` in
[0, 1], which it shifts in place), ``.dynamics`` (``RSSM``: ``obs_step(prev_state,
prev_action, embed, is_first, sample=True)``, ``img_step(prev_state, prev_action,
sample=True)``, ``get_feat``) and ``.heads["decoder"]`` (``MultiDecoder``: ``[B, T, F]``
features -> ``{"image": dist}``, ``dist.mode()`` ``[B, T, S, S, 3]``, unbounded: an MSE
decoder). Actions are one-hot; ``config.num_actions`` comes from the environment at run
time (not from ``configs.yaml``), so it is read off the weights here.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import DreamerAdapter, OutsideModelError
from .checkpoint import load_state_strict, unwrap_weights
from .utils import default_device

CHECKOUT_FILES = ("models.py", "networks.py", "tools.py", "configs.yaml")
CHECKOUT_MODULES = ("models", "networks", "tools")
"""Their top-level module names: common words, so any already imported are set aside."""
RUNTIME_KEYS = ("num_actions",)
"""Config entries dreamer.py sets at run time rather than in configs.yaml."""


@contextlib.contextmanager
def checkout_on_path(root: Path) -> Iterator[ModuleType]:
    """Their ``models`` module, imported from ``root`` with ``root`` first on ``sys.path``;
    afterwards ``sys.path`` and ``sys.modules`` are as before (their objects keep working:
    functions hold their own module's globals)."""
    clashing = {
        name: sys.modules.pop(name)
        for name in list(sys.modules)
        if name.split(".")[0] in CHECKOUT_MODULES
    }
    entry = str(root)
    sys.path.insert(0, entry)
    try:
        try:
            models = importlib.import_module("models")
        except Exception as exc:
            hint = (
                ". The student's checkout runs with its own dependencies (its tools.py imports "
                f"tensorboard): pip install -r {root / 'requirements.txt'}, or at least the "
                "missing package"
                if isinstance(exc, ImportError)
                else ""
            )
            raise OutsideModelError(
                f"{root}: importing its models.py raised {type(exc).__name__}: {exc}{hint}"
            ) from exc
        yield models
    finally:
        sys.path.remove(entry)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if name.split(".")[0] in CHECKOUT_MODULES or file.startswith(entry + os.sep):
                del sys.modules[name]
        sys.modules.update(clashing)


def read_yaml(path: Path) -> dict[str, Any]:
    """``configs.yaml`` as dreamer.py reads it (YAML 1.2, where ``1e-4`` is a number):
    with ruamel.yaml, their own dependency, else PyYAML taught YAML 1.2's floats."""
    text = path.read_text()
    try:
        from ruamel.yaml import YAML
    except ImportError:
        pass
    else:
        return YAML(typ="safe", pure=True).load(text)
    try:
        import yaml
    except ImportError:
        raise OutsideModelError(
            f"{path}: reading it needs ruamel.yaml (dreamerv3-torch's requirements.txt lists "
            "it; pip install ruamel.yaml) or PyYAML"
        ) from None

    class Yaml12(yaml.SafeLoader):
        """PyYAML reads ``1e-4`` (no dot) as a string, as YAML 1.1 says."""

    Yaml12.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return yaml.load(text, Loader=Yaml12)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    """dreamer.py's recursive update: nested blocks merge, other values replace."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"encoder": {"cnn_depth": 16}}`` -> ``{"encoder.cnn_depth": 16}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(tree: dict[str, Any], field: str) -> Any:
    for part in field.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _set(tree: dict[str, Any], field: str, value: Any) -> None:
    *parents, last = field.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def config_from_checkout(
    root: Path, configs: Sequence[str], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``defaults`` block of ``root/configs.yaml``, then each named block, then the
    keyword ``overrides`` (nested blocks merge), as ``dreamer.py --configs`` builds it.

    Raises:
        OutsideModelError: an unknown block name, or an override that names no setting.
    """
    blocks = read_yaml(root / "configs.yaml")
    names = ["defaults", *(n for n in configs if n != "defaults")]
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise OutsideModelError(
            f"{root / 'configs.yaml'} has no block {unknown} (it has {sorted(blocks)})"
        )
    config: dict[str, Any] = {}
    for name in names:
        _merge(config, blocks[name])
    known = set(_flat(config)) | set(config) | set(RUNTIME_KEYS)
    for field in _flat(overrides):
        if field not in known:
            close = difflib.get_close_matches(field, sorted(known), n=3)
            raise OutsideModelError(
                f"override {field}= names no setting of {root / 'configs.yaml'}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
            )
    _merge(config, overrides)
    return config


def _conv_weights(sd: Mapping[str, Tensor], prefix: str) -> list[str]:
    """Keys ``prefix{i}.weight`` of 4-d (convolution) weights, in layer order."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight$")
    keys = [(int(m.group(1)), k) for k in sd if (m := pattern.match(k)) and sd[k].ndim == 4]
    return [k for _, k in sorted(keys)]


def sizes_from_weights(sd: Mapping[str, Tensor], discrete: bool) -> dict[str, tuple[Any, str]]:
    """What the tensor shapes of a dreamerv3-torch ``WorldModel`` state dict show, in
    configs.yaml's names: ``{field: (value, "key [shape]")}``. ``dyn_stoch`` and
    ``dyn_discrete`` show only as their product when ``discrete`` (not returned)."""
    found: dict[str, tuple[Any, str]] = {}

    def note(field: str, value: Any, key: str) -> None:
        found[field] = (value, f"{key} {list(sd[key].shape)}")

    gru = "dynamics._cell.layers.GRU_linear.weight"
    img_in = "dynamics._img_in_layers.0.weight"
    stat = "dynamics._imgs_stat_layer.weight"
    obs_out = "dynamics._obs_out_layers.0.weight"
    reward = "heads.reward.layers.Reward_linear0.weight"
    linear = "heads.decoder._cnn._linear_layer.weight"
    if gru in sd:
        note("dyn_deter", sd[gru].shape[0] // 3, gru)  # reset, candidate, update gates
    if img_in in sd:
        note("dyn_hidden", sd[img_in].shape[0], img_in)
    if stat in sd and img_in in sd:
        latent = sd[stat].shape[0] if discrete else sd[stat].shape[0] // 2  # mean and std
        if not discrete:
            note("dyn_stoch", latent, stat)
        note("num_actions", sd[img_in].shape[1] - latent, img_in)
    if reward in sd:
        note("units", sd[reward].shape[0], reward)
    convs = _conv_weights(sd, "encoder._cnn.layers.")
    if convs:
        depth, channels, _, kernel = sd[convs[0]].shape
        note("encoder.cnn_depth", depth, convs[0])
        note("encoder.kernel_size", kernel, convs[0])
        note("grayscale", channels == 1, convs[0])
        if obs_out in sd and "dyn_deter" in found:  # embed = depth 2^(L-1) minres^2
            embed = sd[obs_out].shape[1] - found["dyn_deter"][0]
            minres = math.isqrt(embed // (depth * 2 ** (len(convs) - 1)))
            note("encoder.minres", minres, obs_out)
            side = minres * 2 ** len(convs)
            note("size", (side, side), obs_out)
    deconvs = _conv_weights(sd, "heads.decoder._cnn.layers.")
    if deconvs:  # the last transposed convolution takes cnn_depth channels
        depth = sd[deconvs[-1]].shape[0]
        note("decoder.cnn_depth", depth, deconvs[-1])
        note("decoder.kernel_size", sd[deconvs[-1]].shape[-1], deconvs[-1])
        if linear in sd:
            minres = math.isqrt(sd[linear].shape[0] // (depth * 2 ** (len(deconvs) - 1)))
            note("decoder.minres", minres, linear)
    return found


def _same(a: Any, b: Any) -> bool:
    return (tuple(a) == tuple(b)) if isinstance(a, (list, tuple)) else a == b


def _fit_sizes(
    config: dict[str, Any], sd: Mapping[str, Tensor], given: set[str]
) -> dict[str, tuple[Any, Any]]:
    """Take from the weights every size they show that the instructor did not give,
    and check those given; returns ``{field: (config's value, weights' value)}`` changed.

    Raises:
        OutsideModelError: a given size the weights contradict, or a latent of another
            dyn_stoch x dyn_discrete than the config's, which shapes cannot split.
    """
    changed = {}
    for field, (value, evidence) in sizes_from_weights(sd, bool(config["dyn_discrete"])).items():
        current = _get(config, field)
        if current is not None and _same(current, value):
            continue
        if field in given:
            raise OutsideModelError(
                f"{field}={current!r} was given, but the weights have {field}={value!r} "
                f"({evidence})"
            )
        _set(config, field, value)
        changed[field] = (current, value)
    stat = sd.get("dynamics._imgs_stat_layer.weight")
    stoch, classes = config["dyn_stoch"], config["dyn_discrete"]
    if stat is not None and classes and stoch * classes != stat.shape[0]:
        raise OutsideModelError(
            f"the weights' latent has dyn_stoch x dyn_discrete = {stat.shape[0]} "
            f"(dynamics._imgs_stat_layer.weight {list(stat.shape)}), the config's "
            f"{stoch} x {classes} = {stoch * classes}; no shape tells the two apart, so give "
            "both the student trained with, e.g. dyn_stoch=32, dyn_discrete=32"
        )
    return changed


def _world_model_adapter(wm: nn.Module, config: argparse.Namespace, clip: bool) -> DreamerAdapter:
    """Their world model's parts as DreamerAdapter's hooks."""
    dyn, decoder = wm.dynamics, wm.heads["decoder"]

    def encode(obs: Tensor) -> Tensor:  # [B, T, S, S, 3] in [0, 1], a fresh tensor
        return wm.encoder({"image": obs})

    def observe(embed: Tensor, prev_action: Tensor, is_first: Tensor, sample: bool = True) -> dict:
        # RSSM.observe always samples; its obs_step takes the flag
        state, posts = None, []
        for t in range(embed.shape[1]):
            state, _ = dyn.obs_step(
                state, prev_action[:, t], embed[:, t], is_first[:, t].float(), sample=sample
            )
            posts.append(state)
        return {k: torch.stack([p[k] for p in posts], 1) for k in posts[0]}

    def img_step(state: dict, action: Tensor, sample: bool = True) -> dict:
        return dyn.img_step(state, action, sample=sample)

    def decode(state: dict) -> Tensor:  # MultiDecoder wants [B, T, F]
        return decoder(dyn.get_feat(state)[:, None])["image"].mode()[:, 0]

    adapter = DreamerAdapter(
        encode=encode, observe=observe, img_step=img_step, decode=decode,
        action_dim=int(config.num_actions), pixels="0-1", actions="onehot",
        channels_last=True, clip=clip, image_size=int(config.size[0]), module=wm,
    )  # fmt: skip
    adapter.world_model, adapter.config = wm, config
    return adapter


def build_world_model(models: ModuleType, config: argparse.Namespace) -> nn.Module:
    """``models.WorldModel(obs_space, act_space, step, config)`` with stand-ins for the gym
    spaces (it reads ``obs_space.spaces[key].shape`` only): Atari's one ``image`` key."""
    side = tuple(config.size)
    spaces = SimpleNamespace(spaces={"image": SimpleNamespace(shape=(*side, 3))})
    actions = SimpleNamespace(n=config.num_actions, shape=(config.num_actions,), discrete=True)
    return models.WorldModel(spaces, actions, 0, config)


def dreamerv3_torch(
    checkout: str | Path,
    weights: Any,
    device: torch.device | str | None = None,
    configs: Sequence[str] = (),
    *,
    clip: bool = True,
    quiet: bool = False,
    **overrides: Any,
) -> DreamerAdapter:
    """A student's NM512/dreamerv3-torch world model, from their checkout and weights.

    Sizes that tensor shapes show (``dyn_deter``, ``dyn_hidden``, ``units``, the
    encoder's and decoder's ``cnn_depth``/``kernel_size``/``minres``, ``size``,
    ``num_actions``) are taken from the weights where the config says otherwise, and
    printed; a size given in ``overrides`` is checked instead. ``dyn_stoch`` x
    ``dyn_discrete`` shows only as a product: when it differs from the config, give both.
    Anything else that does not fit is a ``CheckpointError`` listing the keys.

    Args:
        checkout: the student's clone (``models.py``, ``networks.py``, ``tools.py``,
            ``configs.yaml``). **Its code runs**, with its own dependencies.
        weights: what ``load(weights, device)`` received: dreamer.py's ``latest.pt``
            (``agent_state_dict`` beside ``optims_state_dict``), ``agent.state_dict()``,
            or the world model's own state dict, compiled or not
            (:func:`~storm_lib.checkpoint.unwrap_weights`).
        device: where it runs; its config's ``device`` becomes ``str(device)``.
        configs: the configs.yaml blocks after ``defaults``, as ``--configs`` named them.
        clip: clamp its decoded frames (an unbounded MSE decoder) to [0, 1], counting
            how far out they were in ``.clip_stats``.
        quiet: print nothing of what was unwrapped or inferred.
        **overrides: the student's own settings, e.g. ``dyn_deter=256`` or
            ``encoder={"cnn_depth": 16}`` (nested blocks merge).

    Returns:
        A :class:`DreamerAdapter` whose hooks take the mode (argmax: ``sample=False``),
        with ``.world_model`` (their ``WorldModel``, eval mode) and ``.config``.

    Raises:
        OutsideModelError: not a checkout, its import fails (a missing dependency), an
            unknown config block or override, or sizes that contradict the weights.
        CheckpointError: weights that are no state dict, or do not fit the model.
    """
    device = default_device(device)
    root = Path(checkout).expanduser().resolve()
    missing = [f for f in CHECKOUT_FILES if not (root / f).is_file()]
    if missing:
        what = "is not a directory" if not root.is_dir() else f"lacks {missing}"
        raise OutsideModelError(f"{root}: not a dreamerv3-torch checkout: it {what}")
    state = unwrap_weights(weights, source="dreamerv3_torch weights", quiet=quiet)
    raw = config_from_checkout(root, configs, overrides)
    changed = _fit_sizes(raw, state, set(_flat(overrides)))
    if raw.get("grayscale"):
        raise OutsideModelError(
            f"{root}: a grayscale=True model cannot be scored against the RGB frames here"
        )
    if raw.get("num_actions") is None:
        raise OutsideModelError("the weights do not show the action count: pass num_actions=")
    if len(set(raw["size"])) != 1:
        raise OutsideModelError(f"size={raw['size']}: only square frames can be scored here")
    inferred = ", ".join(
        f"{k}={v!r}" + (f" (configs: {c!r})" if c is not None else "")
        for k, (c, v) in changed.items()
    )
    if inferred and not quiet:
        print(f"dreamerv3_torch: from the weights' shapes: {inferred}")
    raw["device"] = str(device)
    config = argparse.Namespace(  # as dreamer.py's argparse hands it over: lists as tuples
        **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    )
    with checkout_on_path(root) as models, contextlib.redirect_stdout(io.StringIO()):
        wm = build_world_model(models, config)  # it prints its sizes: muted
    load_state_strict(
        wm, state, f"{root}: its WorldModel", ours=False,
        note=f"built from configs {['defaults', *configs]}"
        + (f"; from the weights' shapes: {inferred}" if inferred else "")
        + "; give the student's own settings as keyword overrides",
    )  # fmt: skip
    wm.to(device).eval().requires_grad_(False)
    return _world_model_adapter(wm, config, clip)
