"""The seam between trimix and one causal LM: what decoding, scoring and serving ask of a source.

Everything above this interface (the decoding core, the weight search, the server) talks to a source
through these calls and touches no model internals; only :mod:`trimix.backends.hf` knows Hugging Face
models. :class:`~trimix.backends.recompute.RecomputeBackend` implements the core alone, and the decoding
core runs on it.

The decoding core's runners address rows by sequence id through
:class:`~trimix.backends.sequences.SequenceBatch` (start, step, roll back, release); this module is what
a backend implements beneath it.

**The core** (:class:`SourceBackend`). States are per batch: a left-padded prompt batch is prefilled
into a state, which then advances by ``k >= 1`` tokens per row at a time, can be cropped back per row
(rows keep different numbers of tokens, as speculative decoding needs), can drop rows that finished, and
can take in new rows (continuous batching). A state's rows decode exactly as each row alone would.

**Optional capabilities**, declared in a backend's ``capabilities`` set and used only where declared:

* ``"hidden"`` (:class:`HiddenStates`): final hidden states instead of logits, the output head applied
  separately (``head_logits``, ``restricted_head``). The weight search scores many weight vectors from
  one forward with them; without it the search keeps the logits of the scored positions (more memory,
  same numbers). Speculative fusion's draft vocabulary needs a drafter that has it.
* ``"fork"`` (:class:`Forks`): copy a state's rows (``fork``), so texts that share a prefix (a prompt's
  instructions, one context under several continuations) run it once and continue from its cache.
* ``"selected"`` (:class:`SelectedLogits`): ``advance_selected`` computes the logits of the positions
  a caller reads and no others (a scorer reads a few positions of a long context); without it
  :func:`advance_selected` takes them from ``advance``.
* ``"static"`` (:class:`StaticCaches`): preallocated caches and a step that keeps every tensor's
  address, which the static engine runs and the graphs engine captures as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

HIDDEN, STATIC, FORK, SELECTED = "hidden", "static", "fork", "selected"


@runtime_checkable
class DecodeState(Protocol):
    """One batch's cache and bookkeeping, opaque to callers except for these fields."""

    @property
    def batch_size(self) -> int: ...

    @property
    def next_position(self) -> torch.Tensor:
        """``(B,)`` tokens each row holds (prompt and generated), i.e. the position of its next token."""
        ...


@runtime_checkable
class SourceBackend(Protocol):
    """One causal LM and its tokenizer behind the calls the decoding core makes."""

    tokenizer: Any

    @property
    def logit_rows(self) -> int:
        """Logits per position (may exceed the tokenizer's vocabulary: padded rows)."""
        ...

    @property
    def max_positions(self) -> int | None:
        """The context length, when the model states one."""
        ...

    @property
    def device(self) -> torch.device:
        """Where input ids go."""
        ...

    @property
    def eos_token_ids(self) -> list[int]:
        """The model's own end-of-sequence ids (a run's ``eos_token_ids`` overrides them)."""
        ...

    @property
    def num_parameters(self) -> int:
        """Its size (to choose a drafter among equally weighted sources); 0 when unknown."""
        ...

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run a left-padded batch ``(B, L)``; return the next-token logits ``(B, R)`` and the state."""
        ...

    def advance(
        self, state: DecodeState, tokens: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed ``(B, k)`` tokens to every row (``valid`` ``(B, k)``: right padding, rows fed fewer);
        return the logits after each, ``(B, k, R)``."""
        ...

    def crop(self, state: DecodeState, lengths: torch.Tensor) -> None:
        """Keep the first ``lengths[b]`` tokens of row b (drop rejected draft positions), exactly."""
        ...

    def keep_rows(self, state: DecodeState, rows: torch.Tensor) -> None:
        """Keep only the given rows, in that order."""
        ...

    def insert_rows(self, state: DecodeState, new: DecodeState) -> None:
        """Append the rows of another state of this backend (e.g. a freshly prefilled request)."""
        ...

    def compact(self, state: DecodeState) -> None:
        """Release cache space that no remaining row uses (after rows left a long-lived batch)."""
        ...


