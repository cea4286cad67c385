"""The evaluation matrix as work: cells, what determines each cell's rows, and how one unit of work is
computed from a loaded fused model. Nothing here writes files, so the same plan runs in the driver
(local executor) and in Ray workers, which build it from the same config.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from trimix.config import RESULT_FIELDS, MethodSpec, TaskSpec, TrimixConfig, resolve_weights
from trimix.decoding import FusedLM
from trimix.errors import ConfigError, DataError
from trimix.fusion import Fusion
from trimix.runinfo import fingerprint
from trimix.search import search_weights, task_selection_texts
from trimix.search.select import SelectionResult
from trimix.tasks import Example, Task, get_task

logger = logging.getLogger(__name__)
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


def sample_items(task: Task, spec: TaskSpec, seed: int) -> list[Example]:
    """The evaluated items: the split, or a seeded sample of ``limit`` items kept in file order."""
    items = task.examples(spec.split)
    if spec.limit is None or spec.limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), spec.limit))
    return [e for i, e in enumerate(items) if i in keep]


def items_digest(items: list[Example]) -> str:
    """The identity of a cell's data: its items' ids, fields and references."""
    return fingerprint({"items": [[e.id, e.fields, e.target, list(e.choices)] for e in items]})


@dataclass
class Cell:
    """One task and language of the matrix: its items and how they are asked."""

    spec: TaskSpec
    task: Task
    items: list[Example]
    name: str
    request: RequestType


@dataclass(frozen=True)
class Unit:
    """A piece of work: the label-free selection of a cell's task, or some items of a cell for some methods
    (the methods of a likelihood cell go together: one forward pass per source serves them all)."""

    kind: Literal["select", "generate", "score"]
    cell: int
    methods: tuple[str, ...] = ()
    weights: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    items: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.items) * len(self.methods)

    def weights_of(self, method: str) -> dict[str, float]:
        return dict(dict(self.weights)[method])


def pack_weights(weights: dict[str, dict[str, float]]) -> tuple:
    return tuple((m, tuple(sorted(w.items()))) for m, w in sorted(weights.items()))


class EvalPlan:
    """The methods x tasks x languages matrix of a config, validated without loading any model.

    Raises:
        ConfigError / DataError: bad methods, tasks, options or data (before any weight loads).
    """

    def __init__(self, config: TrimixConfig) -> None:
        if not config.eval.methods or not config.eval.tasks:
            raise ConfigError("the `eval` section needs at least one entry in `methods` and one in `tasks`")
        self.config = config
        self.methods = {m.name: m for m in config.eval.methods}
        roles = [m.role for m in config.models]
        for method in config.eval.methods:
            if not method.select:
                self.fixed_weights(method)
            if method.plausibility is not None and method.plausibility.role not in roles:
                raise ConfigError(
                    f"eval method {method.name!r}: plausibility.role {method.plausibility.role!r} is not a source; "
                    f"roles are {', '.join(roles)}"
                )
        self.cells = list(self._cells())
        self.descriptions = {
            (method.name, cell.name): self.describe(cell, method)
            for cell in self.cells
            for method in config.eval.methods
        }

    def _cells(self) -> Iterator[Cell]:
        for spec in self.config.eval.tasks:
            for lang in spec.langs:
                task = build_task(spec, lang)
                items = sample_items(task, spec, self.config.eval.seed)
                if not items:
                    raise DataError(f"{task.full_name}: the {spec.split} split holds no items")
                yield Cell(spec, task, items, cell_name(spec, task), request_type(spec, task))

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

    def describe(self, cell: Cell, method: MethodSpec) -> dict[str, Any]:
        """Everything that determines a cell's rows for one method (its fingerprint is recorded in each row)."""
        description: dict[str, Any] = {
            "method": method.model_dump(mode="json", exclude={"name", "weights"}),  # weights: resolved below
            "task": cell.spec.model_dump(mode="json", exclude={"langs"}),
            "lang": cell.task.lang,
            "request": cell.request,
            "settings": cell.task.generation_settings(),
            "data": items_digest(cell.items),
            "models": [m.model_dump(mode="json", exclude={"weight"}) for m in self.config.models],
            "dtype": self.config.dtype,
            "vocab": self.config.fusion.vocab,
        }
        if cell.request == "generate":  # the run's generation section decodes what the task leaves open
            run = self.config.generation.model_dump(mode="json")
            description["decoding"] = {k: run[k] for k in RESULT_FIELDS}
        if method.select:
            description["search"] = self.config.search.model_dump(mode="json")
        else:
            description["weights"] = self.fixed_weights(method)
        return description

    def cell_fingerprint(self, method: str, cell: Cell) -> str:
        return fingerprint(self.descriptions[(method, cell.name)])

    # ---------------------------------------------------------------- units
    def units(
        self,
        pending: dict[tuple[str, str], list[str]],
        weights: dict[tuple[str, str], dict[str, float]],
        shard: int | None,
    ) -> list[Unit]:
        """The work left: per generation cell one unit per method, per likelihood cell one unit for all its
        methods; each cut into shards of ``shard`` items (None: whole cells)."""
        units = []
        for index, cell in enumerate(self.cells):
            todo = {m: pending.get((m, cell.name), []) for m in self.methods}
            if cell.request == "generate":
                groups = [[m] for m in self.methods if todo[m]]
            else:  # methods left with the same items share a unit (and its forward passes)
                by_items: dict[tuple[str, ...], list[str]] = {}
                for m in self.methods:
                    if todo[m]:
                        by_items.setdefault(tuple(todo[m]), []).append(m)
                groups = list(by_items.values())
            for methods in groups:
                wanted = {i for m in methods for i in todo[m]}
                ids = [e.id for e in cell.items if e.id in wanted]
                size = shard or len(ids)
                for start in range(0, len(ids), size):
                    packed = pack_weights({m: weights[(m, cell.name)] for m in methods})
                    kind = "generate" if cell.request == "generate" else "score"
                    units.append(Unit(kind, index, tuple(methods), packed, tuple(ids[start : start + size])))
        return units

    def base_row(self, cell: Cell) -> dict[str, Any]:
        return {
            "task": cell.name,
            "task_name": cell.task.name,
            "lang": cell.task.lang,
            "metrics": list(cell.task.metric_names),
            "target_lang": cell.task.target_lang,
            "request": cell.request,
            "settings": cell.task.generation_settings(),
        }

    def execute(self, lm: FusedLM, unit: Unit, progress: bool = False) -> Iterator[list[dict[str, Any]]]:
        """The rows of a unit, batch by batch (every row complete, with its method, weights and fingerprint)."""
        cell = self.cells[unit.cell]
        base = self.base_row(cell)
        items = [e for e in cell.items if e.id in set(unit.items)]

        def row(method: str, values: dict[str, Any]) -> dict[str, Any]:
            return {
                "method": method,
                "fusion_method": self.methods[method].method,
                "cell": self.cell_fingerprint(method, cell),
                **base,
                "weights": unit.weights_of(method),
                **values,
            }

        if unit.kind == "generate":
            (method,) = unit.methods
            fused = self.fused(lm, unit.weights_of(method), self.methods[method])
            for rows in self._generate(fused, cell.task, items):
                yield [row(method, r) for r in rows]
            return
        methods = [self.methods[m] for m in unit.methods]
        for spec in methods:
            if spec.plausibility is not None:
                logger.warning(
                    "method %r: the plausibility constraint applies to generation only; %s is scored with the "
                    "unconstrained fused distribution",
                    spec.name,
                    cell.name,
                )
        fusions = [Fusion(unit.weights_of(m.name), m.method) for m in methods]
        rows_of = self._choose if cell.request == "loglikelihood" else self._perplexity
        for _, per_method in rows_of(lm, cell.task, items, fusions, progress):
            yield [row(m.name, r) for m, r in zip(methods, per_method, strict=True)]

    def select(self, lm: FusedLM, unit: Unit, progress: bool = False) -> SelectionResult:
        """TriMix weights chosen by fused perplexity on the cell's task's dev prompts (both scoring modes)."""
        task = self.cells[unit.cell].task
        search = self.config.search
        texts, origin = task_selection_texts(task, search, "dev")
        scorer = lm.scorer(texts, roles=[m.role for m in self.config.models], progress=progress)
        result = search_weights(scorer, search, origin)
        logger.info("selected %s for %s", result.selected.weights, task.full_name)
        return result

    @staticmethod
    def fused(lm: FusedLM, weights: dict[str, float], method: MethodSpec) -> FusedLM:
        """The method's fused model over the loaded sources (no reload)."""
        plausibility = method.plausibility.resolve() if method.plausibility else None
        return lm.with_fusion(Fusion(weights, method.method, plausibility))

    # ---------------------------------------------------------------- computing rows
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

    @staticmethod
    def _choose(
        lm: FusedLM, task: Task, items: list[Example], fusions: list[Fusion], progress: bool
    ) -> Iterator[tuple[Example, list[dict]]]:
        """Each option's log-likelihood as the continuation of the prompt, for every fusion at once."""
        for example in items:
            prompt = task.render(example)
            requests = [(prompt.text, f" {choice}") for choice in example.choices]
            results = lm.loglikelihood_by_fusion(requests, fusions)
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

    @staticmethod
    def _perplexity(
        lm: FusedLM, task: Task, items: list[Example], fusions: list[Fusion], progress: bool
    ) -> Iterator[tuple[Example, list[dict]]]:
        results = lm.loglikelihood_rolling_by_fusion(
            [e.fields["text"] for e in items], fusions, progress=progress
        )
        for i, example in enumerate(items):
            yield (
                example,
                [
                    {
                        "id": example.id,
                        "nll": -r[i].logprob,
                        "n_tokens": r[i].n_tokens,
                        "n_bytes": len(example.fields["text"].encode("utf-8")),
                    }
                    for r in results
                ],
            )
