"""P03 checkpoints: save an RSSM where a P03 checkpoint goes, and load one forgivingly.

:func:`load_rssm_checkpoint` reads this project's format, or a bare state dict of
:class:`~storm_lib.models.rssm.RSSMWorldModel` (nested or not, with or without a
``torch.compile`` prefix), inferring the sizes from tensor shapes. It is strict about
content: anything it cannot map is a :class:`~storm_lib.checkpoint.CheckpointError` that
lists missing keys, unexpected keys, shape mismatches and the sizes it inferred.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import (
    CheckpointError,
    load_state_strict,
    read_checkpoint,
    safe_torch_load,
    save_checkpoint,
    strip_compile_prefix,
)
from .config import Config, get_profile
from .models.rssm import RSSMWorldModel
from .utils import default_device


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
        nests = ("state_dict", "model", "agent_state_dict")  # the last: dreamerv3-torch's
        inner = [raw[k] for k in nests if isinstance(raw.get(k), dict)]
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


def _split_latent(
    stoch: int, categoricals: int | None, classes: int | None, source: str
) -> tuple[int, int]:
    """K and V from their product (the only thing the shapes give) and what the user said."""
    how = (
        "say which with categoricals= / classes= (CLI: --rssm-latent KxV, e.g. 32x32; "
        "notebook: P03_LATENT=32x32)"
    )
    if categoricals is None and classes is None:
        raise CheckpointError(
            f"{source}: the RSSM's prior has K x V = {stoch} outputs, and no tensor shape tells "
            f"the categoricals K from the classes V (32 x 32 and 64 x 16 look the same); {how}"
        )
    k = categoricals if categoricals is not None else stoch // max(classes or 1, 1)
    v = classes if classes is not None else stoch // max(categoricals or 1, 1)
    if k < 1 or v < 1 or k * v != stoch:
        raise CheckpointError(
            f"{source}: K={categoricals} and V={classes} do not fit the prior's {stoch} "
            f"outputs (K x V must equal {stoch}); {how}"
        )
    return k, v


def _infer_config(
    sd: dict[str, Tensor],
    source: str,
    categoricals: int | None = None,
    classes: int | None = None,
) -> tuple[Config, int, str]:
    """Config and action count of the RSSM that ``sd`` belongs to, and a note of the sizes.

    deter and hidden from ``gru.weight_ih`` [3*deter, hidden]; K*V from ``prior.3.weight``;
    A = ``img_in.0.weight`` columns - K*V; stem channels, stages and BatchNorm from the
    encoder convs; E from ``posterior.0.weight`` columns - deter, hence the image size;
    reward bins and MLP layers from the reward head. K and V change no shape, only their
    product does, so one of them must be given. Reward bin range and unimix are defaults.
    """

    def shape(key: str, dims: int) -> tuple[int, ...]:
        if key not in sd or sd[key].dim() != dims:
            found = ", ".join(sorted(sd)[:8])
            raise CheckpointError(
                f"{source}: cannot infer the RSSM sizes: missing key {key!r} "
                f"({dims}-d tensor); the file has keys like: {found}. If this is a student's "
                "own model with its own module names, score it with their code instead: "
                "--rssm-code p03_model.py:load (README, 'Instructors')"
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
    if min(stem, stoch, deter, hidden) < 1:
        raise CheckpointError(f"{source}: a layer of the RSSM has zero width")
    final_channels = stem * 2 ** (stages - 1)
    final_size = math.isqrt(max(embed // final_channels, 0))
    last = max(_max_index(sd, "reward_head.net"), 0)
    bins, mlp_layers = shape(f"reward_head.net.{last}.weight", 2)[0], last // 3 + 1
    vae = config.vae
    k, v = _split_latent(stoch, categoricals, classes, source)
    note = (
        f"inferred: deter={deter}, hidden={hidden}, K*V={stoch} (K={k}, V={v} as given), "
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
    categoricals: int | None = None,
    classes: int | None = None,
) -> RSSMWorldModel:
    """Load an RSSM (P03) checkpoint: this project's format or a bare state dict.

    A bare state dict (``torch.save(model.state_dict())``, optionally under ``"state_dict"``
    or ``"model"``, optionally with ``_orig_mod.`` prefixes) must use the key names listed
    in :func:`save_p03_checkpoint`; the sizes are inferred from the tensor shapes and any
    mismatch names the missing and unexpected keys, the shape mismatches and the inferred
    sizes. K and V appear in no shape, only K * V does: for a bare state dict give
    ``categoricals`` (K) or ``classes`` (V), or both; the loader never guesses them.
    Files are always read with ``weights_only=True`` and ``map_location``, never written.

    Args:
        path: the file.
        device: where to put the model (default: CUDA if available, else CPU).
        action_dim: if given, the dataset's action count, which the model must match.
        categoricals: K, for a bare state dict (ignored for this project's format).
        classes: V, likewise.

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
        config, found_actions, note = _infer_config(state_dict, source, categoricals, classes)
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