class HiddenStates(Protocol):
    """Capability ``"hidden"``: hidden states and the output head apart (see the module docstring)."""

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capacity: int | None = None,
        *,
        hidden: bool = False,
    ) -> tuple[torch.Tensor, DecodeState]:
        """With ``hidden``: every position's final hidden states ``(B, L, H)`` instead of the logits."""
        ...

    def advance(
        self,
        state: DecodeState,
        tokens: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        hidden: bool = False,
    ) -> torch.Tensor: ...

    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output-head logits of final hidden states ``(..., H)``; with ``out`` ``(..., V)`` only the first V."""
        ...

    def restricted_head(self, ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A head over the rows ``ids`` only: maps hidden states ``(..., H)`` to ``(..., len(ids))``, equal
        to ``head_logits(hidden)[..., ids]`` (the rows are copied once, when this is called)."""
        ...


class Forks(Protocol):
    """Capability ``"fork"``."""

    def fork(self, state: DecodeState, repeats: int) -> DecodeState:
        """A new state with every row repeated ``repeats`` times (``[r0, r0, r1, r1, ...]``); ``state``
        is unchanged and both go on independently."""
        ...


class SelectedLogits(Protocol):
    """Capability ``"selected"``."""

    def advance_selected(
        self, state: DecodeState, tokens: torch.Tensor, valid: torch.Tensor | None, outputs: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`SourceBackend.advance`, returning only the logits after the tokens ``outputs`` ``(B, k)``
        marks, row by row: ``(outputs.sum(), R)``."""
        ...


class StaticCaches(Protocol):
    """Capability ``"static"``: preallocated caches stepped in place (see :mod:`trimix.decoding.static`)."""

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capacity: int | None = None,
        *,
        into: DecodeState | None = None,
    ) -> tuple[torch.Tensor, DecodeState]:
        """``capacity``: preallocate that many columns; ``into``: refill a preallocated state in place."""
        ...

    def attach_cursor(self, state: DecodeState, cols: torch.Tensor) -> None:
        """Make ``cols`` (a ``(1,)`` tensor the caller owns) the column the next in-place step writes."""
        ...

    def step_in_place(self, state: DecodeState, tokens: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Feed ``(B, k)`` tokens touching only tensors that keep their addresses; logits ``(B, k, R)``."""
        ...

    def stepped(self, state: DecodeState, width: int) -> None:
        """Host bookkeeping after an in-place step of ``width`` tokens (run or replayed)."""
        ...

    def snapshot(self, state: DecodeState) -> Any:
        """What an in-place step changes, to put back with :meth:`restore` (after a warm-up step)."""
        ...

    def restore(self, state: DecodeState, snapshot: Any) -> None: ...


def capabilities(backend: Any) -> frozenset[str]:
    """The optional capabilities a backend declares (none when it declares nothing)."""
    return frozenset(getattr(backend, "capabilities", ()))


def has_capability(backend: Any, name: str) -> bool:
    return name in capabilities(backend)


def advance_selected(
    backend: SourceBackend,
    state: DecodeState,
    tokens: torch.Tensor,
    valid: torch.Tensor | None,
    outputs: torch.Tensor,
) -> torch.Tensor:
    """The logits after the fed tokens that ``outputs`` ``(B, k)`` marks, row by row, ``(M, R)``: from the
    backend's own call where it declares ``"selected"``, else picked out of :meth:`~SourceBackend.advance`."""
    if valid is not None and bool((outputs.bool() & ~valid.bool().to(outputs.device)).any()):
        raise ValueError("advance_selected: an output is asked for at a padded position")
    if has_capability(backend, SELECTED):
        return backend.advance_selected(state, tokens, valid, outputs)
    logits = backend.advance(state, tokens, valid)
    return logits[outputs.to(logits.device)]


def position_logits(
    backend: SourceBackend, ids: torch.Tensor, count: int, block: int | None = None
) -> Iterator[torch.Tensor]:
    """The logits after each of the first ``count`` tokens of one row ``ids`` ``(1, T)``, in order, as
    ``(1, k, R)`` chunks: the first from a prefill of one token, the rest fed ``block`` tokens at a time
    (all at once when None). The core protocol alone: any backend can score a text this way."""
    if count < 1:
        return
    first, state = backend.prefill(ids[:, :1], torch.ones_like(ids[:, :1]))
    yield first[:, None]
    done = 1
    while done < count:
        feed = ids[:, done : count if block is None else min(done + block, count)]
        yield backend.advance(state, feed)
        done += feed.shape[1]
