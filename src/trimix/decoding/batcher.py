"""Serving on the decoding core: requests join a running batch at a step boundary and leave when done.

A :class:`ContinuousBatcher` owns one background thread that drives a
:class:`~trimix.decoding.scheduler.Scheduler` (the same one ``generate`` and ``stream`` drive) for every
submitted request, and turns its steps into each request's events. Each request may carry its own
fusion (weights, plausibility) and sampling settings; the scheduler groups rows by what one fused step
can share (rows of a linear method share a batch, each with its own weights). On the eager engine a
request joins the running batch between two steps; on the static / graphs engines and with speculative
fusion it starts with the next batch (see the scheduler). A request's greedy output does not depend on
what else is in the batch, and its sampled output depends only on its own seed.

The HTTP server only translates requests and events.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trimix.config import GenerationConfig
from trimix.decoding.fused import FusedLM
from trimix.decoding.likelihood import prompt_logprobs
from trimix.decoding.results import Step, TokenInspection
from trimix.decoding.sampling import row_keys
from trimix.decoding.scheduler import RowRequest, Scheduler
from trimix.decoding.stopping import FinishReason, emit_text
from trimix.decoding.text import encode_texts, is_token_ids
from trimix.errors import DataError, TrimixError
from trimix.fusion import Fusion

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Prompt = str | Messages | list[int]  # text, chat messages, or token ids of the fused vocabulary


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

    prompt: Prompt
    generation: GenerationConfig
    fusion: Fusion
    logprobs: int | None = None
    inspect: int = 0
    key: int = 0
    prompt_tokens: int | None = None
    echo: bool = False
    max_tokens: int | None = None  # 0: score the prompt (echo) and generate nothing


@dataclass
class PromptEcho:
    """A request's prompt sent back before its completion (``echo``): its text, and with ``logprobs`` each
    token's log-probability under the fused model (the first ``None``) and the top alternatives."""

    text: str
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[str, float]] | None] = field(default_factory=list)


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

    notify: Callable[[], None] | None = None  # called after each event (thread-safe: the server's loop)

    def put(self, event: Any) -> None:
        """Hand the submitter an event (a :class:`PromptEcho`, a :class:`TokenEvent` or an exception)."""
        self.events.put(event)
        if self.notify is not None:
            self.notify()

    def cancel(self) -> None:
        self.cancelled.set()


