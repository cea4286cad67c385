"""The decoding core's scheduler: the one loop that ``generate``, ``stream``, the server, evaluation and
lm-eval all drive.

A caller submits :class:`RowRequest` objects (a prompt, its generation settings, its fusion weights and
sampling key) and calls :meth:`Scheduler.step` until nothing is left; each call returns the
:class:`~trimix.decoding.results.Step` records of that position, keyed by the rows' sequence ids.

Rows are grouped by what one fused step can share: the sources, the plausibility rule, and whether the
fusion method is linear (rows of linear methods share a batch, each with its own weights). A group
runs one **runner** (:mod:`trimix.decoding.runners`) at a time:

* ``eager`` (growing caches) takes new rows between two steps (``continuous=True``: a served request
  joins a running batch) and drops finished ones;
* ``static`` / ``graphs`` (preallocated caches, one captured step) and speculative fusion decode a batch
  from start to end; rows that arrive meanwhile wait for the next batch (so their group also keys the
  sampling settings and end-of-sequence set the batch's captured step bakes in).

Every runner fuses with :meth:`FusedLM.fuse`, chooses with the sampler (:mod:`trimix.decoding.sampling`)
and ends rows through the group's :class:`~trimix.decoding.stopping.StopChecker`.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from trimix.config import GenerationConfig
from trimix.decoding.drafting import SpeculativeRunner
from trimix.decoding.results import Generation, RowText, Step, StreamEvent
from trimix.decoding.runners import Admission, EagerRunner, Runner, StaticRunner
from trimix.decoding.sampling import row_keys, sampling_key
from trimix.decoding.stopping import StopChecker, emit_text, ended_text
from trimix.decoding.text import encode_rows, is_token_ids
from trimix.errors import TrimixError
from trimix.fusion import Fusion
from trimix.fusion.methods import get_method

if TYPE_CHECKING:
    from trimix.decoding.fused import FusedLM

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class RowRequest:
    """One row to decode.

    Attributes:
        prompt: a completion prompt, chat messages (each source renders them: ``FusedLM.render``), or
            token ids of the fused vocabulary (every source reads them as they are).
        generation: the row's own settings (token budget, stops, sampling, end of sequence, inspection).
        key: the row's sampling key (:func:`~trimix.decoding.sampling.row_keys`).
        fusion: the row's fusion over the scheduler's sources (None: the scheduler model's).
        scores: attach the fused scores of each of its tokens to the steps (for log-probabilities).
        tag: anything the caller wants back (the server's request handle).
    """

    prompt: str | Messages | list[int]
    generation: GenerationConfig
    key: int
    fusion: Fusion | None = None
    scores: bool = False
    tag: Any = None


@dataclass
class _Group:
    lm: FusedLM
    checker: StopChecker
    waiting: deque[tuple[int, RowRequest]] = field(default_factory=deque)
    runner: Runner | None = None
    rows: dict[int, RowRequest] = field(default_factory=dict)  # sequence id -> request, while it runs


class Scheduler:
    """Admit rows, run one fused step per group per call, end rows through the stop checker.

    Args:
        lm: the fused model (its pool holds every source a row's fusion may weight).
        engine: engine settings (``engine``, ``compile``, ``speculative``): the run's, or a call's.
        max_batch: most rows decoding at once, over all groups.
        continuous: let rows join a running eager batch (serving); False: a group takes new rows only
            between batches (``generate``: batches of ``batch_size`` prompts, as encoded together).
        texts: attach each row's text after the step (``Step.texts``) for streaming deltas.
        fail_fast: raise an admission error (``generate``); False: report it for the rows it concerns
            (``Step.failed``) and go on (serving).
    """

    def __init__(
        self,
        lm: FusedLM,
        engine: GenerationConfig,
        *,
        max_batch: int,
        continuous: bool = False,
        texts: bool = False,
        fail_fast: bool = True,
    ) -> None:
        self.lm, self.engine = lm, engine
        self.max_batch, self.continuous = max_batch, continuous
        self.texts, self.fail_fast = texts, fail_fast
        self.runner_kind = self._runner_kind()
        self.groups: dict[tuple, _Group] = {}
        self._ids = itertools.count()
        self._ended: list[tuple[_Group, int]] = []  # rows that ended last step: released at the next

    # ---------------------------------------------------------------- requests
    def submit(self, request: RowRequest) -> int:
        """Queue a row; return its sequence id (the ``rows`` of the steps that concern it)."""
        sequence = next(self._ids)
        key = self._group_key(request)
        group = self.groups.get(key)
        if group is None:
            lm = self.lm if request.fusion is None else self.lm.with_fusion(request.fusion)
            group = self.groups[key] = _Group(lm, StopChecker(lm.tokenizer))
        group.waiting.append((sequence, request))
        return sequence

    def cancel(self, sequence: int) -> None:
        """Forget a row, waiting or running (a client that went away); it gets no more steps."""
        for group in self.groups.values():
            group.waiting = deque(item for item in group.waiting if item[0] != sequence)
            if sequence in group.rows:
                _release(group, sequence)

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    @property
    def waiting(self) -> int:
        return sum(len(g.waiting) for g in self.groups.values())

    def busy(self) -> bool:
        return any(g.rows or g.waiting for g in self.groups.values())

    # ---------------------------------------------------------------- the step
    def step(self) -> list[Step]:
        """Admit what fits, then one step of every running group; the steps that came out."""
        return self.admit() + self.advance()

    def advance(self) -> list[Step]:
        """One step of every running group."""
        steps = []
        for key, group in list(self.groups.items()):
            if group.runner is not None:
                step = group.runner.step()
                if step is None:
                    group.runner = None
                else:
                    self._account(group, step)
                    steps.append(step)
            if group.runner is None and not group.waiting and not group.rows:
                del self.groups[key]
        return steps

    def _account(self, group: _Group, step: Step) -> None:
        if self.texts:
            step.texts = [group.checker.rows[row].text for row in step.rows]
        self._ended += [(group, row) for row, reason in zip(step.rows, step.finish, strict=True) if reason]

    def admit(self) -> list[Step]:
        """Start or join the waiting rows that fit (and release the rows that ended at the last step);
        steps for rows that end at once or were refused."""
        for group, sequence in self._ended:
            _release(group, sequence)
        self._ended = []
        steps = []
        room = self.max_batch - self.running
        for group in self.groups.values():
            if room <= 0 or not group.waiting:
                continue
            if group.runner is not None and not (self.continuous and group.runner.inserts):
                continue
            taken = [group.waiting.popleft() for _ in range(min(room, len(group.waiting)))]
            room -= len(taken)
            try:
                admission = self._prepare(group, taken)
            except TrimixError as exc:
                if self.fail_fast:
                    raise
                for sequence, _ in taken:
                    group.checker.rows.pop(sequence, None)
                steps.append(Step([], [], [], failed=[(sequence, exc) for sequence, _ in taken]))
                continue
            closed = [
                (s, r.finish_reason) for s in admission.rows if (r := group.checker.rows[s]).finish_reason
            ]
            if closed:  # rows the context leaves no room in end before decoding (the checker says why)
                steps.append(Step([], [], [], closed=closed))
                self._ended += [(group, s) for s, _ in closed]
            group.rows.update(taken)
            if group.runner is None:
                group.runner = self._start(group, admission)
            else:
                group.runner.insert(admission)
        return steps

    def _prepare(self, group: _Group, taken: Sequence[tuple[int, RowRequest]]) -> Admission:
        """Render and tokenise the rows for every source, give each its budget and stop settings."""
        lm = group.lm
        rendered = [
            dict.fromkeys(lm.roles, request.prompt)
            if is_token_ids(request.prompt)
            else lm.render(request.prompt)
            for _, request in taken
        ]
        encodings = [encode_rows(source, [r[source.role] for r in rendered]) for source in lm.sources]
        settings = [request.generation for _, request in taken]
        budgets = lm.token_budgets(
            encodings, [g.max_new_tokens for g in settings], [g.on_context_limit for g in settings]
        )
        for (sequence, _), gen, budget in zip(taken, settings, budgets, strict=True):
            group.checker.add_row(
                sequence,
                stops=gen.stop,
                max_new_tokens=gen.max_new_tokens,
                budget=budget,
                eos=[] if gen.ignore_eos else lm.eos_token_ids(gen),
            )
        weights = [
            request.fusion.vector(lm.roles) if request.fusion else lm.weight_vector() for _, request in taken
        ]
        return Admission(
            rows=[sequence for sequence, _ in taken],
            prompts=[request.prompt for _, request in taken],
            encodings=encodings,
            settings=settings,
            weights=torch.tensor(weights, dtype=torch.float32),
            keys=torch.tensor([request.key for _, request in taken], dtype=torch.long),
            scores=any(request.scores for _, request in taken),
            checker=group.checker,
        )

    def _start(self, group: _Group, admission: Admission) -> Runner:
        if self.runner_kind == "speculative":
            return SpeculativeRunner(group.lm, admission, self.engine)
        if self.runner_kind == "eager":
            return EagerRunner(group.lm, admission, compact=self.continuous)
        return StaticRunner(group.lm, admission, self.engine, graphs=self.runner_kind == "graphs")

    def _runner_kind(self) -> str:
        engine = self.lm.engine_for(self.engine)
        if self.engine.speculative is not None:
            if engine != "eager":
                logger.info("speculative fusion runs on the eager engine (engine %s was asked)", engine)
            return "speculative"
        return engine

    def _group_key(self, request: RowRequest) -> tuple:
        fusion = request.fusion or self.lm.fusion
        plaus = fusion.plausibility
        method = get_method(fusion.method)
        key: tuple = (
            fusion.roles,
            plaus.role if plaus else None,
            plaus.alpha if plaus else None,
            "linear" if method.linear else fusion.method,
        )
        if self.runner_kind != "eager":  # what a whole-batch runner's step bakes in
            gen = request.generation
            eos = () if gen.ignore_eos else tuple(gen.eos_token_ids or ())
            key += (sampling_key(gen), gen.ignore_eos, eos)
        return key


def _release(group: _Group, sequence: int) -> None:
    """Forget a row that ended or was cancelled (its runner drops it at its next step)."""
    group.rows.pop(sequence, None)
    group.checker.rows.pop(sequence, None)


def decode_prompts(
    lm: FusedLM, prompts: Sequence[str], gen: GenerationConfig, row_ids: Sequence[int] | None, deltas: bool
) -> Iterator[StreamEvent]:
    """The scheduler's steps as per-prompt events, behind ``FusedLM.stream`` and ``generate`` (which needs
    no text deltas: then rows are decoded to text only where stop strings need it, and once at their
    end). Prompts are admitted ``batch_size`` at a time, each batch encoded together."""
    keys = row_keys(gen.seed, list(range(len(prompts))) if row_ids is None else list(row_ids)).tolist()
    scheduler = Scheduler(lm, gen, max_batch=gen.batch_size, texts=deltas)
    index = {
        scheduler.submit(RowRequest(p, gen, key)): i
        for i, (p, key) in enumerate(zip(prompts, keys, strict=True))
    }
    rows = {i: RowText() for i in range(len(prompts))}
    shown = dict.fromkeys(rows, "")
    finals: dict[int, Generation] = {}
    while scheduler.busy():
        for step in scheduler.step():
            for sequence, reason in step.closed:
                i = index[sequence]
                rows[i].finish_reason = reason
                finals[i] = _finish(lm, prompts[i], rows[i], gen)
                yield StreamEvent(i, -1, "", True, reason, finals[i])
            for sequence, stats in (step.stats or {}).items():
                i = index[sequence]
                rows[i].stats = stats
                if i in finals:  # accounting comes once per batch, after a row may end
                    finals[i].stats = stats
            for j, (sequence, token, reason) in enumerate(
                zip(step.rows, step.tokens, step.finish, strict=True)
            ):
                i = index[sequence]
                row = rows[i]
                row.token_ids.append(token)
                row.finish_reason = reason
                if step.inspection is not None:
                    row.inspection.append(step.inspection[j])
                # While a row runs, its text is the stop checker's (grown incrementally); its last
                # event carries the whole decode, so the deltas add up to the final text exactly.
                final = None
                if reason is not None:
                    final = finals[i] = _finish(lm, prompts[i], row, gen)
                delta = ""
                if deltas:
                    text = final.text if final is not None else step.texts[j]
                    delta, shown[i] = emit_text(shown[i], text, reason is not None, gen.stop)
                yield StreamEvent(i, token, delta, reason is not None, reason, final)


def _finish(lm: FusedLM, prompt: str, row: RowText, gen: GenerationConfig) -> Generation:
    return Generation(
        prompt=prompt,
        text=ended_text(lm.tokenizer, row.token_ids, row.finish_reason, gen.stop),
        token_ids=list(row.token_ids),
        finish_reason=row.finish_reason,
        inspection=row.inspection if gen.inspect_top_k else None,
        stats=row.stats,
    )
