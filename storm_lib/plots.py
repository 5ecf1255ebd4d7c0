"""Every figure the notebook shows. Each function returns a Matplotlib ``Figure``.

Nothing here calls ``plt.show()`` and nothing needs a display (the ``Agg`` backend
works); figures are small (``dpi=100``) so the executed notebook stays a few MB.
Frames are ``[3, S, S]`` tensors or arrays in [0, 1].

Glossary: B batch, T time, C context, H horizon, K categoricals, V classes, N tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import animation
from matplotlib.figure import Figure

from .diagnostics import SlidingWindowLoss, TokenStatistics
from .evaluate import RolloutPSNR
from .files import atomic_write

DPI = 100
"""Resolution of every figure."""


def _figure(rows: int = 1, cols: int = 1, *, size: tuple[float, float] = (6.0, 3.5)) -> Any:
    """A new figure and axes, not registered with pyplot (no show, no global state)."""
    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _img(frame: Any) -> np.ndarray:
    """``[3, S, S]`` in [0, 1] -> ``[S, S, 3]`` for ``imshow``."""
    x = _np(frame)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, S, S] frame, got {x.shape}")
    return np.clip(x.transpose(1, 2, 0), 0.0, 1.0)


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


_BASELINE_STYLE = {
    "copy-last": dict(color="0.35", ls=":"),
    "linear extrapolation": dict(color="0.55", ls="-."),
    "context mean": dict(color="0.7", ls=(0, (1, 3))),
}


def plot_psnr_vs_horizon(
    results: RolloutPSNR | Mapping[str, RolloutPSNR], *, title: str | None = None
) -> Figure:
    """PSNR (dB) per imagined step, one panel per mode (argmax, sampled) on a shared
    y-axis: models (solid), their ceilings of the same kind (dashed, same colour) and the
    trivial baselines (grey), with 95% bands."""
    panels = {results.mode: results} if isinstance(results, RolloutPSNR) else dict(results)
    fig, axes = _figure(1, len(panels), size=(5.2 * len(panels) + 2.2, 4.0))
    for ax, result in zip(axes[0], panels.values(), strict=True):
        steps = result.steps

        def draw(stats: Any, label: str, ax: Any = ax, steps: Any = steps, **style: Any) -> None:
            line = ax.plot(steps, stats.mean, marker="o", markersize=3, label=label, **style)[0]
            hw = np.nan_to_num(stats.half_width)
            ax.fill_between(steps, stats.mean - hw, stats.mean + hw, color=line.get_color(),
                            alpha=0.15)  # fmt: skip

        for i, (name, stats) in enumerate(result.models.items()):
            draw(stats, name, color=f"C{i}")
            if name in result.ceilings:
                draw(result.ceilings[name], f"{name} ceiling", color=f"C{i}", ls="--")
        for name, stats in result.baselines.items():
            draw(stats, name, **_BASELINE_STYLE.get(name, dict(color="0.5", ls=":")))
        latents = "argmax latents" if result.mode == "mode" else "sampled latents"
        ax.set_title(f"{latents}; ceilings decode the {result.ceiling_kind}", fontsize=9)
        ax.set_xlabel("imagined step k (frame C+k)")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("PSNR (dB)")
    low = min(a.get_ylim()[0] for a in axes[0])
    high = max(a.get_ylim()[1] for a in axes[0])
    for ax in axes[0]:
        ax.set_ylim(low, high)
    first = next(iter(panels.values()))
    fig.suptitle(
        title or f"PSNR vs horizon (context {first.context}, n={first.copy_last.n})", fontsize=10
    )
    axes[0, -1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_action_sensitivity(sensitivity: Mapping[str, Any]) -> Figure:
    """Does each model use its actions? Left: PSNR against the truth of the same rollouts
    under the real future actions (solid) and under another window's (dashed). Right:
    PSNR between the two rollouts (high = the actions change little; 100 = identical)."""
    fig, axes = _figure(1, 2, size=(11.0, 3.6))
    for i, (name, s) in enumerate(sensitivity.items()):
        steps = np.arange(1, len(s.real.mean) + 1)
        axes[0, 0].plot(steps, s.real.mean, marker="o", ms=3, color=f"C{i}", label=f"{name} real")
        axes[0, 0].plot(steps, s.shuffled.mean, marker="o", ms=3, color=f"C{i}", ls="--",
                        label=f"{name} shuffled")  # fmt: skip
        axes[0, 1].plot(steps[1:], s.between.mean[1:], marker="o", ms=3, color=f"C{i}", label=name)
    axes[0, 0].set_title("PSNR vs truth: real vs shuffled future actions", fontsize=9)
    axes[0, 1].set_title("PSNR between the two rollouts (from step 2)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("imagined step k")
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _series(records: Sequence[Mapping[str, float]], key: str, metric: str) -> tuple:
    pts = [(r[key], r[metric]) for r in records if metric in r and key in r]
    if not pts:
        return np.array([]), np.array([])
    x, y = zip(*pts, strict=True)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def plot_val_loss_vs_time(histories: Mapping[str, Any], metric: str = "loss/total") -> Figure:
    """Validation ``metric`` against training wall-clock seconds, all models on one axes.

    Args:
        histories: name -> object with ``.val``, a list of dicts with ``time`` and metrics.
        metric: the key plotted.
    """
    fig, axes = _figure()
    ax = axes[0, 0]
    for name, history in histories.items():
        x, y = _series(history.val, "time", metric)
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Validation {metric} vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _ema(y: np.ndarray, weight: float) -> np.ndarray:
    out, acc = np.empty_like(y), y[0] if len(y) else 0.0
    for i, v in enumerate(y):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc
    return out


def plot_training_curves(
    history: Any,
    metrics: Sequence[str] = ("token_nll", "loss/reward"),
    *,
    smoothing: float = 0.9,
) -> Figure:
    """One subplot per metric: training curve (EMA-smoothed) and validation points.

    Args:
        history: a History-like object (``.train``/``.val`` lists of dicts with ``step``),
            or name -> History-like to overlay several models.
        metrics: metric keys, e.g. ``token_nll`` (nats/frame) and ``loss/reward``.
        smoothing: EMA weight of the training curve (0 = raw).
    """
    histories = history if isinstance(history, Mapping) else {"": history}
    fig, axes = _figure(1, len(metrics), size=(4.0 * len(metrics), 3.3))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, (name, h) in enumerate(histories.items()):
            prefix = f"{name} " if name else ""
            x, y = _series(h.train, "step", metric)
            if len(y):
                ax.plot(x, _ema(y, smoothing), color=f"C{i}", label=f"{prefix}train (EMA)")
            x, y = _series(h.val, "step", metric)
            if len(y):
                ax.plot(x, y, "o", color=f"C{i}", markersize=4, label=f"{prefix}validation")
        ax.set_xlabel("gradient step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_step_time(timings: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Milliseconds per step against sequence length, log-log, with linear and
    quadratic guide lines anchored at the first model's first point."""
    fig, axes = _figure(size=(5.5, 4.0))
    ax = axes[0, 0]
    for name, t in timings.items():
        ax.plot(t["lengths"], t["ms_per_step"], marker="o", label=f"{name} ({t.get('mode', '')})")
    first = next(iter(timings.values()))
    lengths = np.asarray(first["lengths"], dtype=float)
    l0, m0 = lengths[0], first["ms_per_step"][0]
    ax.plot(lengths, m0 * lengths / l0, "k--", lw=0.8, label="linear guide")
    ax.plot(lengths, m0 * (lengths / l0) ** 2, "k:", lw=0.8, label="quadratic guide")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (steps)")
    ax.set_ylabel("ms per step")
    ax.set_title("Step time vs sequence length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_prior_comparison(comparison: Any) -> Figure:
    """MLP prior vs MaskGIT prior (``storm_lib.compare.PriorComparison``): PSNR against
    horizon with 95% bands and the copy-last baseline; token perplexity; ms per training
    step and per rollout."""
    fig, axes = _figure(1, 3, size=(13.0, 3.6))
    ax = axes[0, 0]
    result = comparison.psnr
    for i, (name, stats) in enumerate(result.models.items()):
        hw = np.nan_to_num(stats.half_width)
        ax.plot(result.steps, stats.mean, marker="o", markersize=3, color=f"C{i}", label=name)
        ax.fill_between(result.steps, stats.mean - hw, stats.mean + hw, color=f"C{i}", alpha=0.15)
    ax.plot(result.steps, result.copy_last.mean, ":", color="0.4", label="copy last frame")
    ax.set_xlabel("imagined step k")
    ax.set_ylabel("PSNR (dB)")
    ax.set_xticks(result.steps)
    ax.set_title(f"PSNR vs horizon (n={result.copy_last.n})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = list(comparison.metrics)
    colors = [f"C{i}" for i in range(len(names))]
    ax = axes[0, 1]
    ax.bar(names, [comparison.metrics[n]["perplexity"] for n in names], color=colors)
    ax.set_ylabel("token perplexity (held-out)")
    ax.set_title("Perplexity (lower is better)")
    ax = axes[0, 2]
    x = np.arange(2)
    for i, name in enumerate(names):
        m = comparison.metrics[name]
        ax.bar(x + (i - 0.5) * 0.4, [m["ms_train_step"], m["ms_rollout"]], 0.4,
               color=colors[i], label=name)  # fmt: skip
    ax.set_xticks(x, ["training step", "rollout (cached)"])
    ax.set_ylabel("ms (median)")
    ax.set_title("Cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _frames(x: Any) -> np.ndarray:
    """``[..., 3, S, S]`` -> ``[N, 3, S, S]``."""
    arr = _np(x)
    return arr.reshape(-1, *arr.shape[-3:])


def plot_reconstructions(obs: Any, recon: Any, n: int = 8) -> Figure:
    """Top row the true frames, bottom row their reconstructions (first ``n`` frames).

    Shapes:
        obs, recon: ``[..., 3, S, S]`` (e.g. ``[B, T, 3, S, S]``, flattened).
    """
    truth, rec = _frames(obs)[:n], _frames(recon)[:n]
    n = len(truth)
    fig, axes = _figure(2, n, size=(1.2 * n, 2.8))
    for i in range(n):
        axes[0, i].imshow(_img(truth[i]))
        axes[1, i].imshow(_img(rec[i]))
        _off(axes[0, i])
        _off(axes[1, i])
    axes[0, 0].set_ylabel("truth")
    axes[1, 0].set_ylabel("recon.")
    fig.suptitle("Categorical VAE: encode -> decode")
    fig.tight_layout()
    return fig


def plot_rollout_grid(
    truth: Any, rollouts: Mapping[str, Any], context: Any | None = None
) -> Figure:
    """Rows: ground truth, then each model; columns: imagined steps 1..H.

    Args:
        truth: ``[H, 3, S, S]`` real future frames.
        rollouts: name -> ``[H, 3, S, S]`` imagined frames.
        context: optional ``[3, S, S]`` last context frame, shown first in every row.
    """
    rows = {"truth": _frames(truth), **{k: _frames(v) for k, v in rollouts.items()}}
    horizon = len(rows["truth"])
    offset = 0 if context is None else 1
    cols = horizon + offset
    fig, axes = _figure(len(rows), cols, size=(1.0 * cols, 1.1 * len(rows) + 0.4))
    for r, (name, frames) in enumerate(rows.items()):
        if context is not None:
            axes[r, 0].imshow(_img(context))
            if r == 0:
                axes[r, 0].set_title("last ctx", fontsize=8)
        for k in range(horizon):
            axes[r, k + offset].imshow(_img(frames[k]))
            if r == 0:
                axes[r, k + offset].set_title(f"k={k + 1}", fontsize=8)
        for ax in axes[r]:
            _off(ax)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Open-loop imagination vs ground truth")
    fig.tight_layout()
    return fig


def rollout_animation(
    truth: Any, rollouts: Mapping[str, Any], *, interval: int = 300
) -> animation.FuncAnimation:
    """Side-by-side animation of the true future and each model's rollout.

    Render inline with :func:`animation_html` (``anim.to_jshtml()``).

    Shapes:
        truth and each rollout: ``[H, 3, S, S]``.
    """
    return grid_animation({"truth": truth, **rollouts}, interval=interval)


def grid_animation(
    panels: Mapping[str, Any],
    *,
    cols: int | None = None,
    captions: Mapping[str, Sequence[str]] | None = None,
    interval: int = 300,
    panel_size: float = 1.6,
    title: str = "step {k}",
) -> animation.FuncAnimation:
    """Frame sequences played side by side, one panel each, in rows of ``cols``.

    Args:
        panels: panel title -> frames ``[T, 3, S, S]`` (the same T for every panel).
        cols: panels per row (default: all in one row).
        captions: panel title -> one line of text per frame, shown under the panel.
        interval: milliseconds per frame.
        panel_size: inches per panel.
        title: the figure title; ``{k}`` is the frame number from 1.

    Render inline with :func:`animation_html`.
    """
    rows = {name: _frames(frames) for name, frames in panels.items()}
    lengths = {len(f) for f in rows.values()}
    if len(lengths) != 1:
        raise ValueError(f"every panel needs the same number of frames, got {sorted(lengths)}")
    cols = cols or len(rows)
    grid = -(-len(rows) // cols)
    fig, axes = _figure(grid, cols, size=(panel_size * cols, (panel_size + 0.3) * grid))
    images, labels = [], []
    for ax, (name, frames) in zip(axes.flat, rows.items(), strict=False):
        images.append(ax.imshow(_img(frames[0])))
        ax.set_title(name, fontsize=8)
        labels.append(ax.set_xlabel(captions[name][0] if captions else "", fontsize=7))
        _off(ax)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_axis_off()
    label = fig.suptitle(title.format(k=1), fontsize=9)

    def update(k: int) -> list[Any]:
        for im, text, (name, frames) in zip(images, labels, rows.items(), strict=True):
            im.set_data(_img(frames[k]))
            if captions:
                text.set_text(captions[name][k])
        label.set_text(title.format(k=k + 1))
        return [*images, *labels, label]

    return animation.FuncAnimation(fig, update, frames=lengths.pop(), interval=interval, blit=False)


def animation_html(anim: animation.FuncAnimation) -> str:
    """The animation as self-contained HTML/JS for a notebook (``IPython.display.HTML``)."""
    return anim.to_jshtml()


def animation_gif_html(anim: animation.FuncAnimation, *, fps: float = 4.0) -> str:
    """The animation as an inline looping GIF (an ``<img>`` tag): no controls, but about a
    third of :func:`animation_html`'s size for frames of flat Atari colours, which keeps
    an executed notebook small."""
    import base64
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "animation.gif"
        anim.save(path, writer=animation.PillowWriter(fps=fps))
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/gif;base64,{data}" alt="animation"/>'


def plot_results_comparison(runs: Mapping[str, Mapping[str, Any]], *, mode: str = "mode") -> Figure:
    """PSNR against horizon of saved runs on one axes: one line with its 95% band for each
    model of each run, labelled ``"run / model"``; runs differ by line style.

    Args:
        runs: run label -> a results document (:func:`storm_lib.results.load`).
        mode: ``"mode"`` (argmax latents) or ``"sample"`` (sampled latents).
    """
    fig, axes = _figure(size=(7.5, 4.2))
    ax = axes[0, 0]
    styles = ("-", "--", ":", "-.")
    line = 0
    for r, (label, doc) in enumerate(runs.items()):
        for name, model in doc["models"].items():
            stats = model["psnr"][mode]
            mean = np.asarray(stats["mean"], dtype=float)
            hw = np.nan_to_num(np.asarray(stats["half_width"], dtype=float))
            steps = np.arange(1, len(mean) + 1)
            color = f"C{line % 10}"
            ax.plot(steps, mean, styles[r % len(styles)], marker="o", markersize=3, color=color,
                    label=f"{label} / {name}")  # fmt: skip
            ax.fill_between(steps, mean - hw, mean + hw, color=color, alpha=0.15)
            line += 1
    latents = "argmax latents" if mode == "mode" else "sampled latents"
    ax.set_title(f"PSNR vs horizon of saved runs ({latents}, 95% bands)", fontsize=9)
    ax.set_xlabel("imagined step k (frame C+k)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


IMAGE_SIGNATURES = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".svg": (b"<?xml", b"<svg")}
"""The figure formats :func:`save_figure` writes, and how a file of each kind begins."""


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names.

    An existing file is replaced only when it is an image of that format (a figure an
    earlier run wrote); anything else there is left as it is.

    Raises:
        ValueError: the suffix is not one of :data:`IMAGE_SIGNATURES`, or ``path`` holds
            something other than such an image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SIGNATURES:
        raise ValueError(f"{path}: a figure must be {', '.join(IMAGE_SIGNATURES)}")
    if path.exists():
        with path.open("rb") as f:
            head = f.read(8)
        if not path.is_file() or not head.startswith(IMAGE_SIGNATURES[suffix]):
            raise ValueError(
                f"{path}: exists and is not a {suffix} image, so it is not overwritten: "
                "choose another file for the figure"
            )
    return atomic_write(
        path, lambda f: fig.savefig(f, format=suffix[1:], bbox_inches="tight", dpi=DPI)
    )


def plot_attention(maps: Any, *, per_head: bool = False, batch_index: int = 0) -> Figure:
    """Attention weights (query rows attend to key columns) for one window.

    Args:
        maps: ``[layers, B, heads, N, N]``, ``[heads, N, N]`` or ``[N, N]``.
        per_head: one panel per head instead of the mean over heads.
        batch_index: which window of the batch.
    """
    a = _np(maps)
    if a.ndim == 5:
        a = a[:, batch_index]
    while a.ndim < 4:
        a = a[None]
    layers, heads = a.shape[0], a.shape[1]
    if not per_head:
        a, heads = a.mean(axis=1, keepdims=True), 1
    fig, axes = _figure(layers, heads, size=(2.8 * heads + 0.6, 2.6 * layers))
    for i in range(layers):
        for j in range(heads):
            ax = axes[i, j]
            im = ax.imshow(a[i, j], cmap="viridis", vmin=0.0)
            head = f"head {j}" if per_head else "mean of heads"
            ax.set_title(f"layer {i}, {head}", fontsize=8)
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_token(token: Any, *, title: str = "One frame's token") -> Figure:
    """A frame's latent as a K x V image (one-hot, or probabilities from log-probs),
    each row annotated with its class index.

    Shapes:
        token: ``[K, V]`` one-hot, probabilities or log-probabilities.
    """
    x = _np(token)
    if x.ndim != 2:
        raise ValueError(f"expected a [K, V] token, got {x.shape}")
    probs = np.exp(x) if x.max() <= 0.0 else x
    index = probs.argmax(axis=1)
    k, v = probs.shape
    fig, axes = _figure(size=(5.0, 5.0 * k / v + 0.6))
    ax = axes[0, 0]
    ax.imshow(probs, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    for row, col in enumerate(index):
        ax.text(v - 0.5, row, f" {col}", va="center", ha="left", fontsize=6)
    ax.set_xlabel(f"class (V={v})")
    ax.set_ylabel(f"categorical (K={k})")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_causal_mask(n: int) -> Figure:
    """The ``n x n`` causal mask: token t may attend to tokens 0..t (light)."""
    mask = np.tril(np.ones((n, n)))
    fig, axes = _figure(size=(3.5, 3.5))
    ax = axes[0, 0]
    ax.imshow(mask, cmap="Blues", vmin=0.0, vmax=1.5)
    ax.set_xlabel("key position (attended)")
    ax.set_ylabel("query position")
    ax.set_title("Causal mask (filled = allowed)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_teacher_forcing_gap(gap: Mapping[str, Any], *, name: str = "") -> Figure:
    """Left: teacher-forced vs free-running PSNR per step (95% bands); right: the gap.

    Args:
        gap: the dict of :func:`storm_lib.evaluate.teacher_forcing_gap`.
    """
    fig, axes = _figure(1, 2, size=(9.0, 3.3))
    ax, bx = axes[0]
    steps = np.asarray(gap["steps"])
    for key, label in (("teacher_forced", "teacher-forced"), ("free_running", "free-running")):
        mean, hw = np.asarray(gap[key]), np.nan_to_num(np.asarray(gap.get(f"{key}_hw", 0.0)))
        ax.plot(steps, mean, marker="o", markersize=3, label=label)
        ax.fill_between(steps, mean - hw, mean + hw, alpha=0.15)
    ax.set_xlabel("step k (frame C+k)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{name} teacher forcing vs free running".strip(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.bar(steps, gap["gap"], color="C3")
    bx.set_xlabel("step k")
    bx.set_ylabel("gap (dB)")
    bx.set_title("PSNR lost to feeding back own predictions", fontsize=9)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sliding_window(result: SlidingWindowLoss | Mapping[int, float]) -> Figure:
    """Mean teacher-forced token NLL per window length (bars, "n/a" when not measurable)
    and, when available, the NLL at each position of each window.

    Args:
        result: a :class:`SlidingWindowLoss` or a plain ``{window: nll}`` dict.
    """
    if isinstance(result, SlidingWindowLoss):
        nll, per_position = result.nll, result.per_position
    else:
        nll, per_position = dict(result), {}
    cols = 2 if per_position else 1
    fig, axes = _figure(1, cols, size=(4.5 * cols, 3.3))
    ax = axes[0, 0]
    labels = [str(w) for w in nll]
    values = np.asarray(list(nll.values()), dtype=float)
    ax.bar(labels, np.nan_to_num(values), color="C0")
    for i, value in enumerate(values):
        text = "n/a" if np.isnan(value) else f"{value:.2f}"
        ax.text(i, np.nan_to_num(value), text, ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("window length (steps)")
    ax.set_ylabel("token NLL (nats/frame)")
    ax.set_title("Sliding-window token loss", fontsize=9)
    if per_position:
        bx = axes[0, 1]
        for w, curve in per_position.items():
            bx.plot(np.arange(1, len(curve) + 1), curve, label=f"window {w}")
        bx.set_xlabel("predicted position t+1")
        bx.set_ylabel("token NLL (nats)")
        bx.set_title("NLL by position in the window", fontsize=9)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    fig.tight_layout()
    return fig


__all__ = [
    "animation_gif_html",
    "animation_html",
    "grid_animation",
    "plot_action_sensitivity",
    "plot_attention",
    "plot_causal_mask",
    "plot_psnr_vs_horizon",
    "plot_reconstructions",
    "plot_results_comparison",
    "plot_rollout_grid",
    "plot_sliding_window",
    "plot_step_time",
    "plot_teacher_forcing_gap",
    "plot_token",
    "plot_training_curves",
    "plot_val_loss_vs_time",
    "rollout_animation",
    "save_figure",
]


def plot_token_statistics(
    stats: Mapping[str, TokenStatistics], *, classes: int = 32, bins: int = 8
) -> Figure:
    """Why the prior cannot predict the next token (``diagnostics.token_statistics``).

    Left: categoricals whose argmax changes between consecutive real frames against the
    share of pixels that changed (bins of equal count), with the churn of two posterior
    samples of the same frame (dashed). Right: each categorical, ranked by how often it
    changes: its change rate (dashed), how often the prior predicts its new class when
    it does change (solid), and its posterior entropy as a share of ln V (dotted).
    """
    fig, axes = _figure(1, 2, size=(11.5, 3.8))
    left, right = axes[0]
    for i, (name, s) in enumerate(stats.items()):
        edges = np.unique(np.quantile(s.pixel_change, np.linspace(0, 1, bins + 1)))
        edges[-1] = np.nextafter(edges[-1], np.inf)  # the largest change falls in the last bin
        rows = s.churn_by_pixel_change(list(edges))
        left.plot([100 * r[0] for r in rows], [r[1] for r in rows], marker="o", ms=3,
                  color=f"C{i}", label=name)  # fmt: skip
        left.axhline(s.resampled, color=f"C{i}", ls="--", lw=1,
                     label=f"{name}: two samples of one frame")  # fmt: skip
        order = np.argsort(-s.change_rate)
        rank = np.arange(1, s.categoricals + 1)
        right.plot(rank, s.change_rate[order], color=f"C{i}", ls="--", label=f"{name} change rate")
        right.plot(rank, s.accuracy_on_change[order], color=f"C{i}", marker="o", ms=3,
                   label=f"{name} prior right when it changes")  # fmt: skip
        right.plot(rank, s.entropy[order] / np.log(classes), color=f"C{i}", ls=":",
                   label=f"{name} posterior entropy / ln V")  # fmt: skip
    left.set_xlabel("pixels changed between frames t and t+1 (%)")
    left.set_ylabel("categoricals that change argmax")
    left.set_title("Token churn on real consecutive frames", fontsize=9)
    right.set_xlabel("categorical, ranked by how often it changes")
    right.set_ylabel("share of steps")
    right.set_ylim(0, 1)
    right.set_title("Per-categorical predictability (teacher-forced prior)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
