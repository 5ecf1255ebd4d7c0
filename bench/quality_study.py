"""One run of the hyper-parameter quality study: train one world model, evaluate, log a row.

Trains ``storm`` or ``rssm`` with a profile (default ``cpu``) plus ``--set
section.field=value`` overrides on a given data file, writes the checkpoint to a given
path, then evaluates on the validation split's fixed windows (``eval_windows(count,
C + H, eval.seed)``, the same 256 for every run) and appends ONE result row as a JSON
line to ``--jsonl`` and as a markdown row to ``--md``:

* PSNR at steps 1/3/5/10 of ``rollout_psnr`` in ``mode="sample"`` and ``mode="mode"``;
* copy-last at 1/3/5/10 and the argmax-reconstruction ceiling (``rollout_psnr``'s);
* the posterior-sample ceiling: the future frames decoded from a *sample* of the
  posterior (STORM: ``decode(vae.sample(encode(obs), "sample"))``; RSSM: filtering
  with sampled posteriors, then decoding its features), mean over steps C+1..C+H;
* the posterior's mean entropy per categorical, in nats, over all frames of the windows;
* the representation (``diagnostics.token_statistics`` on the same windows): categoricals
  whose argmax changes between consecutive real frames, the same between two posterior
  samples of one frame, the prior's wrong categoricals per frame and its accuracy on the
  categoricals that change;
* action sensitivity: PSNR of argmax rollouts with the real actions minus with the
  actions that lead into the imagined frames (``a_{C-1} .. a_{C+H-2}``: the last
  context action and the future ones) permuted across windows by one fixed
  permutation, at steps 1/5/10. The last context action is included because it is the
  one that leads into imagined frame 1 (otherwise step 1 could not depend on it).

Training minutes are wall-clock of ``fit()``'s steps alone (validation excluded); on a
shared machine they are not comparable between runs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/quality_study.py --model storm \\
        --data /tmp/study_data/boxing_30000_seed0.npz --ckpt /tmp/study_ckpt/s1.pt \\
        --set train.steps=1000 --set train.lr_schedule=cosine --set train.warmup_steps=100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path

import torch

from storm_lib.config import Config, get_profile
from storm_lib.data import TrajectoryData
from storm_lib.diagnostics import token_statistics
from storm_lib.evaluate import psnr, rollout_psnr
from storm_lib.models import build_world_model
from storm_lib.train import fit
from storm_lib.types import Batch
from storm_lib.utils import seed_everything

STEPS = (1, 3, 5, 10)
SENS_STEPS = (1, 5, 10)


def _parse_value(raw: str, current: object, hint: object) -> object:
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"not a bool: {raw!r}")
    if isinstance(current, int):
        return int(float(raw)) if "e" in raw.lower() else int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, str):
        choices = typing.get_args(hint)
        if choices and raw not in choices:
            raise ValueError(f"{raw!r} is not one of {choices}")
        return raw
    raise ValueError(f"cannot override a field of type {type(current).__name__}")


def apply_overrides(config: Config, overrides: list[str]) -> dict[str, object]:
    """``section.field=value`` strings applied to ``config`` in place; returns them parsed."""
    applied: dict[str, object] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        section, _, name = key.strip().partition(".")
        part = getattr(config, section, None)
        if part is None or not dataclasses.is_dataclass(part):
            raise SystemExit(f"--set {item}: no config section {section!r}")
        fields = {f.name: f for f in dataclasses.fields(part)}
        if name not in fields:
            raise SystemExit(f"--set {item}: section {section!r} has no field {name!r}")
        hints = typing.get_type_hints(type(part))
        try:
            value = _parse_value(raw.strip(), getattr(part, name), hints.get(name))
        except ValueError as exc:
            raise SystemExit(f"--set {item}: {exc}") from None
        setattr(part, name, value)
        applied[f"{section}.{name}"] = value
    return applied


def check_budget(config: Config) -> str:
    """A warning sentence when the run exceeds the study's budget (else '')."""
    t, v, r, tr = config.train, config.vae, config.rssm, config.transformer
    frames = t.steps * t.batch_size * t.seq_len
    notes = []
    if frames > 3000 * 16 * 20:
        notes.append(f"{frames} frame passes > 960000")
    if v.stem_channels > 16 or tr.width > 128 or tr.layers > 4 or max(r.deter, r.hidden) > 256:
        notes.append("widths above the cpu profile's")
    if t.seq_len < 18:
        notes.append("seq_len < 18")
    return "; ".join(notes)


