"""Continuous batching for serving: requests join a running batch at a step boundary and leave when done.

A :class:`ContinuousBatcher` owns one background thread that decodes for every submitted request. Each
request may carry its own fusion (weights, plausibility) and sampling settings. Requests are grouped by
the sources their fusion runs and its plausibility rule; within a group every row carries its own
weights (:func:`~trimix.fusion.fuse_rows`), so a request that weights the same sources differently
shares the batch. A request that needs another set of sources decodes in its own group (the common
case, every request at the run's fusion, is one batch). New requests are prefilled together and
inserted into their group's caches between two steps (the backend's ``insert_rows``); finished or
cancelled rows are removed (``keep_rows``). Because trimix's attention masks are per row, a request's
greedy output does not depend on what else is in the batch, and its sampled output depends only on its
own seed.

Everything model-side goes through :class:`~trimix.FusedLM`'s pool and the sources' backends; the HTTP
server only translates requests and events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from trimix.config import GenerationConfig
from trimix.decoding.fused import FusedLM
from trimix.decoding.results import TokenInspection
from trimix.decoding.sampling import choose_rows, row_keys
from trimix.decoding.stopping import FinishReason, StopChecker, emit_text
from trimix.decoding.text import encode_texts
from trimix.errors import DataError, TrimixError
from trimix.fusion import Fusion, fused_scores
from trimix.fusion.methods import get_method

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class QueueFull(TrimixError):
    """The server's queue of waiting requests is full (HTTP 429)."""


@dataclass
class ServeRequest:
    """One completion to decode.

    Attributes:
        prompt: a completion prompt, or chat messages (each source formats them: see ``FusedLM.render``).
        generation: max_new_tokens, sampling (do_sample, temperature, top_k, top_p), seed, stop.
        fusion: the request's fusion (weights and plausibility) over the loaded sources.
        logprobs: return the log-probabilities of the chosen token and this many top alternatives
            (of the fused distribution after the plausibility mask, before temperature); None: none.
        inspect: attach each source's top-k candidates and the margin shares to every token.
        key: the row's sampling key (from the request's seed).
        prompt_tokens: the prompt's length under the first fused source (for ``usage``), when already
            measured by :func:`check_prompt`; None: measured at submission.
    """

    prompt: str | Messages
    generation: GenerationConfig
    fusion: Fusion
    logprobs: int | None = None
    inspect: int = 0
    key: int = 0
    prompt_tokens: int | None = None


@dataclass
class TokenEvent:
    """One generated token of a request, or its end (``finish_reason`` set)."""

    token_id: int
    text: str  # the new text this token adds
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    finish_reason: FinishReason | None = None
    inspection: TokenInspection | None = None


@dataclass
class RequestHandle:
    """What a submitter holds: the events of its request, and a way to cancel it."""

    request: ServeRequest
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    handle: RequestHandle
    weights: list[float]
    key: int
    sequence: int  # the row's id in its group's stop checker (which holds its tokens and text)
    shown: str = ""


@dataclass
class _Group:
    """Rows decoded together: the same sources and plausibility rule, each row its own weights."""

    lm: FusedLM
    stops: StopChecker
    rows: list[_Row] = field(default_factory=list)
    states: list[Any] | None = None
    logits: list[torch.Tensor] | None = None  # each source's next-token logits (B, R_i)


