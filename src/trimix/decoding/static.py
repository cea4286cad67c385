"""Decoding on preallocated caches: one fused step in place on fixed buffers, replayed as a CUDA graph on GPUs.

:class:`FusedStep` is the whole decoding step — every source's one-token forward, the fusion, the
plausibility mask, the token choice and the end-of-sequence bookkeeping — written only with in-place
operations on tensors that keep their addresses. On a CPU (or with ``engine: static``) it runs as
plain Python; with ``engine: graphs`` it is captured once into a CUDA graph and replayed every step,
so the per-step cost is one graph launch instead of thousands of kernel launches and the host work
around them. Because both run the same function, the CPU tests of the static path check the logic
the GPU replays.

Finished rows are masked (they feed padding and their tokens are ignored), never removed, so a batch
keeps its shape and its graph. Stop strings and the length budget are checked on the host between
steps; end-of-sequence is checked in the step.

Graph policy: a :class:`GraphSession` is captured per (sources, batch-size bucket, cache capacity,
sampling settings) and kept in a small least-recently-used pool (``MAX_SESSIONS``) on the loaded
sources, so later ``generate`` calls on the same model reuse it (capture is paid once). Batch sizes
are padded to powers of two and capacities to multiples of ``CAPACITY_STEP`` columns; a session's
memory is its sources' KV caches (batch x capacity columns) plus the graph's own buffers.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trimix.backends.base import DecodeState, StaticCaches
from trimix.decoding.sampling import TokenChooser

logger = logging.getLogger(__name__)

CAPACITY_STEP = 256
MAX_SESSIONS = 4


def bucket_size(batch: int) -> int:
    """The batch a graph is captured for: the next power of two."""
    return 1 << max(0, (batch - 1).bit_length())


def bucket_capacity(columns: int) -> int:
    return -(-columns // CAPACITY_STEP) * CAPACITY_STEP


class FusedStep:
    """The fused decoding step on preallocated states, in place.

    Args:
        backends: one backend per fused source.
        states: their preallocated states (same batch size).
        fuse: the fusion (``FusedLM.fuse``): per-source logits and ``(B, S)`` weights to the scores the
            token is chosen from (the method's combination and the plausibility mask).
        chooser: greedy or sampling.
        eos_ids: ``(E,)`` end-of-sequence ids on the fusion device.
        pad_id: the token finished rows feed.
        compiled: run each source's decoder through ``torch.compile`` (see ``generation.compile``).
    """

    def __init__(
        self,
        backends: Sequence[StaticCaches],
        states: Sequence[DecodeState],
        fuse: Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor],
        chooser: TokenChooser,
        eos_ids: torch.Tensor,
        pad_id: int,
        compiled: bool = False,
    ) -> None:
        self.backends, self.states = list(backends), list(states)
        self.compiled, self.fuse = compiled, fuse
        self.chooser = chooser
        device = eos_ids.device
        batch = states[0].batch_size
        self.eos_ids = eos_ids
        self.pad = torch.full((batch,), pad_id, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # fed to the next step
        self.chosen = torch.zeros(batch, dtype=torch.long, device=device)  # read by the host
        self.counters = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.keys = torch.zeros(batch, dtype=torch.long, device=device)
        self.weights = torch.zeros(batch, len(self.backends), dtype=torch.float32, device=device)
        self.source_logits: list[torch.Tensor] = []
        self.scores: torch.Tensor | None = None

    def choose(self, logits: Sequence[torch.Tensor]) -> None:
        """Fuse, constrain and choose from per-source logits ``(B, R_i)``; update the step's buffers."""
        device = self.chosen.device
        logits = [x.to(device) for x in logits]
        scores = self.fuse(logits, self.weights)
        chosen = torch.where(self.finished, self.pad, self.chooser(scores, self.keys, self.counters))
        self.finished |= torch.isin(chosen, self.eos_ids)
        self.chosen.copy_(chosen)
        self.tokens.copy_(chosen[:, None])
        self.counters.add_(1)
        self.source_logits, self.scores = logits, scores

    def __call__(self) -> None:
        self.choose(
            [
                b.step_in_place(s, self.tokens, self.compiled)[:, -1]
                for b, s in zip(self.backends, self.states, strict=True)
            ]
        )


@dataclass
class Batch:
    """A left-padded batch for every source: ids and masks ``(B, L_i)``."""

    input_ids: list[torch.Tensor]
    attention_mask: list[torch.Tensor]


class GraphSession:
    """Preallocated states and one :class:`FusedStep` for a batch bucket, optionally captured as a CUDA graph.

    ``load`` prefills a new batch into the same buffers (so a captured graph stays valid), ``step``
    runs (or replays) one fused step.
    """

    def __init__(
        self,
        backends: Sequence[StaticCaches],
        batch: int,
        capacity: int,
        make_step: callable,
        use_graph: bool,
    ) -> None:
        self.backends = list(backends)
        self.batch, self.capacity = batch, capacity
        self.use_graph = use_graph
        self.states: list[DecodeState] | None = None
        self.make_step = make_step
        self.step_fn: FusedStep | None = None
        self.cursors: list[torch.Tensor] = []  # each state's write column, owned here (graph inputs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0

    @torch.inference_mode()
    def load(self, batch: Batch, keys: torch.Tensor, weights: torch.Tensor, live: int) -> None:
        """Prefill ``batch`` (rows beyond ``live`` are padding) and choose every row's first token."""
        logits, first = [], self.states is None
        states = [None] * len(self.backends) if first else self.states
        for i, backend in enumerate(self.backends):
            last, state = backend.prefill(
                batch.input_ids[i], batch.attention_mask[i], self.capacity, into=states[i]
            )
            logits.append(last)
            if first:
                self.cursors.append(torch.zeros(1, dtype=torch.long, device=backend.device))
                states[i] = state
            backend.attach_cursor(state, self.cursors[i])
        self.states = states
        if self.step_fn is None:
            self.step_fn = self.make_step(self.backends, self.states)
        step = self.step_fn
        step.keys.copy_(keys)
        step.weights.copy_(weights)
        step.counters.zero_()
        step.finished.zero_()
        step.finished[live:] = True
        step.choose(logits)

    @torch.inference_mode()
    def step(self) -> None:
        if not self.use_graph:
            self.step_fn()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        for backend, state in zip(self.backends, self.states, strict=True):
            backend.stepped(state, 1)

    def _capture(self) -> None:
        """Warm up on a side stream, restore every buffer the warm-up advanced, then capture one step."""
        start = time.perf_counter()
        step = self.step_fn
        saved = [b.snapshot(s) for b, s in zip(self.backends, self.states, strict=True)]
        small = [t.clone() for t in (step.tokens, step.chosen, step.counters, step.finished)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(saved, small)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        self._restore(saved, small)  # capture does not run kernels, but keep it obviously clean
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured a CUDA graph of the fused step (batch %d, %d cache columns) in %.2fs",
            self.batch,
            self.capacity,
            self.capture_seconds,
        )

    def _restore(self, saved: list[object], small: list[torch.Tensor]) -> None:
        step = self.step_fn
        for backend, state, snapshot in zip(self.backends, self.states, saved, strict=True):
            backend.restore(state, snapshot)
        for target, value in zip(
            (step.tokens, step.chosen, step.counters, step.finished), small, strict=True
        ):
            target.copy_(value)


class SessionPool:
    """Keeps the most recently used :class:`GraphSession` objects, keyed by what their graph depends on."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self.sessions: OrderedDict[tuple, GraphSession] = OrderedDict()

    def get(self, key: tuple, create: callable) -> tuple[GraphSession, bool]:
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key], False
        session = create()
        self.sessions[key] = session
        while len(self.sessions) > self.limit:
            self.sessions.popitem(last=False)
        return session, True
