"""MLP prior against MaskGIT prior (GIT-STORM): one comparison for the CLI and the notebook.

Both STORM models share every setting of the profile but ``heads.dynamics_head``, are
initialised after seeding with ``train.seed``, train on the same data for the same number
of steps (``workflow.train_or_load``: a finished checkpoint is reused), and are scored on
the same held-out windows:

* PSNR against horizon (``evaluate.rollout_psnr``, the Section 4 protocol);
* token perplexity and the teacher-forced token NLL of the prior
  (``diagnostics.token_perplexity``, GIT-STORM appendix K);
* the last validation ``token_nll`` of training (each head's own objective: all K tokens
  for the MLP prior, the masked ones rescaled to K for the MaskGIT prior);
* cost: median ms per training step (loss, backward, clip, Adam on a copy of the model,
  one training-sized batch), training wall-clock ms per step from the history, and
  median ms per imagined rollout (KV cache, C + H of the evaluation protocol, one
  evaluation batch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import Config
from .data import TrajectoryData
from .diagnostics import token_perplexity
from .evaluate import RolloutPSNR, rollout_psnr
from .models import WorldModel
from .train import History, TrainStep
from .types import Batch
from .utils import default_device, median_ms, private_rng
from .workflow import train_or_load

HEADS: dict[str, Literal["mlp", "maskgit"]] = {"MLP prior": "mlp", "MaskGIT prior": "maskgit"}
"""Display name -> ``heads.dynamics_head``."""


@dataclass
class PriorComparison:
    """Result of :func:`compare_priors`."""

    psnr: RolloutPSNR
    """PSNR per imagined step of both models, with ceilings and copy-last."""
    metrics: dict[str, dict[str, float]]
    """Display name -> ``perplexity``, ``token_nll`` (held-out, teacher-forced, nats per
    frame), ``val_token_nll`` (last validation record of training), ``ms_train_step``,
    ``ms_train_step_history``, ``ms_rollout``, ``steps``, ``params_prior`` (millions)."""
    profile: str

    def table(self) -> str:
        """The PSNR table and one line of metrics per model, as text."""
        cols = [
            ("perplexity", "perplexity", "{:.2f}"),
            ("token_nll", "NLL held-out", "{:.2f}"),
            ("val_token_nll", "NLL val", "{:.2f}"),
            ("ms_train_step", "ms/step", "{:.0f}"),
            ("ms_train_step_history", "ms/step run", "{:.0f}"),
            ("ms_rollout", "ms/rollout", "{:.0f}"),
            ("params_prior", "prior M", "{:.3f}"),
            ("steps", "steps", "{:.0f}"),
        ]
        width = max(len(n) for n in self.metrics) + 2
        head = "".join(f"{label:>14}" for _, label, _ in cols)
        lines = [self.psnr.table(), "", f"{'':<{width}}{head}"]
        for name, m in self.metrics.items():
            cells = "".join(f"{fmt.format(m[key]):>14}" for key, _, fmt in cols)
            lines.append(f"{name:<{width}}{cells}")
        lines.append(
            "perplexity and NLL held-out (nats/frame): teacher-forced on the PSNR windows; "
            "NLL val: last validation token_nll of training (each head's own objective); "
            "ms/step: median training step now; ms/step run: training wall-clock / steps; "
            "ms/rollout: median cached imagine of one evaluation batch; prior M: parameters "
            "of the prior head (millions)."
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict."""
        return {"profile": self.profile, "psnr": self.psnr.to_dict(), "metrics": self.metrics}


def _ms_train_step(model: Any, batch: Batch, config: Config, repeats: int) -> float:
    """Median ms of one training step on a copy of ``model`` (the original is untouched)."""
    twin = copy.deepcopy(model).train()
    step = TrainStep(twin, config.train, batch.obs.device)  # fit()'s own step
    return median_ms(lambda: step(twin.loss, batch), batch.obs.device, repeats=repeats)


def _ms_rollout(model: WorldModel, windows: Batch, context: int, repeats: int) -> float:
    """Median ms of one cached ``imagine`` over ``windows`` (C = ``context``)."""
    obs, action = windows.obs, windows.action
    return median_ms(
        lambda: model.imagine(obs[:, :context], action[:, :context], action[:, context:-1]),
        obs.device, repeats=repeats,
    )  # fmt: skip


def compare_priors(
    config: Config,
    train_data: TrajectoryData,
    val_data: TrajectoryData,
    *,
    mlp_path: str | Path,
    maskgit_path: str | Path,
    retrain: bool = False,
    count: int | None = None,
    repeats: int = 5,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PriorComparison:
    """Train or load STORM with each dynamics head and compare them on held-out windows.

    Args:
        config: the profile; only ``heads.dynamics_head`` differs between the two models.
        train_data, val_data: the episode split of one trajectory file.
        mlp_path, maskgit_path: checkpoints, reused when finished with matching settings.
        retrain: replace existing checkpoints of ours (never foreign files).
        count: evaluation windows (default ``config.eval.count``).
        repeats: timed repetitions (after one warm-up) for the cost numbers.
        device: default CUDA when available.
        progress: tqdm bars.

    Returns:
        :class:`PriorComparison`.
    """
    device = default_device(device)
    ev, tr = config.eval, config.train
    count = count or ev.count
    length = ev.context + ev.horizon
    models: dict[str, WorldModel] = {}
    histories: dict[str, History] = {}
    for (name, head), path in zip(HEADS.items(), (mlp_path, maskgit_path), strict=True):
        cfg = copy.deepcopy(config)
        cfg.heads.dynamics_head = head
        models[name], histories[name] = train_or_load(
            "storm", cfg, train_data, val_data, path, retrain=retrain, device=device,
            progress=progress,
        )  # fmt: skip
    psnr = rollout_psnr(
        models, val_data, context=ev.context, horizon=ev.horizon, count=count, seed=ev.seed,
        batch_size=ev.batch_size, device=device, progress=progress,
    )  # fmt: skip
    train_batch = train_data.eval_windows(tr.batch_size, tr.seq_len, tr.seed).to(device)
    roll_batch = val_data.eval_windows(ev.batch_size, length, ev.seed).to(device)
    metrics: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        ppl = token_perplexity(
            model, val_data, length=length, count=count, seed=ev.seed,
            batch_size=ev.batch_size, device=device,
        )  # fmt: skip
        history = histories[name]
        last_val = history.val[-1] if history.val else {}
        last_train = history.train[-1] if history.train else {}
        steps = float(last_train.get("step", 0))
        with private_rng(ev.seed, device):
            ms_roll = _ms_rollout(model, roll_batch, ev.context, repeats)
        metrics[name] = {
            "perplexity": ppl["perplexity"],
            "token_nll": ppl["token_nll"],
            "val_token_nll": float(last_val.get("token_nll", float("nan"))),
            "ms_train_step": _ms_train_step(model, train_batch, config, repeats),
            "ms_train_step_history": 1000.0 * history.train_seconds / max(steps, 1.0),
            "ms_rollout": ms_roll,
            "steps": steps,
            "params_prior": sum(p.numel() for p in model.parts()["prior head"].parameters()) / 1e6,
        }
    return PriorComparison(psnr=psnr, metrics=metrics, profile=config.name)