class ContinuousBatcher:
    """Decode submitted requests in a background thread, batching concurrent ones.

    Args:
        lm: the fused model (its pool must hold every source a request may weight).
        max_batch: most rows decoded at once (over all groups); more requests wait.
        max_queue: most waiting requests; beyond it :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, lm: FusedLM, max_batch: int = 32, max_queue: int = 256) -> None:
        self.lm = lm
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: queue.Queue[RequestHandle] = queue.Queue()
        self.groups: dict[tuple, _Group] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.stats = {"requests": 0, "tokens": 0, "finished": 0, "cancelled": 0, "started": time.time()}
        # Where the batcher's time goes: admitting (prefilling arrivals and inserting them into the running
        # caches) and decode steps (one fused step of a group, including dropping its finished rows).
        self.timing = {"admissions": 0, "admitted": 0, "admit_seconds": 0.0, "steps": 0, "step_seconds": 0.0}
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of recent steps, for tokens/s
        self.sequences = 0  # ids given to rows (their key in a group's stop checker)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> ContinuousBatcher:
        self.thread = threading.Thread(target=self._loop, name="trimix-batcher", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, request: ServeRequest) -> RequestHandle:
        """Queue a request; its events arrive on the returned handle."""
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        handle = RequestHandle(request)
        handle.prompt_tokens = (
            request.prompt_tokens if request.prompt_tokens is not None else self.prompt_lengths(request)[0]
        )
        self.stats["requests"] += 1
        self.waiting.put(handle)
        self.wake.set()
        return handle

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self.recent if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    def prompt_lengths(self, request: ServeRequest) -> list[int]:
        """The prompt's length in tokens under each fused source, as that source reads it (rendered for
        its prompt format), in the fusion's source order."""
        lm = self.lm.with_fusion(request.fusion)
        rendered = lm.render(request.prompt)
        return [
            int(encode_texts(source, [rendered[source.role]])["attention_mask"].sum())
            for source in lm.sources
        ]

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopping.is_set():
            try:
                start = time.perf_counter()
                admitted = self._admit()
                if admitted:
                    self.timing["admissions"] += 1
                    self.timing["admitted"] += admitted
                    self.timing["admit_seconds"] += time.perf_counter() - start
                stepped = False
                for key, group in list(self.groups.items()):
                    if group.rows:
                        start = time.perf_counter()
                        self._step(group)
                        self.timing["steps"] += 1
                        self.timing["step_seconds"] += time.perf_counter() - start
                        stepped = True
                    if not group.rows:
                        del self.groups[key]
                if not (admitted or stepped):
                    self.wake.wait(timeout=0.05)
                    self.wake.clear()
            except Exception as exc:  # a bug must not hang every client: fail the requests in flight
                logger.exception("the batcher failed; ending the requests in flight")
                for group in self.groups.values():
                    for row in group.rows:
                        row.handle.events.put(exc)
                self.groups.clear()

    def _admit(self) -> int:
        """Prefill waiting requests (as many as fit) and insert them into their groups; how many joined."""
        room = self.max_batch - self.running
        new: dict[tuple, list[RequestHandle]] = {}
        while room > 0:
            try:
                handle = self.waiting.get_nowait()
            except queue.Empty:
                break
            if handle.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            fusion = handle.request.fusion
            plaus = fusion.plausibility
            method = get_method(fusion.method)  # rows of linear methods share a batch, each its own weights
            key = (
                fusion.roles,
                plaus.role if plaus else None,
                plaus.alpha if plaus else None,
                "linear" if method.linear else fusion.method,
            )
            new.setdefault(key, []).append(handle)
            room -= 1
        for key, handles in new.items():
            group = self.groups.get(key)
            if group is None:
                lm = self.lm.with_fusion(handles[0].request.fusion)
                group = self.groups[key] = _Group(lm, StopChecker(lm.tokenizer))
            try:
                self._insert(group, handles)
            except TrimixError as exc:
                for handle in handles:
                    handle.events.put(exc)
        return sum(len(handles) for handles in new.values())

    def _insert(self, group: _Group, handles: list[RequestHandle]) -> None:
        lm = group.lm
        rendered = [lm.render(h.request.prompt) for h in handles]
        encodings = [encode_texts(source, [r[source.role] for r in rendered]) for source in lm.sources]
        logits, states = [], []
        for source, enc in zip(lm.sources, encodings, strict=True):
            last, state = source.backend.prefill(enc["input_ids"], enc["attention_mask"])
            logits.append(last)
            states.append(state)
        # The same rule as generate's: a row stops where the first source's context ends ("stop": requests
        # that cannot fit at all were refused with a 400 by check_prompt).
        budgets = lm.token_budgets(encodings, [h.request.generation.max_new_tokens for h in handles], "stop")
        rows = []
        for handle, budget in zip(handles, budgets, strict=True):
            gen = handle.request.generation
            self.sequences += 1
            group.stops.add_row(
                self.sequences,
                stops=gen.stop,
                max_new_tokens=gen.max_new_tokens,
                budget=budget,
                eos=[] if gen.ignore_eos else lm.eos_token_ids(gen),
            )
            rows.append(
                _Row(handle, handle.request.fusion.vector(lm.roles), handle.request.key, self.sequences)
            )
        if group.states is None:
            group.states, group.logits = states, logits
        else:
            for source, mine, theirs in zip(lm.sources, group.states, states, strict=True):
                source.backend.insert_rows(mine, theirs)
            group.logits = [torch.cat([a, b.to(a.device)]) for a, b in zip(group.logits, logits, strict=True)]
        group.rows += rows

    def _step(self, group: _Group) -> None:
        lm = group.lm
        device = lm.fusion_device
        weights = torch.tensor([r.weights for r in group.rows], dtype=torch.float32, device=device)
        source_logits = [x.to(device) for x in group.logits]
        scores = fused_scores(
            source_logits, weights, lm.vocab_size, lm.plausibility_index, lm.plausibility_alpha, lm.combine
        )
        keys = torch.tensor([r.key for r in group.rows], dtype=torch.long, device=device)
        counters = torch.tensor(
            [len(group.stops.tokens(r.sequence)) for r in group.rows], dtype=torch.long, device=device
        )
        tokens = choose_rows(scores, [r.handle.request.generation for r in group.rows], keys, counters)
        wanted = [r.handle.request.logprobs for r in group.rows]
        logp = torch.log_softmax(scores, dim=-1) if any(w is not None for w in wanted) else None
        inspect_k = max(r.handle.request.inspect for r in group.rows)
        inspection = (
            lm.inspect_step(source_logits, scores, tokens, inspect_k, weights)
            if inspect_k
            else [None] * len(tokens)
        )
        keep = []
        for i, (row, token) in enumerate(zip(group.rows, tokens.tolist(), strict=True)):
            if row.handle.cancelled.is_set():
                self.stats["cancelled"] += 1
                group.stops.remove(row.sequence)
                continue
            gen = row.handle.request.generation
            reason = group.stops.add(row.sequence, token)
            text = group.stops.rows[row.sequence].text  # grown incrementally: no whole-row decode per step
            delta, row.shown = emit_text(row.shown, text, reason is not None, gen.stop)
            event = TokenEvent(
                token,
                delta,
                finish_reason=reason,
                inspection=inspection[i] if row.handle.request.inspect else None,
            )
            if logp is not None and wanted[i] is not None:
                event.logprob = float(logp[i, token])
                if wanted[i]:
                    values, ids = logp[i].topk(wanted[i])
                    event.top_logprobs = [
                        (lm.token_text(int(t)), float(v)) for v, t in zip(values, ids, strict=True)
                    ]
            row.handle.events.put(event)
            if reason is None:
                keep.append(i)
            else:
                self.stats["finished"] += 1
                group.stops.remove(row.sequence)
        self.stats["tokens"] += len(group.rows)
        self.recent = [*self.recent[-200:], (time.perf_counter(), len(group.rows))]
        if len(keep) < len(group.rows):
            rows = torch.tensor(keep, dtype=torch.long)
            for source, state in zip(lm.sources, group.states, strict=True):
                source.backend.keep_rows(state, rows)
                source.backend.compact(state)
            tokens = tokens[rows.to(tokens.device)]
            group.rows = [group.rows[i] for i in keep]
        if not group.rows:
            group.states = group.logits = None
            return
        group.logits = [
            source.backend.advance(state, tokens[:, None])[:, -1]
            for source, state in zip(lm.sources, group.states, strict=True)
        ]


def request_key(seed: int | None, index: int = 0) -> int:
    """A request's sampling key: from its seed (and its index among ``n`` choices); unseeded: a fresh one."""
    if seed is None:
        seed = time.time_ns()
    return int(row_keys(seed, [index])[0])


def check_prompt(batcher: ContinuousBatcher, request: ServeRequest) -> int:
    """Refuse a prompt that leaves no room for generation within every source's context; return its
    length under the first fused source (what ``usage`` reports)."""
    lengths = batcher.prompt_lengths(request)
    for source, length in zip(batcher.lm.with_fusion(request.fusion).sources, lengths, strict=True):
        limit = source.max_positions
        if limit is not None and length + 1 > limit:
            raise DataError(
                f"the prompt has {length} tokens; source {source.role!r} reads at most {limit} "
                "(its context). Shorten the prompt"
            )
    return lengths[0]
