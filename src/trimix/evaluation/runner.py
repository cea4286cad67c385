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
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trimix.backends.loading import Source
from trimix.config import MethodSpec, TaskSpec, TrimixConfig, resolve_weights
from trimix.decoding import FusedLM
from trimix.errors import ConfigError
from trimix.fusion import Fusion
from trimix.search import FusedPerplexityScorer, ScoringText, search_weights, task_selection_texts
from trimix.tasks import Example, Task, get_task

logger = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
SELECTIONS = "selections"
RESUMED_FROM = (PREDICTIONS, SELECTIONS)  # what a run continues from; `--overwrite` removes them


def build_task(spec: TaskSpec, lang: str) -> Task:
    return get_task(spec.task, lang, n_shots=spec.shots, prompt_lang=spec.prompt_lang, **spec.options)


def cell_name(spec: TaskSpec, task: Task) -> str:
    """The name a cell's rows carry: the task and language, marked when options are scored by likelihood
    (the same task may also be evaluated by generation in one run)."""
    return f"{task.full_name}:loglik" if spec.scoring == "loglikelihood" else task.full_name


def sample_items(task: Task, spec: TaskSpec, seed: int) -> list[Example]:
    """The evaluated items: the split, or a seeded sample of ``limit`` items kept in file order."""
    items = task.examples(spec.split)
    if spec.limit is None or spec.limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), spec.limit))
    return [e for i, e in enumerate(items) if i in keep]


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a predictions file; a last line cut short by a kill is removed from the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines, good_bytes = [], 0
    for chunk in raw.splitlines(keepends=True):
        if not chunk.endswith(b"\n"):
            break
        try:
            lines.append(json.loads(chunk))
        except json.JSONDecodeError:
            break
        good_bytes += len(chunk)
    if good_bytes < len(raw):
        logger.warning("dropping an incomplete last line of %s (the previous run was interrupted)", path)
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return lines


def _key(method: str, task: str, item_id: str) -> tuple[str, str, str]:
    return (method, task, str(item_id))


