"""Label-free weight selection: the weights whose fused model has the lowest perplexity on task prompts.

The candidates are the grid of the config's ``search`` section (the paper's a, b in {0.1, ..., 1.0}
with small_base at 1 - a - b), every single source, and Proxy Tuning's point, all scored in one pass
of :class:`FusedPerplexityScorer`. A refinement stage then searches a finer local grid around the
best grid point; it keeps the incumbent, so it can only lower the selected perplexity.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trimix.config import SearchConfig
from trimix.errors import ConfigError, DataError
from trimix.fusion import get_method
from trimix.io import read_text
from trimix.search.scoring import FusedPerplexityScorer, ScoringText
from trimix.tasks import Task, get_task

logger = logging.getLogger(__name__)
_MIN_TOKENS = 16


MODES = ("prompt", "input")  # what is scored: every prompt token, or only the task's own text


@dataclass
class Candidate:
    """One weight vector and its fused perplexity on the selection prompts (in the run's scoring mode,
    and in each mode under ``by_mode``)."""

    weights: dict[str, float]
    kind: str  # grid | refine | single | proxy_tuning
    perplexity: float
    nll: float
    by_mode: dict[str, float] = field(default_factory=dict)


@dataclass
class SelectionResult:
    """Every scored candidate, the selected weights, and how the prompts were drawn.

    ``by_mode`` holds the weights each scoring mode selects (from the same forward passes), and
    ``token_split`` how the scored tokens divide between the prompt template and the task's own text
    and by writing system; ``warnings`` says when the modes disagree.
    """

    roles: list[str]
    candidates: list[Candidate]
    selected: Candidate
    grid_best: Candidate
    singles: dict[str, float]
    proxy_tuning: float | None
    n_tokens: int
    prompt_ids: list[str]
    prompts: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)
    score: str = "prompt"
    average: str = "tokens"  # tokens: pooled over every scored token; texts: mean of each prompt's mean NLL
    by_mode: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_split: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self, path: str | Path, axes: Sequence[str]) -> Path:
        """Heatmap of perplexity over the two grid axes (a line plot otherwise), selected point starred."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = [c for c in self.candidates if c.kind == "grid"]
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
        if len(axes) == 2:
            xs = sorted({c.weights[axes[1]] for c in grid})
            ys = sorted({c.weights[axes[0]] for c in grid})
            table = torch.full((len(ys), len(xs)), float("nan"))
            for c in grid:
                table[ys.index(c.weights[axes[0]]), xs.index(c.weights[axes[1]])] = c.perplexity
            image = ax.imshow(table.numpy(), origin="lower", cmap="viridis_r", aspect="auto")
            middle = float(table.nanmean())
            for i, j in itertools.product(range(len(ys)), range(len(xs))):
                if not torch.isnan(table[i, j]):
                    # viridis_r is light at low perplexity: dark text there, light text on dark cells.
                    color = "black" if table[i, j] < middle else "white"
                    ax.text(j, i, f"{table[i, j]:.1f}", ha="center", va="center", fontsize=7, color=color)
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set_xlabel(f"{axes[1]} weight")
            ax.set_ylabel(f"{axes[0]} weight")

            sel = self.selected.weights
            # A refined point may fall between grid cells: place it by linear interpolation of the ticks.
            col = float(np.interp(sel[axes[1]], xs, range(len(xs))))
            row = float(np.interp(sel[axes[0]], ys, range(len(ys))))
            label = f"selected ({self.selected.kind}) ppl {self.selected.perplexity:.2f}"
            ax.plot(col, row, marker="*", color="red", markersize=18, markeredgecolor="white", label=label)
            fig.colorbar(image, ax=ax, label="fused perplexity (lower is better)")
        else:
            ordered = sorted(grid, key=lambda c: c.perplexity)
            ax.plot(range(len(ordered)), [c.perplexity for c in ordered], marker="o")
            ax.set_xlabel("grid candidates, best first")
            ax.set_ylabel("fused perplexity")
        extra = [f"{role} alone {ppl:.1f}" for role, ppl in self.singles.items()]
        if self.proxy_tuning is not None:
            extra.append(f"proxy tuning {self.proxy_tuning:.1f}")
        ax.set_title("TriMix weight selection by fused perplexity\n" + ", ".join(extra), fontsize=9)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), fontsize=8, frameon=False)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def build_candidates(search: SearchConfig, roles: Sequence[str]) -> tuple[list[dict[str, float]], list[str]]:
    """The grid's weight vectors (role -> weight) and the names of its free axes.

    Raises:
        ConfigError: a role the grid names is not a source, a source gets no weight, or no point is valid.
    """
    try:
        axes = search.axes()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    assigned = set(axes) | set(search.fixed) | ({search.derived} if search.derived else set())
    unknown = sorted(assigned - set(roles))
    if unknown:
        raise ConfigError(f"search names role(s) {unknown} that no source has; sources: {', '.join(roles)}")
    unassigned = [r for r in roles if r not in assigned]
    if unassigned:
        raise ConfigError(
            f"search gives no weight to source(s) {unassigned}; add them to `search.grid`, `search.fixed` "
            "or `search.derived`"
        )
    names = list(axes)
    points = []
    for values in itertools.product(*(axes[n] for n in names)):
        point = dict(zip(names, values, strict=True)) | dict(search.fixed)
        if search.derived:
            point[search.derived] = round(1.0 - sum(point.values()), 10)
        points.append({r: float(point[r]) for r in roles})
    if not points:
        raise ConfigError("the search space has no point; give every `search.grid` axis at least one value")
    return points, names