class ContinuousBatcher:
    """Decode submitted requests in a background thread, batching concurrent ones.

    Args:
        lm: the fused model (its pool must hold every source a request may weight); its run's
            ``generation`` section chooses the engine (and speculative fusion).
        max_batch: most rows decoded at once (over all groups); more requests wait.
        max_queue: most waiting requests; beyond it :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, lm: FusedLM, max_batch: int = 32, max_queue: int = 256) -> None:
        self.lm = lm
        self.max_batch, self.max_queue = max_batch, max_queue
        self.arrivals: queue.Queue[RequestHandle] = queue.Queue()
        self.scheduler = self._scheduler()
        self.handles: dict[int, RequestHandle] = {}  # sequence id -> handle, while it is scheduled
        self.shown: dict[int, str] = {}  # sequence id -> the text its events have carried
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.stats = {"requests": 0, "tokens": 0, "finished": 0, "cancelled": 0, "started": time.time()}
        # Where the batcher's time goes: admitting (prefilling arrivals and inserting them into the running
        # caches) and decode steps (one fused step of every group, including dropping finished rows).
        self.timing = {"admissions": 0, "admitted": 0, "admit_seconds": 0.0, "steps": 0, "step_seconds": 0.0}
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of recent steps, for tokens/s

    def _scheduler(self) -> Scheduler:
        return Scheduler(
            self.lm,
            self.lm.generation,
            max_batch=self.max_batch,
            continuous=True,
            texts=True,
            fail_fast=False,
        )

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
        if self.queued >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        handle = RequestHandle(request)
        handle.prompt_tokens = (
            request.prompt_tokens if request.prompt_tokens is not None else self.prompt_lengths(request)[0]
        )
        self.stats["requests"] += 1
        self.arrivals.put(handle)
        self.wake.set()
        return handle

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def queued(self) -> int:
        """Requests waiting to start decoding."""
        return self.arrivals.qsize() + self.scheduler.waiting

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self.recent if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    def prompt_lengths(self, request: ServeRequest) -> list[int]:
        """The prompt's length in tokens under each fused source, as that source reads it (rendered for
        its prompt format), in the fusion's source order."""
        lm = self.lm.with_fusion(request.fusion)
        if is_token_ids(request.prompt):
            return [len(request.prompt)] * len(lm.sources)
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
                self._schedule_arrivals()
                if not self.scheduler.busy():
                    self.wake.wait(timeout=0.05)
                    self.wake.clear()
                    continue
                start = time.perf_counter()
                steps = self.scheduler.admit()
                self.timing["admit_seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                advanced = self.scheduler.advance()
                if advanced:
                    self.timing["steps"] += 1
                    self.timing["step_seconds"] += time.perf_counter() - start
                for step in steps + advanced:
                    self._deliver(step)
            except Exception as exc:  # a bug must not hang every client: fail the requests in flight
                logger.exception("the batcher failed; ending the requests in flight")
                for handle in self.handles.values():
                    handle.put(exc)
                self.handles.clear()
                self.scheduler = self._scheduler()

    def _schedule_arrivals(self) -> None:
        """Hand new requests to the scheduler; forget the ones whose client went away."""
        arrived = 0
        while True:
            try:
                handle = self.arrivals.get_nowait()
            except queue.Empty:
                break
            if handle.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            request = handle.request
            if request.echo:
                handle.put(self._echo(request))
            if request.max_tokens == 0:  # scoring only: the prompt's log-probabilities, no token
                handle.put(TokenEvent(-1, "", finish_reason="length"))
                self.stats["finished"] += 1
                continue
            generation = request.generation.model_copy(
                update={"inspect_top_k": request.inspect, "on_context_limit": "stop"}
            )
            sequence = self.scheduler.submit(
                RowRequest(
                    request.prompt,
                    generation,
                    request.key,
                    fusion=request.fusion,
                    scores=request.logprobs is not None,
                    tag=handle,
                )
            )
            self.handles[sequence], self.shown[sequence] = handle, ""
            arrived += 1
        if arrived:
            self.timing["admissions"] += 1
            self.timing["admitted"] += arrived
        for sequence, handle in list(self.handles.items()):
            if handle.cancelled.is_set():
                self.scheduler.cancel(sequence)
                self._forget(sequence)
                self.stats["cancelled"] += 1

    def _echo(self, request: ServeRequest) -> PromptEcho:
        """The prompt as text and, with ``logprobs``, as scored tokens (every source reads the same ids:
        the given token ids, or the first fused source's encoding of the prompt)."""
        lm = self.lm.with_fusion(request.fusion)
        prompt, source = request.prompt, lm.sources[0]
        rendered = None if is_token_ids(prompt) else lm.render(prompt)[source.role]
        if rendered is None:
            text = lm.tokenizer.decode(prompt)
        else:
            text = prompt if isinstance(prompt, str) else rendered
        echo = PromptEcho(text)
        if request.logprobs is not None:  # the tokens are needed only to score them
            ids = (
                list(prompt)
                if rendered is None
                else encode_texts(source, [rendered])["input_ids"][0].tolist()
            )
            echo.tokens = [lm.token_text(t) for t in ids]
            scored = prompt_logprobs(lm, ids, request.logprobs)
            echo.logprobs = [None] + [lp for lp, _ in scored]
            echo.top_logprobs = [None] + [[(lm.token_text(t), v) for t, v in top] for _, top in scored]
        return echo

    def _forget(self, sequence: int) -> None:
        self.handles.pop(sequence, None)
        self.shown.pop(sequence, None)

    def _deliver(self, step: Step) -> None:
        """A scheduler step as events on the handles it concerns."""
        for sequence, exc in step.failed:
            if sequence in self.handles:
                self.handles[sequence].put(exc)
                self._forget(sequence)
        for sequence, reason in step.closed:
            if sequence in self.handles:
                self.handles[sequence].put(TokenEvent(-1, "", finish_reason=reason))
                self.stats["finished"] += 1
                self._forget(sequence)
        if not step.rows:
            return
        logp = torch.log_softmax(step.scores, dim=-1) if step.scores is not None else None
        for j, (sequence, token, reason) in enumerate(zip(step.rows, step.tokens, step.finish, strict=True)):
            handle = self.handles.get(sequence)
            if handle is None:  # cancelled after its step was computed
                continue
            request = handle.request
            delta, self.shown[sequence] = emit_text(
                self.shown[sequence], step.texts[j], reason is not None, request.generation.stop
            )
            event = TokenEvent(
                token,
                delta,
                finish_reason=reason,
                inspection=step.inspection[j] if request.inspect and step.inspection else None,
            )
            if logp is not None and request.logprobs is not None:
                event.logprob = float(logp[j, token])
                if request.logprobs:
                    values, ids = logp[j].topk(request.logprobs)
                    event.top_logprobs = [
                        (self.lm.token_text(int(t)), float(v)) for v, t in zip(values, ids, strict=True)
                    ]
            handle.put(event)
            if reason is not None:
                self.stats["finished"] += 1
                self._forget(sequence)
        self.stats["tokens"] += len(step.rows)
        self.recent = [*self.recent[-200:], (time.perf_counter(), len(step.rows))]


def request_key(seed: int | None, index: int = 0) -> int:
    """A request's sampling key: from its seed (and its index among ``n`` choices); unseeded: a fresh one."""
    if seed is None:
        seed = time.time_ns()
    return int(row_keys(seed, [index])[0])


@functools.cache
def longest_token(tokenizer: Any) -> int:
    """A bound on the characters one token of ``tokenizer`` decodes to, so a text of n characters takes at
    least n / this many tokens: the longest vocabulary entry as written (byte-level BPE spells each byte
    of a character as one symbol, SentencePiece a space as ``▁`` and a byte as ``<0xNN>``, so an entry is
    never shorter than its text). Computed once per tokenizer."""
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1)


def check_prompt(batcher: ContinuousBatcher, request: ServeRequest) -> int:
    """Refuse a prompt that leaves no room for generation within every source's context; return its
    length under the first fused source (what ``usage`` reports)."""
    sources = batcher.lm.with_fusion(request.fusion).sources
    if not is_token_ids(request.prompt):  # far too long for any tokenisation: refused without tokenising
        chars = (
            len(request.prompt)
            if isinstance(request.prompt, str)
            else sum(len(m["content"]) for m in request.prompt)
        )
        for source in sources:
            limit, widest = source.max_positions, longest_token(source.tokenizer)
            if limit is not None and chars > limit * widest:
                raise DataError(
                    f"the prompt has {chars:,} characters; source {source.role!r} reads at most {limit} tokens "
                    f"(its context) of at most {widest} characters each. Shorten the prompt"
                )
    lengths = batcher.prompt_lengths(request)
    for source, length in zip(sources, lengths, strict=True):
        limit = source.max_positions
        if limit is not None and length + 1 > limit:
            raise DataError(
                f"the prompt has {length} tokens; source {source.role!r} reads at most {limit} "
                "(its context). Shorten the prompt"
            )
    return lengths[0]
