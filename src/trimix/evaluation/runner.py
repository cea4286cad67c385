"""Run a methods x tasks x languages evaluation, appending every prediction to a JSONL as it completes.

A run folder holds ``predictions.jsonl`` (one line per method, task, language and item), the
weights selected for each cell under ``selections/``, ``config.yaml`` and ``run.json``. Started
again on the same folder, a run skips every item already in the JSONL (a line cut short by a kill
is dropped first), so it finishes with nothing lost or duplicated and, decoding being greedy and
seeded, with the same scores.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from trimix.config import MethodSpec, TaskSpec, TrimixConfig, resolve_weights
from trimix.decoding import FusedLM
from trimix.errors import ConfigError, DataError
from trimix.fusion import Fusion
from trimix.io import JsonlSink, atomic_write_json, read_jsonl, read_text
from trimix.runinfo import describe_change, fingerprint
from trimix.search import search_weights, task_selection_texts
from trimix.tasks import Example, Task, get_task

logger = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
SELECTIONS = "selections"
CELLS = "cells.json"  # fingerprint -> the description it was computed from, for every cell with rows
RESUMED_FROM = (PREDICTIONS, SELECTIONS, CELLS)  # what a run continues from; `--overwrite` removes them


RequestType = Literal["generate", "loglikelihood", "rolling"]


def build_task(spec: TaskSpec, lang: str) -> Task:
    return get_task(spec.task, lang, **spec.task_options())


def cell_name(spec: TaskSpec, task: Task) -> str:
    """The name a cell's rows carry: the task and language, marked when options are scored by likelihood
    (the same task may also be evaluated by generation in one run)."""
    return f"{task.full_name}:loglik" if spec.scoring == "loglikelihood" else task.full_name


def request_type(spec: TaskSpec, task: Task) -> RequestType:
    """How a cell asks the model (lm-evaluation-harness's request types): generation, the likelihood of
    each option, or the rolling likelihood of whole texts."""
    if task.kind == "perplexity":
        return "rolling"
    if spec.scoring == "loglikelihood":
        if task.kind != "choice":
            raise ConfigError(
                f"{task.name}: loglikelihood scoring needs a classification or multiple-choice task; "
                "use `scoring: generate` for it"
            )
        return "loglikelihood"
    return "generate"


@dataclass
class Cell:
    """One task and language of the matrix: its items and how they are asked."""

    spec: TaskSpec
    task: Task
    items: list[Example]
    name: str
    request: RequestType


def sample_items(task: Task, spec: TaskSpec, seed: int) -> list[Example]:
    """The evaluated items: the split, or a seeded sample of ``limit`` items kept in file order."""
    items = task.examples(spec.split)
    if spec.limit is None or spec.limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), spec.limit))
    return [e for i, e in enumerate(items) if i in keep]


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a predictions file; a last line cut short by a kill is removed from the file."""
    return read_jsonl(path)


def _key(method: str, task: str, item_id: str) -> tuple[str, str, str]:
    return (method, task, str(item_id))


def _items_digest(items: list[Example]) -> str:
    """The identity of a cell's data: its items' ids, fields and references."""
    return fingerprint({"items": [[e.id, e.fields, e.target, list(e.choices)] for e in items]})


class Evaluator:
    """Evaluates each method on each task and language, with the sources loaded once.

    Everything that can be checked without models is checked in the constructor, before any weight is
    loaded: the methods' weights and plausibility roles, the tasks and their options, and every item of
    every evaluated split.
    """

    def __init__(
        self,
        config: TrimixConfig,
        out_dir: Path,
        progress: bool = True,
        lm: FusedLM | None = None,
        rerun_changed: bool = False,
    ) -> None:
        if not config.eval.methods or not config.eval.tasks:
            raise ConfigError("the `eval` section needs at least one entry in `methods` and one in `tasks`")
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        roles = [m.role for m in config.models]
        for method in config.eval.methods:
            if not method.select:
                self.fixed_weights(method)
            if method.plausibility is not None and method.plausibility.role not in roles:
                raise ConfigError(
                    f"eval method {method.name!r}: plausibility.role {method.plausibility.role!r} is not a source; "
                    f"roles are {', '.join(roles)}"
                )
        self.cell_list = list(self.cells())
        self.descriptions = {
            (method.name, cell.name): self.describe(cell, method)
            for cell in self.cell_list
            for method in config.eval.methods
        }
        self._check_resume(rerun_changed)
        self.lm = lm or FusedLM.from_config(config, load_all=True)

    # ---------------------------------------------------------------- fingerprints
    def describe(self, cell: Cell, method: MethodSpec) -> dict[str, Any]:
        """Everything that determines a cell's rows for one method (its fingerprint is recorded in each row)."""
        description: dict[str, Any] = {
            "method": method.model_dump(mode="json", exclude={"name", "weights"}),  # weights: resolved below
            "task": cell.spec.model_dump(mode="json", exclude={"langs"}),
            "lang": cell.task.lang,
            "request": cell.request,
            "settings": cell.task.generation_settings(),
            "data": _items_digest(cell.items),
            "models": [m.model_dump(mode="json", exclude={"weight"}) for m in self.config.models],
            "dtype": self.config.dtype,
            "vocab": self.config.fusion.vocab,
        }
        if method.select:
            description["search"] = self.config.search.model_dump(mode="json")
        else:
            description["weights"] = self.fixed_weights(method)
        return description

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
        for row in rows:
            key = (row["method"], row["task"])
            if key in self.descriptions and row["cell"] != fingerprint(self.descriptions[key]):
                changed[key] = row["cell"]
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

    # ---------------------------------------------------------------- weights per method and cell
    def fixed_weights(self, method: MethodSpec) -> dict[str, float]:
        """The weights a method without ``select`` gives every role, resolved as the run config resolves them."""
        roles = [m.role for m in self.config.models]
        unknown = sorted(set(method.weights or {}) - set(roles))
        if unknown:
            raise ConfigError(
                f"eval method {method.name!r} weights name unknown role(s) {unknown}; roles: {roles}"
            )
        given: dict[str, float | None] = dict.fromkeys(roles)
        given.update(method.weights or {})
        try:
            return resolve_weights(method.fusion(), given)
        except ValueError as exc:
            raise ConfigError(f"eval method {method.name!r}: {exc}") from exc

    def _selected_weights(self, task: Task, mode: str | None = None) -> dict[str, float]:
        """TriMix weights chosen by fused perplexity on the task's dev prompts (scoring the whole prompt or
        only the task's text: ``mode``, default ``search.score``), cached beside the results."""
        mode = mode or self.config.search.score
        path = self.out_dir / SELECTIONS / f"{task.full_name}.json"
        if path.is_file():
            saved = json.loads(read_text(path, "selection"))
            by_mode = saved.get("by_mode") or {}
            return by_mode[mode]["weights"] if mode in by_mode else saved["selected"]["weights"]
        search = self.config.search
        texts, origin = task_selection_texts(task, search, "dev")
        scorer = self.lm.scorer(texts, roles=[m.role for m in self.config.models], progress=self.progress)
        result = search_weights(scorer, search, origin)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result.to_dict())
        result.plot(path.with_suffix(".png"), list(search.axes()))
        logger.info("selected %s for %s", result.selected.weights, task.full_name)
        return result.by_mode[mode]["weights"] if mode in result.by_mode else result.selected.weights

    def fused(self, weights: dict[str, float], method: MethodSpec) -> FusedLM:
        """The method's fused model over the loaded sources (no reload)."""
        plausibility = method.plausibility.resolve() if method.plausibility else None
        return self.lm.with_fusion(Fusion(weights, method.method, plausibility))

    # ---------------------------------------------------------------- the run
    def cells(self) -> Iterator[Cell]:
        """Every cell of the matrix, its task built and its items read (bad data fails here)."""
        for spec in self.config.eval.tasks:
            for lang in spec.langs:
                task = build_task(spec, lang)
                items = sample_items(task, spec, self.config.eval.seed)
                if not items:
                    raise DataError(f"{task.full_name}: the {spec.split} split holds no items")
                yield Cell(spec, task, items, cell_name(spec, task), request_type(spec, task))

    def run(self) -> Path:
        path = self.out_dir / PREDICTIONS
        done = {_key(r["method"], r["task"], r["id"]) for r in read_predictions(path)}
        total = sum(len(c.items) for c in self.cell_list) * len(self.config.eval.methods)
        bar = tqdm(
            total=total, initial=min(len(done), total), desc="eval", unit="item", disable=not self.progress
        )
        self._record_descriptions()
        sink = JsonlSink(path, fault="eval.row")
        try:
            for cell in self.cell_list:
                pending = {
                    m.name: [e for e in cell.items if _key(m.name, cell.name, e.id) not in done]
                    for m in self.config.eval.methods
                }
                methods = [m for m in self.config.eval.methods if pending[m.name]]
                if not methods:
                    continue
                weights = {
                    m.name: self._selected_weights(cell.task, m.select_score)
                    if m.select
                    else self.fixed_weights(m)
                    for m in methods
                }
                cells = {m.name: fingerprint(self.descriptions[(m.name, cell.name)]) for m in methods}
                base = {
                    "task": cell.name,
                    "task_name": cell.task.name,
                    "lang": cell.task.lang,
                    "metrics": list(cell.task.metric_names),
                    "target_lang": cell.task.target_lang,
                    "request": cell.request,
                    "settings": cell.task.generation_settings(),
                }
                if cell.request == "generate":
                    for method in methods:
                        bar.set_description(f"eval {method.name} | {cell.name}")
                        lm = self.fused(weights[method.name], method)
                        for rows in self._generate(lm, cell.task, pending[method.name]):
                            sink.write([self._row(method, cells, base, weights, r) for r in rows])
                            bar.update(len(rows))
                    continue
                bar.set_description(f"eval {len(methods)} methods | {cell.name}")
                for method, rows in self._score(cell, methods, weights, pending):
                    sink.write([self._row(method, cells, base, weights, r) for r in rows])
                    bar.update(len(rows))
        finally:
            sink.close()
            bar.close()
        return path

    @staticmethod
    def _row(
        method: MethodSpec, cells: dict[str, str], base: dict[str, Any], weights: dict[str, dict], row: dict
    ) -> dict[str, Any]:
        return {
            "method": method.name,
            "fusion_method": method.method,
            "cell": cells[method.name],
            **base,
            "weights": weights[method.name],
            **row,
        }

    def _score(
        self,
        cell: Cell,
        methods: list[MethodSpec],
        weights: dict[str, dict[str, float]],
        pending: dict[str, list[Example]],
    ) -> Iterator[tuple[MethodSpec, list[dict]]]:
        """Likelihood cells: one forward pass per source per text serves every method (a method's weights
        change only the log-partition), through the fused model's many-fusion likelihood."""
        for method in methods:
            if method.plausibility is not None:
                logger.warning(
                    "method %r: the plausibility constraint applies to generation only; %s is scored with "
                    "the unconstrained fused distribution",
                    method.name,
                    cell.name,
                )
        fusions = [Fusion(weights[m.name], m.method) for m in methods]
        wanted = [{e.id for e in pending[m.name]} for m in methods]
        todo = [e for e in cell.items if any(e.id in want for want in wanted)]
        rows_of = self._choose if cell.request == "loglikelihood" else self._perplexity
        for example, per_method in rows_of(cell.task, todo, fusions):
            for method, want, row in zip(methods, wanted, per_method, strict=True):
                if example.id in want:
                    yield method, [row]

    def _generate(self, lm: FusedLM, task: Task, items: list[Example]) -> Iterator[list[dict]]:
        size = self.config.eval.batch_size
        settings = task.generation_settings()
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            prompts = [task.render(e) for e in batch]
            outputs = lm.generate(
                [p.text for p in prompts],
                max_new_tokens=settings["max_new_tokens"],
                stop=settings["stop"],
                batch_size=size,
                on_context_limit="stop",  # one over-long item stops at the context, counted in the report
            )
            rows = []
            for example, prompt, output in zip(batch, prompts, outputs, strict=True):
                prediction = task.extract(output.text)
                row = {
                    "id": example.id,
                    "output": output.text,
                    "prediction": prediction,
                    "reference": example.target,
                    "finish_reason": output.finish_reason,
                    "clipped": prompt.clipped,
                }
                if "accuracy" in task.metric_names:
                    row["correct"] = task.is_correct(prediction, example)
                rows.append(row)
            yield rows

    def _choose(
        self, task: Task, items: list[Example], fusions: list[Fusion]
    ) -> Iterator[tuple[Example, list[dict]]]:
        """Each option's log-likelihood as the continuation of the prompt, for every fusion at once."""
        for example in items:
            prompt = task.render(example)
            requests = [(prompt.text, f" {choice}") for choice in example.choices]
            results = self.lm.loglikelihood_by_fusion(requests, fusions)
            rows = []
            for per_option in results:
                nll = {c: -r.logprob for c, r in zip(example.choices, per_option, strict=True)}
                best = min(example.choices, key=nll.__getitem__)
                rows.append(
                    {
                        "id": example.id,
                        "output": "",
                        "prediction": best,
                        "reference": example.target,
                        "correct": task.is_correct(best, example),
                        "choice_nll": nll,
                        "clipped": prompt.clipped,
                    }
                )
            yield example, rows

    def _perplexity(
        self, task: Task, items: list[Example], fusions: list[Fusion]
    ) -> Iterator[tuple[Example, list[dict]]]:
        results = self.lm.loglikelihood_rolling_by_fusion(
            [e.fields["text"] for e in items], fusions, progress=self.progress
        )
        for i, example in enumerate(items):
            yield (
                example,
                [{"id": example.id, "nll": -r[i].logprob, "n_tokens": r[i].n_tokens} for r in results],
            )
