"""Run a methods x tasks x languages evaluation, appending every prediction to a JSONL as it completes.

A run folder holds ``predictions.jsonl`` (one line per method, task, language and item), the
weights selected for each task under ``selections/``, the description behind every cell fingerprint
(``cells.json``), ``config.yaml`` and ``run.json``. Started again on the same folder, a run skips every
item already in the JSONL (a line cut short by a kill is dropped first) whose cell fingerprint matches,
so it finishes with nothing lost, duplicated or mixed and, decoding being greedy and seeded, with the
same scores.

This module is the driver: it owns the files. What is computed, and how, is the
:class:`~trimix.evaluation.plan.EvalPlan`; where, an executor (this process, or Ray workers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from trimix.config import TrimixConfig
from trimix.decoding import FusedLM
from trimix.errors import ConfigError
from trimix.evaluation.executors import LocalExecutor, RayExecutor
from trimix.evaluation.plan import (  # noqa: F401 - re-exported for callers of the runner
    Cell,
    EvalPlan,
    Unit,
    build_task,
    cell_name,
    request_type,
    sample_items,
)
from trimix.io import JsonlSink, atomic_write_json, read_jsonl, read_text
from trimix.runinfo import describe_change, fingerprint

logger = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
SELECTIONS = "selections"
CELLS = "cells.json"  # fingerprint -> the description it was computed from, for every cell with rows
RESUMED_FROM = (PREDICTIONS, SELECTIONS, CELLS)  # what a run continues from; `--overwrite` removes them


def read_predictions(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """The complete rows of a predictions file; a last line cut short by a kill is dropped (and, with
    ``repair``, removed from the file); a damaged line before the last is an error (see ``read_jsonl``)."""
    return read_jsonl(path, repair=repair)


def _key(method: str, task: str, item_id: str) -> tuple[str, str, str]:
    return (method, task, str(item_id))


class Evaluator:
    """Evaluates each method on each task and language, with the sources loaded once (per worker).

    Everything that can be checked without models is checked in the constructor, before any weight is
    loaded: the methods' weights and plausibility roles, the tasks, options and every evaluated item,
    the fingerprints of the rows a resumed run would continue, and a Ray cluster's address.

    Args:
        config: the run config (its ``eval`` section).
        out_dir: the run folder.
        progress: show a progress bar.
        lm: an already loaded fused model (local executor).
        rerun_changed: on resume, redo the cells whose settings changed instead of refusing.
        executor: ``local`` or ``ray`` (default: ``eval.executor.kind``).
        ray_address: a Ray cluster to join (default: ``eval.executor.address``, else a local instance).
    """

    def __init__(
        self,
        config: TrimixConfig,
        out_dir: Path,
        progress: bool = True,
        lm: FusedLM | None = None,
        rerun_changed: bool = False,
        executor: str | None = None,
        ray_address: str | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.plan = EvalPlan(config)
        self._check_resume(rerun_changed)
        kind = executor or config.eval.executor.kind
        if kind == "ray":
            self.lm = None
            self.executor: Any = RayExecutor(config, config.eval.executor, ray_address)
        else:
            self.lm = lm or FusedLM.from_config(config, load_all=True)
            self.executor = LocalExecutor(
                self.plan, self.lm, progress, threads=config.eval.executor.threads_per_worker
            )

    @property
    def cell_list(self) -> list[Cell]:
        return self.plan.cells

    @property
    def descriptions(self) -> dict[tuple[str, str], dict[str, Any]]:
        return self.plan.descriptions

    def fixed_weights(self, method: Any) -> dict[str, float]:
        return self.plan.fixed_weights(method)

    # ---------------------------------------------------------------- fingerprints
    def _check_resume(self, rerun_changed: bool) -> None:
        """Continue only rows whose cell fingerprint matches this config; name what changed otherwise."""
        path = self.out_dir / PREDICTIONS
        rows = read_predictions(path)
        if not rows:
            return
        if any("cell" not in r for r in rows):
            raise ConfigError(
                f"{path} was written by a trimix without run fingerprints, so --resume cannot check that its rows "
                "match this config; start afresh with --overwrite (or choose another --output-dir)"
            )
        stored = self._stored_descriptions()
        changed: dict[tuple[str, str], str] = {}
        for key, cell in {((r["method"], r["task"]), r["cell"]) for r in rows}:
            if key not in self.descriptions or cell == fingerprint(self.descriptions[key]):
                continue
            before = stored.get(cell)
            if before is None or describe_change(before, self.descriptions[key]):
                changed[key] = cell  # else recorded before a setting was added, at its old behaviour
        unknown = sorted({(r["method"], r["task"]) for r in rows} - set(self.descriptions))
        if unknown:
            logger.warning(
                "%s holds rows of %d cell(s) this config does not evaluate (e.g. %s on %s); they stay in the report",
                path,
                len(unknown),
                *unknown[0],
            )
        if not changed:
            return
        if not rerun_changed:
            lines = []
            for (method, task), old in sorted(changed.items()):
                before = stored.get(old)
                diff = (
                    describe_change(before, self.descriptions[(method, task)])
                    if before
                    else ["(not recorded)"]
                )
                lines.append(f"  {method} on {task}: " + "; ".join(diff))
            raise ConfigError(
                f"--resume: {len(changed)} cell(s) in {path} were produced with other settings than this config:\n"
                + "\n".join(lines)
                + "\nPass --rerun-changed to redo these cells (their rows are removed first), or --overwrite to start afresh."
            )
        kept = [r for r in rows if (r["method"], r["task"]) not in changed]
        logger.warning(
            "--rerun-changed: removing %d rows of %d changed cell(s)", len(rows) - len(kept), len(changed)
        )
        sink = JsonlSink(path)
        sink.rewrite(kept)
        sink.close()
        for cell in self.cell_list:
            if any((m.name, cell.name) in changed for m in self.config.eval.methods if m.select):
                (self.out_dir / SELECTIONS / f"{cell.task.full_name}.json").unlink(missing_ok=True)

    def _stored_descriptions(self) -> dict[str, Any]:
        path = self.out_dir / CELLS
        return json.loads(read_text(path, "cell descriptions")) if path.is_file() else {}

    def _record_descriptions(self) -> None:
        stored = self._stored_descriptions()
        stored.update({fingerprint(d): d for d in self.descriptions.values()})
        atomic_write_json(self.out_dir / CELLS, stored)

    # ---------------------------------------------------------------- selections
    def _selection_path(self, cell: Cell) -> Path:
        return self.out_dir / SELECTIONS / f"{cell.task.full_name}.json"

    def select_missing(self, pending: dict[tuple[str, str], list[str]]) -> None:
        """Run the label-free selection of every task that a pending selected method needs (once per task)."""
        selected = [m.name for m in self.config.eval.methods if m.select]
        units, seen = [], set()
        for index, cell in enumerate(self.cell_list):
            wanted = any(pending.get((m, cell.name)) for m in selected)
            path = self._selection_path(cell)
            if wanted and not path.is_file() and path not in seen:
                seen.add(path)
                units.append(Unit("select", index))
        for unit, result in self.executor.select(units):
            path = self._selection_path(self.cell_list[unit.cell])
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, result.to_dict())
            result.plot(path.with_suffix(".png"), list(self.config.search.axes()))

    def _selected_weights(self, cell: Cell, mode: str | None) -> dict[str, float]:
        mode = mode or self.config.search.score
        saved = json.loads(read_text(self._selection_path(cell), "selection"))
        by_mode = saved.get("by_mode") or {}
        return by_mode[mode]["weights"] if mode in by_mode else saved["selected"]["weights"]

    # ---------------------------------------------------------------- the run
    def run(self) -> Path:
        path = self.out_dir / PREDICTIONS
        done = {_key(r["method"], r["task"], r["id"]) for r in read_predictions(path)}
        methods = self.config.eval.methods
        pending = {
            (m.name, cell.name): [e.id for e in cell.items if _key(m.name, cell.name, e.id) not in done]
            for cell in self.cell_list
            for m in methods
        }
        total = sum(len(c.items) for c in self.cell_list) * len(methods)
        bar = tqdm(
            total=total, initial=min(len(done), total), desc="eval", unit="item", disable=not self.progress
        )
        self._record_descriptions()
        sink = JsonlSink(path, fault="eval.row")
        try:
            self.select_missing(pending)
            weights = {
                (m.name, cell.name): self._selected_weights(cell, m.select_score)
                if m.select
                else self.fixed_weights(m)
                for cell in self.cell_list
                for m in methods
                if pending[(m.name, cell.name)]
            }
            units = self.plan.units(pending, weights, self.config.eval.executor.shard_items)
            for unit, rows in self.executor.run(units):
                fresh = [r for r in rows if _key(r["method"], r["task"], r["id"]) not in done]
                if fresh:
                    sink.write(fresh)
                    done.update(_key(r["method"], r["task"], r["id"]) for r in fresh)
                bar.set_description(f"eval {', '.join(unit.methods)} | {self.cell_list[unit.cell].name}")
                bar.update(len(fresh))
        finally:
            sink.close()
            bar.close()
        return path

    def close(self) -> None:
        """Release the executor's workers (Ray)."""
        self.executor.close()
