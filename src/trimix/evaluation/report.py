"""Scores with uncertainty, tables and plots, rebuilt from a run's ``predictions.jsonl`` alone.

Every score comes with a seeded bootstrap 95% interval over items (:mod:`trimix.metrics.bootstrap`),
or with its item count alone below the minimum number of items. Each TriMix row is compared, on the
same items (paired bootstrap), with Proxy Tuning and with the single source that was best on the
*dev* split by the label-free selection's perplexity (never chosen on the test items).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from trimix.errors import DataError
from trimix.evaluation.runner import CELLS, PREDICTIONS, SELECTIONS, read_predictions
from trimix.metrics import HIGHER_IS_BETTER, metric_statistics
from trimix.metrics.bootstrap import (
    LEVEL,
    MIN_ITEMS,
    N_RESAMPLES,
    SEED,
    Interval,
    bootstrap,
    paired_bootstrap,
)

METRIC_LABELS = {
    "accuracy": "acc",
    "chrf_pp": "chrF++",
    "chrf": "chrF",
    "bleu": "BLEU",
    "rouge_l_f": "ROUGE-L",
    "perplexity": "ppl",
    "bits_per_byte": "bits/byte",
}


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["task"], row["lang"])].append(row)
    return groups


def score_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, task, language): every metric with its interval, and the item count."""
    cells = []
    for (method, task, lang), items in _groups(rows).items():
        items = sorted(items, key=lambda r: str(r["id"]))
        scores: dict[str, float] = {}
        intervals: dict[str, dict[str, Any]] = {}
        for metric in items[0]["metrics"]:
            interval = bootstrap(metric_statistics(metric, items, items[0].get("target_lang")))
            scores[metric] = interval.value
            intervals[metric] = interval.to_dict()
        cells.append(
            {
                "method": method,
                "fusion_method": items[0].get("fusion_method"),
                "task": task,
                "lang": lang,
                "n": len(items),
                "scores": scores,
                "intervals": intervals,
                "weights": items[0].get("weights"),
                "settings": items[0].get("settings"),
                "clipped": sum(1 for r in items if r.get("clipped")),
                "stopped_at_context": sum(1 for r in items if r.get("finish_reason") == "context"),
            }
        )
    return cells


def _best_single_on_dev(run_dir: Path | None, task: str) -> str | None:
    """The role whose single-source perplexity was lowest on the task's dev prompts (label-free selection)."""
    if run_dir is None:
        return None
    path = run_dir / SELECTIONS / f"{task.removesuffix(':loglik')}.json"
    if not path.is_file():
        return None
    singles = json.loads(path.read_text(encoding="utf-8")).get("singles") or {}
    return min(singles, key=singles.get) if singles else None


def _by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in rows}


def _paired_difference(
    mine: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]], metric: str
) -> tuple[Any, Any, Interval]:
    """Two cells' metric statistics on the items both hold (rows by id), and the paired bootstrap
    interval of mine minus theirs."""
    shared = sorted(set(mine) & set(theirs))
    lang = mine[shared[0]].get("target_lang")
    a = metric_statistics(metric, [mine[i] for i in shared], lang)
    b = metric_statistics(metric, [theirs[i] for i in shared], lang)
    return a, b, paired_bootstrap(a, b)


def _run_rows(folder: Path) -> list[dict[str, Any]]:
    """A run's predictions, read without editing the file; a folder without any is an error."""
    if not (folder / PREDICTIONS).is_file():
        raise DataError(f"{folder / PREDICTIONS} does not exist; give the folder of a `trimix eval` run")
    rows = read_predictions(folder / PREDICTIONS, repair=False)  # a report never edits the results
    if not rows:
        raise DataError(f"{folder / PREDICTIONS} holds no predictions; run `trimix eval` first")
    return rows


