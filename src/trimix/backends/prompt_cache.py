"""llama.cpp's prompt cache: recent prompts keep their KV cells under sequences of their own, and a new
prompt sharing at least ``REUSE_MIN`` leading tokens with one copies those cells instead of recomputing
them (see :mod:`trimix.backends.llama_cpp`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

REUSE_MIN = 16  # shorter shared prompt prefixes are recomputed


class PromptCache:
    """Prompts (token tuples) and the llama.cpp sequence holding each one's cells, least recently used first.

    Args:
        lib: the ``llama_cpp`` module.
        memory: the context's memory (``llama_get_memory``).
        sequences: the sequence ids reserved for cached prompts (their number is the cache's size).
    """

    def __init__(self, lib: Any, memory: Any, sequences: Iterable[int]) -> None:
        self.lib, self.memory = lib, memory
        self.free = sorted(sequences, reverse=True)
        self.entries: OrderedDict[tuple[int, ...], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def reuse(self, seq: int, prompt: list[int]) -> int:
        """Copy the cells of the cached prompt sharing the longest prefix with ``prompt`` into sequence
        ``seq`` (all but the prompt's last token, whose logits are wanted); how many tokens that gave."""
        self._drop_stale()
        best, best_seq, best_key = 0, -1, ()
        for key, cached in self.entries.items():
            n = min(len(key), len(prompt) - 1)
            same = np.flatnonzero(np.asarray(key[:n]) != np.asarray(prompt[:n]))
            shared = int(same[0]) if same.size else n
            if shared > best:
                best, best_seq, best_key = shared, cached, key
        if best < REUSE_MIN:
            return 0
        self.lib.llama_memory_seq_cp(self.memory, best_seq, seq, 0, best)
        self.entries.move_to_end(best_key)
        return best

    def remember(self, seq: int, prompt: list[int]) -> None:
        """Keep a freshly prefilled prompt's cells (now held by sequence ``seq``) under a cache sequence."""
        key = tuple(prompt)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if len(prompt) < REUSE_MIN or not (self.free or self.entries):
            return
        if not self.free:
            _, oldest = self.entries.popitem(last=False)
            self._drop(oldest)
        cached = self.free.pop()
        self.lib.llama_memory_seq_cp(self.memory, seq, cached, 0, len(prompt))
        self.entries[key] = cached

    def forget(self) -> None:
        """Give every cached prompt's cells back (a decode needs them)."""
        while self.entries:
            self._drop(self.entries.popitem()[1])

    def _drop_stale(self) -> None:
        """A sliding-window cache reuses the cells a prompt's window left once its row is gone; such a prompt
        (its first position gone) cannot be continued from its middle: drop it."""
        for key, cached in list(self.entries.items()):
            if self.lib.llama_memory_seq_pos_min(self.memory, cached) != 0:
                del self.entries[key]
                self._drop(cached)

    def _drop(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free.append(seq)