def selection_texts(
    search: SearchConfig, default_lang: str | None = None
) -> tuple[list[ScoringText], dict[str, Any]]:
    """The prompts to score: a task's items rendered as at inference (never with the answer), or text lines.

    Returns:
        The sampled texts and a description of where they came from (recorded in the output).
    """
    rng = random.Random(search.seed)
    if search.text_file:
        path = Path(search.text_file)
        if not path.is_file():
            raise DataError(f"search.text_file {str(path)!r} does not exist")
        lines = [line.strip() for line in read_text(path, "search.text_file").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{path} holds no text")
        picked = sorted(rng.sample(range(len(lines)), min(search.n_prompts, len(lines))))
        texts = [ScoringText(f"line{i + 1}", lines[i], spans=((0, len(lines[i])),)) for i in picked]
        return texts, {"text_file": str(path), "n": len(texts), "seed": search.seed}
    lang = search.lang or default_lang
    if not search.task or not lang:
        raise ConfigError("weight search needs `search.task` and `search.lang` (or `search.text_file`)")
    if search.split == "test":
        logger.warning("selecting weights on the test split, as asked; scores on it are then not held out")
    task = get_task(search.task, lang, n_shots=search.shots, prompt_lang=search.prompt_lang)
    return task_selection_texts(task, search, search.split)


def task_selection_texts(
    task: Task, search: SearchConfig, split: str
) -> tuple[list[ScoringText], dict[str, Any]]:
    """A seeded sample of a task's items rendered exactly as at inference (never with the answer)."""
    pool = task.examples(split)
    if len(pool) < search.n_prompts:
        logger.warning(
            "%s/%s has %d items, fewer than n_prompts=%d; using all",
            task.full_name,
            split,
            len(pool),
            search.n_prompts,
        )
    picked = random.Random(search.seed).sample(pool, min(search.n_prompts, len(pool)))
    texts = []
    for example in picked:
        prompt = task.render(example, selection=True)
        # Every token is scored; which ones count is the scoring mode's choice (prompt: all, input: the
        # task's own text), so both selections come from the same forward passes.
        texts.append(ScoringText(example.id, prompt.text, 0, spans=prompt.spans))
    source = {
        "task": task.full_name,
        "lang": task.lang,
        "split": split,
        "n": len(texts),
        "seed": search.seed,
        "score": search.score,
        "shot_seed": task.shot_seed,
    }
    return texts, source


def search_weights(
    scorer: FusedPerplexityScorer, search: SearchConfig, prompts: dict[str, Any], method: str = "trimix"
) -> SelectionResult:
    """Score the grid and the method's baselines (each source alone, Proxy Tuning), then refine around
    the best grid point, in the configured scoring mode and in the other one (no extra forward pass)."""
    roles = [s.role for s in scorer.sources]
    if not get_method(method).linear:
        raise ConfigError(
            f"fusion method {method!r} recomputes its weights at every token: the weight search (fixed "
            "weights scored by fused perplexity) does not apply; set the method's weights directly"
        )
    if scorer.n_tokens < _MIN_TOKENS:
        raise DataError(
            f"only {scorer.n_tokens} tokens to score; give at least {_MIN_TOKENS} (more or longer prompts)"
        )
    grid, axes = build_candidates(search, roles)
    baselines = get_method(method).baselines(roles)
    start = time.perf_counter()
    scored = _score(
        scorer,
        grid + [weights for _, weights in baselines],
        roles,
        ["grid"] * len(grid) + [kind for kind, _ in baselines],
        search.score,
        average=search.average,
    )
    grid_scoring = time.perf_counter() - start
    candidates = [c for c in scored if c.kind == "grid"]
    modes = {}
    for mode in MODES:
        if not scored[0].by_mode.get(mode):
            continue
        history = list(candidates)
        best_grid = min(candidates, key=lambda c: c.by_mode[mode])
        best = _refine(scorer, search, axes, roles, best_grid, history, mode)
        modes[mode] = {
            "weights": best.weights,
            "perplexity": best.by_mode[mode],
            "grid_best": best_grid.weights,
        }
        if mode == search.score:
            selected, grid_best = best, best_grid
            refined = [c for c in history if c.kind == "refine"]
    split = _token_split(scorer)
    warnings = _disagreement(modes, search, split)
    for warning in warnings:
        logger.warning("%s", warning)
    result = SelectionResult(
        roles=roles,
        candidates=candidates + refined,
        selected=selected,
        grid_best=grid_best,
        singles={
            c.weights and next(r for r in roles if c.weights[r] == 1.0): c.perplexity
            for c in scored
            if c.kind == "single"
        },
        proxy_tuning=next((c.perplexity for c in scored if c.kind == "proxy_tuning"), None),
        n_tokens=scorer.n_tokens,
        prompt_ids=scorer.text_ids,
        prompts=prompts,
        timing={
            "forward_seconds": scorer.forward_seconds,
            "grid_scoring_seconds": grid_scoring,
            "refine_seconds": time.perf_counter() - start - grid_scoring,
        },
        score=search.score,
        average=search.average,
        by_mode=modes,
        token_split=split,
        warnings=warnings,
    )
    logger.info(
        "selected %s (ppl %.3f; best grid point ppl %.3f)",
        selected.weights,
        selected.perplexity,
        grid_best.perplexity,
    )
    return result


def _token_split(scorer: FusedPerplexityScorer) -> dict[str, Any]:
    totals = scorer.token_groups()
    return {
        "template": totals[0],
        "task_text": totals[1],
        "template_share": totals[0] / max(sum(totals), 1),
        "by_script": scorer.script_counts(),
        "task_text_by_script": scorer.script_counts(group=1),
    }


def _disagreement(modes: dict[str, dict[str, Any]], search: SearchConfig, split: dict[str, Any]) -> list[str]:
    """A warning when the two scoring modes select weights more than one grid step apart."""
    if len(modes) < 2:
        return []
    axes = search.axes()
    steps = {
        a: min((y - x for x, y in itertools.pairwise(sorted(set(v)))), default=0.0) for a, v in axes.items()
    }
    a, b = modes["prompt"]["weights"], modes["input"]["weights"]
    apart = [r for r in axes if steps[r] and abs(a[r] - b[r]) > steps[r] + 1e-9]
    if not apart:
        return []
    fmt = lambda w: ", ".join(f"{r}={w[r]:g}" for r in w)  # noqa: E731
    return [
        f"scoring the whole prompt selects {fmt(a)} but scoring only the task's own text selects {fmt(b)} "
        f"(more than one grid step apart on {', '.join(apart)}); {split['template_share']:.0%} of the scored "
        "tokens are prompt template (instruction, field labels), which favours the source that reads the "
        "template well. Exemplars in the task's language (`search.shots`) make the scored text mostly that language."
    ]


def _score(
    scorer: FusedPerplexityScorer,
    points: list[dict[str, float]],
    roles: list[str],
    kinds: list[str],
    mode: str = "prompt",
    desc: str = "search: scoring",
    average: str = "tokens",
) -> list[Candidate]:
    matrix = torch.tensor([[p[r] for r in roles] for p in points], dtype=torch.float32)
    totals = scorer.score(matrix, desc=desc)
    by_mode: list[dict[str, float]] = [{} for _ in points]
    sums = {"prompt": totals.nll}
    perplexities = {"prompt": totals.perplexities(average=average)}
    if totals.per_group is not None and totals.tokens_per_group and totals.tokens_per_group[1]:
        sums["input"] = totals.per_group[1]
        perplexities["input"] = totals.perplexities(group=1, average=average)
    for name, values in perplexities.items():
        for i, value in enumerate(values.tolist()):
            by_mode[i][name] = float(value)
    if mode not in sums:
        raise DataError(
            "`score: input` needs prompts with the task's own text marked (task prompts or a text file)"
        )
    nll = sums[mode].tolist()
    return [
        Candidate(p, k, modes[mode], float(n), modes)
        for p, k, n, modes in zip(points, kinds, nll, by_mode, strict=True)
    ]


def _refine(
    scorer: FusedPerplexityScorer,
    search: SearchConfig,
    axes: list[str],
    roles: list[str],
    incumbent: Candidate,
    history: list[Candidate],
    mode: str,
) -> Candidate:
    """Local grid search with a halving step, inside the grid's bounding box; never returns a worse point."""
    if search.refine_rounds == 0 or not axes:
        return incumbent
    values = search.axes()
    bounds = {a: (min(values[a]), max(values[a])) for a in axes}
    steps = {}
    for a in axes:
        distinct = sorted(set(values[a]))
        gaps = [y - x for x, y in itertools.pairwise(distinct)]
        steps[a] = min(gaps) if gaps else 0.0
    seen = {tuple(round(c.weights[r], 8) for r in roles) for c in history}
    for round_index in range(search.refine_rounds):
        scale = 0.5 ** (round_index + 1)
        points = []
        for offsets in itertools.product((-1, 0, 1), repeat=len(axes)):
            if not any(offsets):
                continue
            point = dict(incumbent.weights)
            for a, o in zip(axes, offsets, strict=True):
                point[a] = round(min(max(point[a] + o * steps[a] * scale, bounds[a][0]), bounds[a][1]), 8)
            if search.derived:
                point[search.derived] = round(
                    1.0 - sum(v for r, v in point.items() if r != search.derived), 8
                )
            key = tuple(round(point[r], 8) for r in roles)
            if key not in seen:
                seen.add(key)
                points.append(point)
        if not points:
            break
        scored = _score(
            scorer,
            points,
            roles,
            ["refine"] * len(points),
            mode,
            desc=f"search: refine round {round_index + 1}",
            average=search.average,
        )
        history.extend(scored)
        challenger = min(scored, key=lambda c: c.by_mode[mode])
        if challenger.by_mode[mode] < incumbent.by_mode[mode]:
            incumbent = challenger
    return incumbent