@torch.inference_mode()
def posterior_stats(model, windows: Batch, context: int, batch_size: int) -> tuple[float, float]:
    """(posterior-sample ceiling in dB over steps C+1.., mean entropy per categorical)."""
    ceil, ent = [], []
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(4321)
        for chunk in windows.chunks(batch_size):
            if model.kind == "storm":
                log_probs = model.encode(chunk.obs)  # [B, T, K, V]
                recon = model.decode(model.vae.sample(log_probs, "sample"))
            else:
                post, _ = model._observe(model.embed(chunk.obs), chunk.action, None, "sample")
                log_probs = post.logits
                recon = model.decode(post.feat)
            recon = recon.clamp(0.0, 1.0)[:, context:]
            ceil.append(psnr(recon, chunk.obs[:, context:]).flatten())
            ent.append(-(log_probs.exp() * log_probs).sum(-1).flatten())
    return float(torch.cat(ceil).mean()), float(torch.cat(ent).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("storm", "rssm"), required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--label", default="", help="short name of the run for the tables")
    ap.add_argument("--count", type=int, default=256, help="evaluation windows")
    ap.add_argument("--jsonl", default="quality_study.jsonl", help="rows appended as JSON")
    ap.add_argument("--md", default="quality_study.md", help="rows appended as a table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true", help="load --ckpt, skip training")
    ap.add_argument(
        "--eval-data", default=None,
        help="score on windows of this whole file instead of --data's validation split "
        "(episodes no run was trained on, e.g. another seed: runs on different data "
        "files are then scored on the same windows)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = get_profile(args.profile)
    config.train.checkpoint_every = 0
    applied = apply_overrides(config, args.overrides)
    budget = check_budget(config)
    if budget:
        print(f"WARNING, over budget: {budget}", flush=True)
    device = torch.device("cpu")
    data = TrajectoryData.load(args.data)
    train_data, val_data = data.split(config.data.val_fraction, seed=config.data.seed)
    print(f"{args.model} {applied} on {args.data}: {len(train_data)} train / "
          f"{len(val_data)} val steps", flush=True)  # fmt: skip

    wall = time.perf_counter()
    if args.eval_only:
        from storm_lib.checkpoint import load_checkpoint, read_checkpoint

        model = load_checkpoint(args.ckpt, device, kind=args.model, action_dim=data.action_dim)
        hist = read_checkpoint(args.ckpt, device)["history"]
        config.train = model.config.train  # the row describes the run that was trained
        train_hist, val_hist = hist["train"], hist["val"]
    else:
        seed_everything(config.train.seed)
        model = build_world_model(args.model, config, data.action_dim, device)
        Path(args.ckpt).parent.mkdir(parents=True, exist_ok=True)
        history = fit(
            model, train_data, val_data, steps=config.train.steps, config=config.train,
            device=device, checkpoint_path=args.ckpt, overwrite=Path(args.ckpt).exists(),
            progress=False,
        )  # fmt: skip
        train_hist, val_hist = history.train, history.val
    train_min = train_hist[-1]["time"] / 60.0 if train_hist else float("nan")
    print(f"trained in {train_min:.1f} min (fit steps only); "
          f"wall so far {(time.perf_counter() - wall) / 60:.1f} min", flush=True)  # fmt: skip
    best = min(val_hist, key=lambda r: r["token_nll"])
    final = val_hist[-1]
    for r in [*val_hist[:: max(1, len(val_hist) // 10)], final]:
        print(f"  val step {r['step']:>5}: token_nll {r['token_nll']:.2f} "
              f"rec {r['loss/rec']:.1f} dyn_raw {r['kl/dyn_raw']:.2f}", flush=True)  # fmt: skip

    ev = config.eval
    length = ev.context + ev.horizon
    scored = TrajectoryData.load(args.eval_data) if args.eval_data else val_data
    windows = scored.eval_windows(args.count, length, ev.seed)
    start = time.perf_counter()
    res = {
        m: rollout_psnr({"m": model}, windows, context=ev.context, horizon=ev.horizon,
                        seed=ev.seed, batch_size=ev.batch_size, mode=m, progress=False)
        for m in ("sample", "mode")
    }  # fmt: skip
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    shuffled_action = windows.action.clone()
    span = slice(ev.context - 1, length - 1)
    shuffled_action[:, span] = windows.action[perm][:, span]
    shuffled = Batch(windows.obs, shuffled_action, windows.reward, windows.cont)
    res_shuf = rollout_psnr(
        {"m": model},
        shuffled,
        context=ev.context,
        horizon=ev.horizon,
        seed=ev.seed,
        batch_size=ev.batch_size,
        mode="mode",
        progress=False,
    )
    sample_ceiling, entropy = posterior_stats(model, windows, ev.context, ev.batch_size)
    tokens = token_statistics(model, windows, batch_size=ev.batch_size, seed=ev.seed)
    eval_min = (time.perf_counter() - start) / 60.0

    def at(stats, steps=STEPS) -> list[float]:
        return [round(float(stats.mean[k - 1]), 2) for k in steps]

    sens = res["mode"].models["m"].mean - res_shuf.models["m"].mean
    row = {
        "label": args.label,
        "model": args.model,
        "overrides": {k: v for k, v in applied.items()},
        "steps": config.train.steps,
        "batch": config.train.batch_size,
        "seq": config.train.seq_len,
        "frame_passes": config.train.steps * config.train.batch_size * config.train.seq_len,
        "budget_warning": budget,
        "train_min": round(train_min, 1),
        "eval_min": round(eval_min, 1),
        "count": args.count,
        "psnr_sample": at(res["sample"].models["m"]),
        "psnr_mode": at(res["mode"].models["m"]),
        "copy_last": at(res["mode"].copy_last),
        "ceiling_argmax": round(float(res["mode"].ceilings["m"].mean.mean()), 2),
        "ceiling_sample": round(sample_ceiling, 2),
        "entropy_nats": round(entropy, 3),
        "action_sens": [round(float(sens[k - 1]), 2) for k in SENS_STEPS],
        "churn": round(float(tokens.changed.mean()), 2),
        "churn_resampled": round(tokens.resampled, 2),
        "prior_errors_per_frame": round(tokens.errors_per_frame, 2),
        "prior_accuracy_on_changes": round(tokens.accuracy_on_changes, 3),
        "precision": config.train.precision,
        "val_token_nll_final": round(final["token_nll"], 2),
        "val_token_nll_best": round(best["token_nll"], 2),
        "val_best_step": best["step"],
        "val_rec_final": round(final["loss/rec"], 1),
        "data": args.data,
        "eval_data": args.eval_data or f"{args.data} (validation split)",
        "ckpt": args.ckpt,
        "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps(row), flush=True)
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    md = Path(args.md)
    if not md.exists():
        md.write_text(MD_HEADER)

    def cells(xs: list[float]) -> str:
        return "/".join(f"{x:.2f}" for x in xs)

    conf = ", ".join(f"{k}={v}" for k, v in applied.items() if k != "train.steps") or "(cpu)"
    line = (
        f"| {args.label} | {args.model} | {conf} | {row['steps']} ({row['batch']}x{row['seq']}) "
        f"| {row['train_min']} | {cells(row['psnr_sample'])} | {cells(row['psnr_mode'])} "
        f"| {cells(row['copy_last'])} | {row['ceiling_argmax']:.2f} | {row['ceiling_sample']:.2f} "
        f"| {row['entropy_nats']:.3f} | {cells(row['action_sens'])} "
        f"| {row['val_token_nll_final']:.2f} "
        f"(best {row['val_token_nll_best']:.2f} @{row['val_best_step']}) "
        f"| {row['churn']:.1f} / {row['churn_resampled']:.1f} "
        f"| {row['prior_errors_per_frame']:.1f} | {row['prior_accuracy_on_changes']:.0%} |\n"
    )
    with open(md, "a") as f:
        f.write(line)
    print(line, end="")
    return 0


MD_HEADER = """# Quality study results (cpu profile + overrides)

PSNR in dB over the same 256 held-out windows (context 8); steps 1/3/5/10.
Ceilings are means over the 10 future frames. Entropy: posterior, nats per categorical
(max ln 32 = 3.47). Action sensitivity: argmax-rollout PSNR with real minus shuffled
actions at steps 1/5/10. Train min = fit() wall-clock, steps only, on a shared 2-core
machine (not comparable between runs).

"""
MD_HEADER += (
    "| run | model | overrides | steps (BxT) | train min | PSNR sample 1/3/5/10 "
    "| PSNR argmax 1/3/5/10 | copy-last 1/3/5/10 | ceil argmax | ceil sample | entropy "
    "| act sens 1/5/10 | val token nll final (best @step) | churn real / resampled "
    "| prior errors per frame | prior right on changes |\n" + "|---" * 16 + "|\n"
)

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