class _Sink:
    """Appends JSON lines and makes each durable before the next item starts."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("a", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


class Evaluator:
    """Evaluates each method on each task and language, with the sources loaded once."""

    def __init__(self, config: TrimixConfig, out_dir: Path, progress: bool = True) -> None:
        if not config.eval.methods or not config.eval.tasks:
            raise ConfigError("the `eval` section needs at least one entry in `methods` and one in `tasks`")
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        for method in config.eval.methods:  # fail on bad weights before loading any model
            if not method.select:
                self.fixed_weights(method)
        self.lm = FusedLM.from_config(config, load_all=True)

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

    def _selected_weights(self, task: Task) -> dict[str, float]:
        """TriMix weights chosen by fused perplexity on the task's dev prompts, cached beside the results."""
        path = self.out_dir / SELECTIONS / f"{task.full_name}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["selected"]["weights"]
        search = self.config.search
        texts, origin = task_selection_texts(task, search, "dev")
        scorer = self.lm.scorer(texts, roles=[m.role for m in self.config.models], progress=self.progress)
        result = search_weights(scorer, search, origin)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result.plot(path.with_suffix(".png"), list(search.axes()))
        logger.info("selected %s for %s", result.selected.weights, task.full_name)
        return result.selected.weights

    def fused(self, weights: dict[str, float], method: MethodSpec) -> FusedLM:
        """The method's fused model over the loaded sources (no reload)."""
        plausibility = method.plausibility.resolve() if method.plausibility else None
        return self.lm.with_fusion(Fusion(weights, method.method, plausibility))

    # ---------------------------------------------------------------- the run
    def cells(self) -> Iterator[tuple[TaskSpec, Task, list[Example]]]:
        for spec in self.config.eval.tasks:
            for lang in spec.langs:
                task = build_task(spec, lang)
                yield spec, task, sample_items(task, spec, self.config.eval.seed)

    def run(self) -> Path:
        path = self.out_dir / PREDICTIONS
        done = {_key(r["method"], r["task"], r["id"]) for r in read_predictions(path)}
        cells = list(self.cells())
        total = sum(len(items) for _, _, items in cells) * len(self.config.eval.methods)
        bar = tqdm(
            total=total, initial=min(len(done), total), desc="eval", unit="item", disable=not self.progress
        )
        sink = _Sink(path)

        def write(
            method: MethodSpec, cell: str, task: Task, weights: dict[str, float], rows: list[dict]
        ) -> None:
            base = {
                "method": method.name,
                "task": cell,
                "task_name": task.name,
                "lang": task.lang,
                "metrics": list(task.metric_names),
                "target_lang": task.target_lang,
                "weights": weights,
            }
            sink.write([{**base, **row} for row in rows])
            bar.update(len(rows))

        try:
            for spec, task, items in cells:
                cell = cell_name(spec, task)
                pending = {
                    m.name: [e for e in items if _key(m.name, cell, e.id) not in done]
                    for m in self.config.eval.methods
                }
                methods = [m for m in self.config.eval.methods if pending[m.name]]
                if not methods:
                    continue
                weights = {
                    m.name: self._selected_weights(task) if m.select else self.fixed_weights(m)
                    for m in methods
                }
                if task.kind == "perplexity" or spec.scoring == "loglikelihood":
                    bar.set_description(f"eval {len(methods)} methods | {cell}")
                    for method, rows in self._score(task, items, methods, weights, pending):
                        write(method, cell, task, weights[method.name], rows)
                    continue
                for method in methods:
                    bar.set_description(f"eval {method.name} | {cell}")
                    lm = self.fused(weights[method.name], method)
                    for rows in self._generate(lm, task, pending[method.name]):
                        write(method, cell, task, weights[method.name], rows)
        finally:
            sink.close()
            bar.close()
        return path

    def _score(
        self,
        task: Task,
        items: list[Example],
        methods: list[MethodSpec],
        weights: dict[str, dict[str, float]],
        pending: dict[str, list[Example]],
    ) -> Iterator[tuple[MethodSpec, list[dict]]]:
        """Log-likelihood and perplexity cells: one forward pass per source per text serves every method.

        A method's fused scores depend on its weights only through the log-partition, so the scorer
        computes each source's hidden states once and scores all methods' weight vectors together.
        """
        if task.kind == "perplexity":
            scorer_rows = self._perplexity
        elif task.kind == "choice":
            scorer_rows = self._choose
        else:
            raise ConfigError(
                f"{task.name}: loglikelihood scoring needs a classification or multiple-choice task; "
                "use `scoring: generate` for it"
            )
        for method in methods:
            if method.plausibility is not None:
                logger.warning(
                    "method %r: the plausibility constraint applies to generation only; %s is scored with "
                    "the unconstrained fused distribution",
                    method.name,
                    task.full_name,
                )
        used = [
            self.lm.pool.get(m.role)
            for m in self.config.models
            if any(weights[method.name].get(m.role, 0.0) != 0.0 for method in methods)
        ]
        matrix = torch.tensor([[weights[m.name].get(s.role, 0.0) for s in used] for m in methods])
        wanted = [{e.id for e in pending[m.name]} for m in methods]
        todo = [e for e in items if any(e.id in want for want in wanted)]
        for example, per_method in scorer_rows(used, task, todo, matrix):
            for method, want, row in zip(methods, wanted, per_method, strict=True):
                if example.id in want:
                    yield method, [row]

    def _generate(self, lm: FusedLM, task: Task, items: list[Example]) -> Iterator[list[dict]]:
        size = self.config.eval.batch_size
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            prompts = [task.render(e).text for e in batch]
            outputs = lm.generate(prompts, max_new_tokens=task.max_new_tokens, stop=["\n"], batch_size=size)
            rows = []
            for example, output in zip(batch, outputs, strict=True):
                prediction = task.extract(output.text)
                row = {
                    "id": example.id,
                    "output": output.text,
                    "prediction": prediction,
                    "reference": example.target,
                }
                if "accuracy" in task.metric_names:
                    row["correct"] = task.is_correct(prediction, example)
                rows.append(row)
            yield rows

    def _choose(
        self, sources: list[Source], task: Task, items: list[Example], weights: torch.Tensor
    ) -> Iterator[tuple[Example, list[dict]]]:
        """Each option scored as a continuation of the prompt, for every row of ``weights`` at once."""
        for example in items:
            prompt = task.render(example).text
            texts = [ScoringText(c, f"{prompt} {c}", len(prompt)) for c in example.choices]
            totals = FusedPerplexityScorer(sources, self.lm.vocab_size, texts, progress=False).score(weights)
            rows = []
            for nll in totals.per_text.T.tolist():  # one (options,) list per method
                best = example.choices[min(range(len(nll)), key=nll.__getitem__)]
                rows.append(
                    {
                        "id": example.id,
                        "output": "",
                        "prediction": best,
                        "reference": example.target,
                        "correct": task.is_correct(best, example),
                        "choice_nll": dict(zip(example.choices, nll, strict=True)),
                    }
                )
            yield example, rows

    def _perplexity(
        self, sources: list[Source], task: Task, items: list[Example], weights: torch.Tensor
    ) -> Iterator[tuple[Example, list[dict]]]:
        texts = [ScoringText(e.id, e.fields["text"]) for e in items]
        totals = FusedPerplexityScorer(sources, self.lm.vocab_size, texts, progress=self.progress).score(
            weights
        )
        for i, example in enumerate(items):
            yield (
                example,
                [
                    {"id": example.id, "nll": float(nll), "n_tokens": totals.tokens_per_text[i]}
                    for nll in totals.per_text[i].tolist()
                ],
            )
