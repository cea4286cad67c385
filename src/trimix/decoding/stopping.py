"""When a row stops, and the text it has shown: the one place a finish reason is set.

:class:`IncrementalDetokenizer` turns a row's growing token list into text at a cost that does not grow
with the row: each new token decodes a short window (the few tokens before the last complete character
and the new ones), not the whole row. A token that ends inside a multi-byte character (a byte-level BPE
spends three tokens on one Tibetan or Odia letter) adds no text until the character is complete, so the
text only ever grows and is always a prefix of the row's full decode.

:class:`StopChecker` applies the stop conditions to every row of a batch, in this order: end of sequence
(an id of the run's set), a stop string (matched on the text, however many tokens its characters take),
the token budget (``max_new_tokens``), the source's context. It is the only place a finish reason is
chosen; decoding loops and the server ask it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["eos", "stop", "length", "context"]

# How many already-shown tokens are decoded again with the new ones: enough context for a decoder that
# drops or adds a space at a word start (SentencePiece's "▁", byte-level "Ġ").
CONTEXT_TOKENS = 5


@dataclass
class IncrementalDetokenizer:
    """A row's text, grown token by token (see the module docstring).

    ``text`` is what the row's tokens decode to so far, up to the last complete character; ``tokens`` the
    row's ids. Decoding uses ``skip_special_tokens=True``, as the final text does. Tokens may be appended
    without decoding (:meth:`append`): the text catches up when it is next read, over all of them at once.
    """

    tokenizer: Any
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # the text decoded so far
    prefix_offset: int = 0  # tokens before this are never decoded again
    read_offset: int = 0  # tokens before this are in ``shown``

    def append(self, token_id: int) -> None:
        """Append a token without decoding it yet."""
        self.tokens.append(token_id)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (empty while a character is incomplete)."""
        self.tokens.append(token_id)
        return self._catch_up()

    @property
    def text(self) -> str:
        self._catch_up()
        return self.shown

    def _catch_up(self) -> str:
        if self.read_offset == len(self.tokens):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        now = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # nothing new, or a character still incomplete: wait for its other bytes
        new = now[len(before) :]
        self.shown += new
        self.prefix_offset = max(self.read_offset, len(self.tokens) - CONTEXT_TOKENS)
        self.read_offset = len(self.tokens)
        return new


@dataclass
class RowStop:
    """One row's stop settings and progress."""

    detokenizer: IncrementalDetokenizer
    stops: tuple[str, ...]
    max_new_tokens: int
    budget: int  # tokens the context leaves (<= max_new_tokens)
    eos: frozenset[int]
    finish_reason: FinishReason | None = None
    stop_at: int | None = None  # where the first stop string starts in ``text``

    @property
    def text(self) -> str:
        """The row's text so far (complete characters only), cut before its stop string once it stopped
        on one; once the row has ended, its whole decode (see :meth:`final_text`)."""
        if self.finish_reason is not None:
            return self.final_text
        full = self.detokenizer.text
        return full if self.stop_at is None else full[: self.stop_at]

    @property
    def final_text(self) -> str:
        """The ended row's text: all its tokens decoded at once (a trailing incomplete character shows as
        U+FFFD, as ``generate`` returns it), cut before the first stop string."""
        detokenizer = self.detokenizer
        return ended_text(detokenizer.tokenizer, detokenizer.tokens, self.finish_reason, self.stops)