def compare_methods(
    rows: list[dict[str, Any]], cells: list[dict[str, Any]], run_dir: Path | None
) -> list[dict]:
    """Paired differences of each TriMix row against Proxy Tuning and the best single source on dev."""
    groups = _groups(rows)
    out = []
    for cell in cells:
        if cell.get("fusion_method") != "trimix":
            continue
        peers = [c for c in cells if c["task"] == cell["task"] and c["lang"] == cell["lang"]]
        baselines = [(c, "proxy_tuning") for c in peers if c.get("fusion_method") == "proxy_tuning"]
        best = _best_single_on_dev(run_dir, cell["task"])
        if best is not None:
            single = next(
                (
                    c
                    for c in peers
                    if c.get("fusion_method") == "single" and (c.get("weights") or {}).get(best) == 1.0
                ),
                None,
            )
            if single is not None:
                baselines.append((single, f"best single on dev ({best})"))
        mine = _by_id(groups[(cell["method"], cell["task"], cell["lang"])])
        for baseline, kind in baselines:
            theirs = _by_id(groups[(baseline["method"], cell["task"], cell["lang"])])
            for metric in cell["scores"]:
                _, _, diff = _paired_difference(mine, theirs, metric)
                out.append(
                    {
                        "task": cell["task"],
                        "lang": cell["lang"],
                        "metric": metric,
                        "method": cell["method"],
                        "baseline": baseline["method"],
                        "baseline_kind": kind,
                        "difference": diff.to_dict(),
                        "excludes_zero": diff.excludes_zero(),
                    }
                )
    return out


def _fmt(cell: dict[str, Any], metric: str) -> str:
    return (
        Interval(**cell["intervals"][metric]).format()
        if "intervals" in cell
        else f"{cell['scores'][metric]:.2f}"
    )


def markdown_table(cells: list[dict[str, Any]], comparisons: list[dict[str, Any]] | None = None) -> str:
    """Per language: methods as rows, task metrics as columns (score [95% interval]), then the paired
    differences and what the intervals mean."""
    out = []
    methods = list(dict.fromkeys(c["method"] for c in cells))
    for lang in dict.fromkeys(c["lang"] for c in cells):
        mine = [c for c in cells if c["lang"] == lang]
        columns = list(dict.fromkeys((c["task"], m) for c in mine for m in c["scores"]))
        header = [f"{task} {METRIC_LABELS.get(m, m)}" for task, m in columns]
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
            row = []
            for task, metric in columns:
                cell = next((c for c in mine if c["method"] == method and c["task"] == task), None)
                if cell is None or metric not in cell["scores"]:
                    row.append("–")
                    continue
                text = _fmt(cell, metric)
                row.append(f"**{text}**" if cell["scores"][metric] == best[(task, metric)] else text)
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
        pairs = [p for p in comparisons or [] if p["lang"] == lang]
        if pairs:
            out += [
                "Paired differences (TriMix minus baseline, same items; for ppl lower is better, so a positive "
                "difference there means TriMix is worse):",
                "",
            ]
            out += [
                "| method | baseline | task | metric | difference [95% interval] | excludes 0 |",
                "|---|---|---|---|---|---|",
            ]
            for p in pairs:
                diff = Interval(**p["difference"])
                verdict = "n/a" if p["excludes_zero"] is None else ("yes" if p["excludes_zero"] else "no")
                out.append(
                    f"| {p['method']} | {p['baseline']} ({p['baseline_kind']}) | {p['task']} | "
                    f"{METRIC_LABELS.get(p['metric'], p['metric'])} | {diff.format()} | {verdict} |"
                )
            out.append("")
    out.append(
        f"Intervals: {int(LEVEL * 100)}% percentile bootstrap over items ({N_RESAMPLES} resamples, seed {SEED}; "
        "corpus metrics recomputed on each resample); cells with fewer than "
        f"{MIN_ITEMS} items show their n and no interval. Many pairwise comparisons are shown: correct for "
        "multiplicity (e.g. Bonferroni: divide 5% by the number of comparisons) before calling one significant."
    )
    return "\n".join(out)


