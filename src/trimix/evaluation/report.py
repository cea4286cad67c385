"""Scores, tables and plots rebuilt from a run's ``predictions.jsonl`` alone."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from trimix.errors import DataError
from trimix.evaluation.runner import PREDICTIONS, read_predictions
from trimix.metrics import HIGHER_IS_BETTER, accuracy, bleu, corpus_metric

METRIC_LABELS = {
    "accuracy": "acc",
    "chrf_pp": "chrF++",
    "chrf": "chrF",
    "bleu": "BLEU",
    "rouge_l_f": "ROUGE-L",
    "perplexity": "ppl",
}


def score_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, task, language): every metric of the task and the item count."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["task"], row["lang"])].append(row)
    cells = []
    for (method, task, lang), items in groups.items():
        scores: dict[str, float] = {}
        for metric in items[0]["metrics"]:
            if metric == "accuracy":
                scores[metric] = accuracy([r["correct"] for r in items])
            elif metric == "perplexity":
                tokens = sum(r["n_tokens"] for r in items)
                scores[metric] = math.exp(sum(r["nll"] for r in items) / max(tokens, 1))
            elif metric == "bleu":
                scores[metric] = bleu(
                    [r["prediction"] for r in items],
                    [r["reference"] for r in items],
                    items[0].get("target_lang"),
                )
            else:
                scores[metric] = corpus_metric(metric)(
                    [r["prediction"] for r in items], [r["reference"] for r in items]
                )
        cells.append(
            {
                "method": method,
                "task": task,
                "lang": lang,
                "n": len(items),
                "scores": scores,
                "weights": items[0].get("weights"),
                "settings": items[0].get("settings"),
                "clipped": sum(1 for r in items if r.get("clipped")),
                "stopped_at_context": sum(1 for r in items if r.get("finish_reason") == "context"),
            }
        )
    return cells


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """Per language: methods as rows, task metrics as columns, plus the average of the 0-100 metrics."""
    out = []
    methods = list(dict.fromkeys(c["method"] for c in cells))
    for lang in dict.fromkeys(c["lang"] for c in cells):
        mine = [c for c in cells if c["lang"] == lang]
        columns = list(dict.fromkeys((c["task"], m) for c in mine for m in c["scores"]))
        header = [f"{task} {METRIC_LABELS.get(m, m)}" for task, m in columns] + ["avg (0-100 metrics)"]
        out += [
            f"### {lang}",
            "",
            "| method | " + " | ".join(header) + " |",
            "|---" * (len(header) + 1) + "|",
        ]
        best = {}
        for task, metric in columns:
            values = [c["scores"][metric] for c in mine if c["task"] == task and metric in c["scores"]]
            best[(task, metric)] = (max if HIGHER_IS_BETTER.get(metric, True) else min)(values)
        for method in methods:
            row, percents = [], []
            for task, metric in columns:
                cell = next((c for c in mine if c["method"] == method and c["task"] == task), None)
                if cell is None or metric not in cell["scores"]:
                    row.append("–")
                    continue
                value = cell["scores"][metric]
                text = f"{value:.2f}"
                row.append(f"**{text}**" if value == best[(task, metric)] else text)
                if metric != "perplexity":
                    percents.append(value)
            row.append(f"{sum(percents) / len(percents):.2f}" if percents else "–")
            out.append(f"| {method} | " + " | ".join(row) + " |")
        counts = sorted({(c["task"], c["n"]) for c in mine})
        out += ["", "items: " + ", ".join(f"{t} {n}" for t, n in counts)]
        cut = sorted({(c["task"], c.get("clipped", 0)) for c in mine if c.get("clipped")})
        if cut:
            out.append(
                "inputs cut to the passage budget (items per method): "
                + ", ".join(f"{t} {n}" for t, n in cut)
            )
        stopped = sorted(
            {(c["method"], c["task"], c["stopped_at_context"]) for c in mine if c.get("stopped_at_context")}
        )
        if stopped:
            out.append(
                "generations stopped at a source's context: "
                + ", ".join(f"{m} on {t}: {n}" for m, t, n in stopped)
            )
        settings = sorted(
            {(c["task"], json.dumps(c["settings"], ensure_ascii=False)) for c in mine if c.get("settings")}
        )
        if settings:
            out.append("settings: " + "; ".join(f"{t} {v}" for t, v in settings))
        out.append("")
    return "\n".join(out)


def plot(cells: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per (task, language), one bar per method, on each task's first metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((c["task"], c["lang"]) for c in cells))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 3.2 * len(groups)), 3.8), squeeze=False)
    for ax, (task, lang) in zip(axes[0], groups, strict=True):
        mine = {c["method"]: c for c in cells if c["task"] == task and c["lang"] == lang}
        metric = next(iter(next(iter(mine.values()))["scores"]))
        values = [mine[m]["scores"][metric] if m in mine else 0.0 for m in methods]
        bars = ax.bar(range(len(methods)), values, color=[f"C{i}" for i in range(len(methods))])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        arrow = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        ax.set_title(f"{task}\n{METRIC_LABELS.get(metric, metric)} ({arrow} is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Rebuild ``report.md``, ``report.json`` and ``report.png`` of a run from its predictions alone."""
    run_dir = Path(run_dir)
    rows = read_predictions(run_dir / PREDICTIONS)
    if not rows:
        raise DataError(f"{run_dir / PREDICTIONS} holds no predictions; run `trimix eval` first")
    cells = score_cells(rows)
    table = markdown_table(cells)
    (run_dir / "report.md").write_text(table + "\n", encoding="utf-8")
    (run_dir / "report.json").write_text(
        json.dumps(cells, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    plot(cells, run_dir / "report.png")
    return table, cells
