"""The runners a scheduler group decodes with (:mod:`trimix.decoding.scheduler`).

* :class:`EagerRunner`: one cached forward per source per step on caches that grow; takes new rows
  between steps and drops finished ones (the server's continuous batching).
* :class:`StaticRunner`: preallocated caches and one in-place fused step
  (:class:`~trimix.decoding.static.FusedStep`), captured as a CUDA graph on a GPU (``graphs``); decodes
  one batch from start to end.
* :class:`~trimix.decoding.drafting.SpeculativeRunner` (in :mod:`trimix.decoding.drafting`): a drafter
  proposes, every fused source checks in one forward; one batch.

A runner's :meth:`~Runner.step` returns one :class:`~trimix.decoding.results.Step` per position (None
when its rows are done). All of them fuse with :meth:`FusedLM.fuse <trimix.FusedLM.fuse>`, choose with
the sampler and end rows through the group's stop checker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from trimix.backends.sequences import SequenceBatch
from trimix.config import GenerationConfig
from trimix.decoding.results import Step
from trimix.decoding.sampling import TokenChooser, choose_rows, sampling_key
from trimix.decoding.static import Batch, FusedStep, GraphSession, bucket_capacity, bucket_size
from trimix.decoding.stopping import FinishReason, StopChecker

if TYPE_CHECKING:
    from trimix.decoding.fused import FusedLM

logger = logging.getLogger(__name__)


@dataclass
class Admission:
    """Rows a scheduler hands a runner: tokenised for every source, with their settings and weights."""

    rows: list[int]  # sequence ids, the stop checker's keys
    prompts: list[Any]  # as submitted (a drafter outside the fusion renders them itself)
    encodings: list[dict[str, torch.Tensor]]  # per fused source: left-padded ids and mask
    settings: list[GenerationConfig]  # per row
    weights: torch.Tensor  # (n, S) per-row fusion weights
    keys: torch.Tensor  # (n,) sampling keys
    scores: bool  # attach fused scores to the steps
    checker: StopChecker

    @property
    def inspect_k(self) -> int:
        return max(g.inspect_top_k for g in self.settings)


class Runner(Protocol):
    inserts: bool  # takes new rows while running

    def step(self) -> Step | None: ...

    def insert(self, admission: Admission) -> None: ...


class EagerRunner:
    """Growing caches; rows join between steps and leave when they end (see the module docstring).

    The tokens chosen at a step are fed at the start of the next, after the rows that ended (or were
    cancelled) are dropped, so a step's tokens reach the caller before the next forward runs.
    """

    inserts = True

    def __init__(self, lm: FusedLM, admission: Admission, compact: bool = False) -> None:
        self.lm, self.checker = lm, admission.checker
        self.device = lm.fusion_device
        self.rows: list[int] = []
        self.settings: list[GenerationConfig] = []
        self.sequences = [SequenceBatch(s.backend, compact) for s in lm.sources]
        self.logits: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None  # tokens chosen at the last step, not fed yet
        self.weights = self.keys = self.counters = None
        self.scores, self.inspect_k = False, 0
        self.insert(admission)

    @torch.inference_mode()
    def insert(self, admission: Admission) -> None:
        self._settle()
        logits = [
            batch.start(admission.rows, e["input_ids"], e["attention_mask"])
            for batch, e in zip(self.sequences, admission.encodings, strict=True)
        ]
        extra = {
            "weights": admission.weights.to(self.device),
            "keys": admission.keys.to(self.device),
            "counters": torch.zeros(len(admission.rows), dtype=torch.long, device=self.device),
        }
        if not self.rows:
            self.logits = logits
            for name, value in extra.items():
                setattr(self, name, value)
        else:
            self.logits = [torch.cat([a, b.to(a.device)]) for a, b in zip(self.logits, logits, strict=True)]
            for name, value in extra.items():
                setattr(self, name, torch.cat([getattr(self, name), value]))
        self.rows += admission.rows
        self.settings += admission.settings
        self.scores = self.scores or admission.scores
        self.inspect_k = max(self.inspect_k, admission.inspect_k)
        self._settle()  # rows the context leaves no room in never decode

    @torch.inference_mode()
    def step(self) -> Step | None:
        self._settle()
        if not self.rows:
            return None
        lm = self.lm
        source_logits = [x.to(self.device) for x in self.logits]
        scores = lm.fuse(source_logits, self.weights)
        tokens = choose_rows(scores, self.settings, self.keys, self.counters)
        self.counters += 1
        finish = self.checker.record(self.rows, tokens.tolist())
        inspection = (
            lm.inspect_step(source_logits, scores, tokens, self.inspect_k, self.weights)
            if self.inspect_k
            else None
        )
        self.pending = tokens
        return Step(
            list(self.rows), tokens.tolist(), finish, inspection, scores=scores if self.scores else None
        )

    def _settle(self) -> None:
        """Drop the rows that ended, then feed the pending tokens: every remaining row has its logits."""
        ended = [row for row in self.rows if self.checker.done(row)]
        if ended:
            kept = [batch.release(ended) for batch in self.sequences]  # every source drops them
            keep = kept[0]
            index = torch.tensor(keep, dtype=torch.long)
            on_device = index.to(self.device)
            self.logits = [x[index.to(x.device)] for x in self.logits]
            self.weights, self.keys, self.counters = (
                self.weights[on_device],
                self.keys[on_device],
                self.counters[on_device],
            )
            if self.pending is not None:
                self.pending = self.pending[on_device]
            self.rows = [self.rows[i] for i in keep]
            self.settings = [self.settings[i] for i in keep]
        if self.pending is not None and self.rows:
            self.logits = [batch.step(self.pending[:, None])[:, -1] for batch in self.sequences]
        self.pending = None


class BatchRows:
    """The group's stop checker seen through a whole-batch runner's row indices ``0 .. n - 1``."""

    def __init__(self, checker: StopChecker, rows: Sequence[int]) -> None:
        self.checker, self.ids = checker, list(rows)
        first = checker.rows[self.ids[0]]
        self.eos = sorted(first.eos)  # one set per batch (the scheduler groups by it)

    def __len__(self) -> int:
        return len(self.ids)

    def done(self, i: int) -> bool:
        return self.checker.done(self.ids[i])

    def budget(self, i: int) -> int:
        return self.checker.rows[self.ids[i]].budget

    def tokens(self, i: int) -> list[int]:
        return self.checker.tokens(self.ids[i])

    def record(self, rows: Sequence[int], tokens: Sequence[int]) -> list[FinishReason | None]:
        return self.checker.record([self.ids[i] for i in rows], tokens)


class WholeBatch:
    """A runner that decodes one batch from start to end (a generator of steps in batch row indices)."""

    inserts = False

    def __init__(self, steps: Iterator[Step], rows: Sequence[int]) -> None:
        self.steps, self.ids = steps, list(rows)

    def step(self) -> Step | None:
        step = next(self.steps, None)
        if step is not None:
            step.rows = [self.ids[i] for i in step.rows]
            if step.stats is not None:
                step.stats = {self.ids[i]: stats for i, stats in step.stats.items()}
        return step

    def insert(self, admission: Admission) -> None:
        raise RuntimeError("this runner decodes whole batches; rows wait for the next one")


class StaticRunner(WholeBatch):
    def __init__(self, lm: FusedLM, admission: Admission, engine: GenerationConfig, graphs: bool) -> None:
        rows = BatchRows(admission.checker, admission.rows)
        super().__init__(decode_static(lm, admission, rows, engine, graphs), admission.rows)


@torch.inference_mode()
def decode_static(
    lm: FusedLM, admission: Admission, rows: BatchRows, engine: GenerationConfig, graphs: bool
) -> Iterator[Step]:
    encodings, live = admission.encodings, len(rows)
    widest = max(int(e["input_ids"].shape[1]) for e in encodings)
    needed = widest + max(rows.budget(i) for i in range(live))
    batch, capacity = (bucket_size(live), bucket_capacity(needed)) if graphs else (live, needed)
    padded = Batch(
        [
            pad_rows(e["input_ids"], batch, s.tokenizer.pad_token_id)
            for s, e in zip(lm.sources, encodings, strict=True)
        ],
        [pad_rows(e["attention_mask"], batch, 0) for e in encodings],
    )
    settings = admission.settings[0]  # the scheduler groups a whole batch by its sampling settings
    chooser = TokenChooser(settings)
    eos = torch.tensor(rows.eos, dtype=torch.long, device=lm.fusion_device)
    compiled = engine.compile if engine.compile is not None else graphs
    inspect_k = admission.inspect_k

    def make_step(backends: list[Any], states: list[Any]) -> FusedStep:
        return FusedStep(backends, states, lm.fuse, chooser, eos, int(lm.tokenizer.pad_token_id), compiled)

    def create() -> GraphSession:
        return GraphSession([s.backend for s in lm.sources], batch, capacity, make_step, graphs)

    if graphs:
        key = (
            lm.roles,
            batch,
            capacity,
            lm.plausibility_index,
            lm.plausibility_alpha,
            lm.fusion.method,
            sampling_key(settings),
            tuple(rows.eos),
            compiled,
        )
        session, fresh = lm.pool.sessions.get(key, create)
        if fresh:
            logger.info("engine graphs: new session for batch %d, %d cache columns", batch, capacity)
    else:
        session = create()
    weights = pad_rows(admission.weights, batch, 0)
    weights[live:] = admission.weights[0]  # padding rows: any finite fusion
    all_keys = torch.cat([admission.keys, torch.zeros(batch - live, dtype=torch.long)])
    session.load(padded, all_keys.to(lm.fusion_device), weights.to(lm.fusion_device), live)
    step = session.step_fn
    never = [i for i in range(live) if rows.done(i)]
    if never:
        step.finished[torch.tensor(never, device=step.finished.device)] = True
    while True:
        active = [i for i in range(live) if not rows.done(i)]
        if not active:
            return
        chosen = step.chosen.tolist()
        tokens = [chosen[i] for i in active]
        finish = rows.record(active, tokens)
        index = torch.tensor(active, device=lm.fusion_device)
        inspection = None
        if inspect_k:
            inspection = lm.inspect_step(
                [x[index] for x in step.source_logits],
                step.scores[index],
                step.chosen[index],
                inspect_k,
                step.weights[index],
            )
        scores = step.scores[index] if admission.scores else None
        yield Step(active, tokens, finish, inspection, scores=scores)
        ended = [i for i, f in zip(active, finish, strict=True) if f is not None]
        if ended:
            step.finished[torch.tensor(ended, device=step.finished.device)] = True
        if all(rows.done(i) for i in range(live)):
            return
        session.step()


def pad_rows(tensor: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    extra = tensor.new_full((rows - tensor.shape[0], tensor.shape[1]), value)
    return torch.cat([tensor, extra])