def plot(cells: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars with 95% interval error bars: one group per (task, language), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((c["task"], c["lang"]) for c in cells))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 3.4 * len(groups)), 4.0), squeeze=False)
    for ax, (task, lang) in zip(axes[0], groups, strict=True):
        mine = {c["method"]: c for c in cells if c["task"] == task and c["lang"] == lang}
        metric = next(iter(next(iter(mine.values()))["scores"]))
        values, low, high = [], [], []
        for m in methods:
            cell = mine.get(m)
            value = cell["scores"][metric] if cell else 0.0
            interval = (cell or {}).get("intervals", {}).get(metric, {})
            values.append(value)
            low.append(value - interval["low"] if interval.get("low") is not None else 0.0)
            high.append(interval["high"] - value if interval.get("high") is not None else 0.0)
        bars = ax.bar(
            range(len(methods)),
            values,
            color=[f"C{i}" for i in range(len(methods))],
            yerr=[low, high],
            capsize=3,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        arrow = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        n = next(iter(mine.values()))["n"]
        ax.set_title(f"{task}\n{METRIC_LABELS.get(metric, metric)} ({arrow} is better), n={n}", fontsize=8)
    fig.suptitle("error bars: 95% bootstrap intervals (none below 20 items)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fill_fusion_methods(rows: list[dict[str, Any]], run_dir: Path) -> None:
    """Rows written without their fusion method get it from the cell descriptions beside them."""
    path = run_dir / CELLS
    if all("fusion_method" in r for r in rows) or not path.is_file():
        return
    described = json.loads(path.read_text(encoding="utf-8"))
    for row in rows:
        if "fusion_method" not in row and row.get("cell") in described:
            row["fusion_method"] = described[row["cell"]]["method"]["method"]


def write_report(run_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Rebuild ``report.md``, ``report.json`` and ``report.png`` of a run from its predictions alone."""
    run_dir = Path(run_dir)
    rows = _run_rows(run_dir)
    _fill_fusion_methods(rows, run_dir)
    cells = score_cells(rows)
    comparisons = compare_methods(rows, cells, run_dir)
    table = markdown_table(cells, comparisons)
    (run_dir / "report.md").write_text(table + "\n", encoding="utf-8")
    payload = {"cells": cells, "comparisons": comparisons}
    (run_dir / "report.json").write_text(
        json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    plot(cells, run_dir / "report.png")
    return table, cells


def compare_runs(run_dir: str | Path, base_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Two runs of the same evaluation (another backend, precision or version): for every method, task,
    language and metric both hold, ``run - base`` on the items both scored, with a paired bootstrap
    interval. Writes ``against-<base folder name>.md`` into ``run_dir``; returns its text and the rows."""
    run_dir, base_dir = Path(run_dir).resolve(), Path(base_dir).resolve()
    mine, theirs = (_groups(_run_rows(folder)) for folder in (run_dir, base_dir))
    ours_name, base_name = (run_dir.name, base_dir.name) if run_dir.name != base_dir.name else ("run", "base")
    out = []
    for key in [k for k in mine if k in theirs]:
        a, b = _by_id(mine[key]), _by_id(theirs[key])
        shared = sorted(set(a) & set(b))
        if not shared:
            continue
        for metric in a[shared[0]]["metrics"]:
            if metric not in b[shared[0]]["metrics"]:
                continue
            ours, base, diff = _paired_difference(a, b, metric)
            out.append(
                {
                    "method": key[0],
                    "task": key[1],
                    "lang": key[2],
                    "metric": metric,
                    "n": len(shared),
                    "run": bootstrap(ours).value,
                    "base": bootstrap(base).value,
                    "difference": diff.to_dict(),
                    "excludes_zero": diff.excludes_zero(),
                }
            )
    if not out:
        raise DataError(f"{run_dir} and {base_dir} share no (method, task, language) cell with common items")
    lines = [
        f"{run_dir} minus {base_dir}, on the items both scored (paired bootstrap):",
        "",
        f"| method | task | lang | metric | n | {ours_name} | {base_name} | difference [95% interval] | excludes 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in out:
        verdict = "n/a" if p["excludes_zero"] is None else ("yes" if p["excludes_zero"] else "no")
        lines.append(
            f"| {p['method']} | {p['task']} | {p['lang']} | {METRIC_LABELS.get(p['metric'], p['metric'])} | "
            f"{p['n']} | {p['run']:.2f} | {p['base']:.2f} | {Interval(**p['difference']).format()} | {verdict} |"
        )
    differing = sum(1 for p in out if p["excludes_zero"])
    lines += [
        "",
        f"{differing} of {len(out)} differences exclude 0 at 95% (uncorrected for the {len(out)} comparisons). "
        f"Intervals: {N_RESAMPLES} paired resamples of the shared items, seed {SEED}.",
    ]
    text = "\n".join(lines)
    (run_dir / f"against-{base_dir.name}.md").write_text(text + "\n", encoding="utf-8")
    return text, out
