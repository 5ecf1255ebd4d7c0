"""Markdown tables of ``bench/quality_study.py`` rows, for ``docs/``: nothing typed by hand.

    PYTHONPATH=. python bench/study_tables.py study.jsonl [--labels P-fp32 P-bf16] [--diff]

prints one table of the chosen runs (every row of the file without ``--labels``; the last
row of a label and model wins, so a re-scored run replaces its earlier row). ``--diff``
adds, per model, a row of the second label minus the first (e.g. bf16 minus fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (
    "| run | model | change | steps | train min | argmax PSNR 1 / 3 / 5 / 10 "
    "| sampled PSNR 1 / 3 / 5 / 10 | ceiling argmax / sample | entropy | churn real / resampled "
    "| prior errors / frame | prior right on changes | action sens. 1 / 5 / 10 |"
)


def rows_by_label(path: Path) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row["label"], row["model"])] = row
    return rows


def cells(values: list[float], signed: bool = False) -> str:
    return " / ".join(f"{v:+.2f}" if signed else f"{v:.2f}" for v in values)


def change(row: dict) -> str:
    shown = {k: v for k, v in row["overrides"].items() if k != "train.steps"}
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in shown.items()) or "(cpu profile)"


def line(row: dict) -> str:
    return (
        f"| {row['label']} | {row['model']} | {change(row)} | {row['steps']} "
        f"| {row['train_min']} | {cells(row['psnr_mode'])} | {cells(row['psnr_sample'])} "
        f"| {row['ceiling_argmax']:.2f} / {row['ceiling_sample']:.2f} | {row['entropy_nats']:.2f} "
        f"| {row.get('churn', float('nan')):.1f} / {row.get('churn_resampled', float('nan')):.1f} "
        f"| {row.get('prior_errors_per_frame', float('nan')):.1f} "
        f"| {row.get('prior_accuracy_on_changes', float('nan')):.0%} "
        f"| {cells(row['action_sens'])} |"
    )


def diff_line(a: dict, b: dict) -> str:
    def d(key: str) -> list[float]:
        return [y - x for x, y in zip(a[key], b[key], strict=True)]

    ceil = (b["ceiling_argmax"] - a["ceiling_argmax"], b["ceiling_sample"] - a["ceiling_sample"])
    return (
        f"| {b['label']} minus {a['label']} | {a['model']} | | | "
        f"{b['train_min'] - a['train_min']:+.1f} | {cells(d('psnr_mode'), True)} "
        f"| {cells(d('psnr_sample'), True)} | {ceil[0]:+.2f} / {ceil[1]:+.2f} "
        f"| {b['entropy_nats'] - a['entropy_nats']:+.2f} | | | | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--labels", nargs="+", help="runs to show, in this order")
    parser.add_argument("--diff", action="store_true", help="second label minus the first")
    args = parser.parse_args()
    rows = rows_by_label(args.jsonl)
    labels = args.labels or list(dict.fromkeys(label for label, _ in rows))
    print(COLUMNS)
    print("|---" * (COLUMNS.count("|") - 1) + "|")
    for model in ("storm", "rssm"):
        for label in labels:
            if (label, model) in rows:
                print(line(rows[(label, model)]))
        if args.diff and len(labels) == 2 and all((x, model) in rows for x in labels):
            print(diff_line(rows[(labels[0], model)], rows[(labels[1], model)]))


if __name__ == "__main__":
    main()