class StopChecker:
    """Stop conditions for the rows of one batch or one server group (see the module docstring).

    Args:
        tokenizer: the fused vocabulary's tokenizer (the first source's).
    """

    def __init__(self, tokenizer: Any, eos: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos = list(eos)  # the end-of-sequence ids rows get by default
        self.rows: dict[int, RowStop] = {}

    @classmethod
    def for_batch(
        cls,
        tokenizer: Any,
        budgets: Sequence[int],
        *,
        stops: Sequence[str] = (),
        max_new_tokens: int,
        eos: Sequence[int] = (),
    ) -> StopChecker:
        """A checker for rows ``0 .. len(budgets) - 1`` sharing one generation's settings."""
        checker = cls(tokenizer, eos)
        for row, budget in enumerate(budgets):
            checker.add_row(row, stops=stops, max_new_tokens=max_new_tokens, budget=budget)
        return checker

    def tokens(self, row: int) -> list[int]:
        """The tokens a row has taken so far."""
        return self.rows[row].detokenizer.tokens

    def remove(self, row: int) -> None:
        """Stop tracking a row (it left the batch)."""
        del self.rows[row]

    def add_row(
        self,
        row: int,
        *,
        stops: Sequence[str] = (),
        max_new_tokens: int,
        budget: int | None = None,
        eos: Sequence[int] | None = None,
    ) -> RowStop:
        """Start tracking a row (``eos``: its end-of-sequence ids, default the checker's); a row whose budget
        is 0 is finished at once with reason ``context``."""
        budget = max_new_tokens if budget is None else min(budget, max_new_tokens)
        ids = self.eos if eos is None else eos
        state = RowStop(
            IncrementalDetokenizer(self.tokenizer), tuple(stops), max_new_tokens, budget, frozenset(ids)
        )
        if budget <= 0:
            state.finish_reason = "context"
        self.rows[row] = state
        return state

    def done(self, row: int) -> bool:
        """Whether a row has ended (a row no longer tracked, such as a cancelled one, has)."""
        state = self.rows.get(row)
        return state is None or state.finish_reason is not None

    def record(self, rows: Sequence[int], tokens: Sequence[int]) -> list[FinishReason | None]:
        """Add one token to each row; return each row's finish reason (None: it goes on)."""
        return [self.add(row, token) for row, token in zip(rows, tokens, strict=True)]

    def add(self, row: int, token: int) -> FinishReason | None:
        state = self.rows[row]
        if state.finish_reason is not None:
            raise RuntimeError(f"row {row} finished ({state.finish_reason}) and cannot take a token")
        detokenizer = state.detokenizer
        if state.stops:  # stop strings need the text now; otherwise it is decoded when read
            before = len(detokenizer.text)
            detokenizer.add(token)
        else:
            detokenizer.append(token)
        count = len(detokenizer.tokens)
        reason: FinishReason | None = None
        if token in state.eos:
            reason = "eos"
        elif state.stops and (at := _first_stop(detokenizer.text, state.stops, before)) is not None:
            reason, state.stop_at = "stop", at
        elif count >= state.max_new_tokens:
            reason = "length"
        elif count >= state.budget:
            reason = "context"
        state.finish_reason = reason
        return reason


def _first_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Where the earliest stop string starts in ``text``, looking only at matches that end in the text
    added from ``new_from`` on (older text was checked when it was added)."""
    longest = max(len(s) for s in stops)
    start = max(0, new_from - longest + 1)
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in a whole text (its length when none occurs)."""
    found = _first_stop(text, stops, 0) if stops else None
    return len(text) if found is None else found


def ended_text(
    tokenizer: Any, tokens: Sequence[int], reason: FinishReason | None, stops: Sequence[str]
) -> str:
    """An ended row's text: its tokens decoded at once (a trailing incomplete character shows as U+FFFD),
    cut before the first stop string when a stop string ended it."""
    full = tokenizer.decode(list(tokens), skip_special_tokens=True)
    return full[: first_stop(full, stops)] if reason == "stop" else full


def emit_text(shown: str, text: str, finished: bool, stops: Sequence[str]) -> tuple[str, str]:
    """The text a stream may emit now: ``(delta, new shown text)``.

    Emitted text is never taken back, so while a row runs the last ``len(longest stop) - 1`` characters
    are held back (a stop string may be starting there; the output never contains it) and so is an
    incomplete multi-byte character (U+FFFD at the end). When the row ends, the rest is emitted.
    """
    if finished:
        visible = text
    else:
        limit = len(text) - max((len(s) - 1 for s in stops), default=0)
        while limit > len(shown) and text[limit - 1] == "\ufffd":
            limit -= 1
        visible = text[: max(limit, len(shown))]
    if not visible.startswith(shown):  # cannot happen for text that only grows; never repeat what was sent
        return "", shown
    return visible[len(shown) :], visible
