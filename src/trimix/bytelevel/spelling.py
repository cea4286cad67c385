"""What each token of a source spells, in bytes, and the lookups byte-level conditioning needs.

A token's spelling is the bytes it adds to the text:

* byte-level BPE (GPT-2, Qwen2, Llama 3): the token string through GPT-2's byte-to-character table,
  inverted;
* SentencePiece-style pieces (Gemma, Llama 2): ``<0xNN>`` byte-fallback pieces are the byte NN, the
  decoder's replacements (``▁`` -> space) applied to the rest, then UTF-8. A leading-space strip
  that a decoder applies at the start of a whole text does not apply to a continuation.

Special tokens (BOS, chat markers, unused slots) spell nothing: they are excluded from the byte-level
source, except the end-of-sequence ids, which are its end symbol. Everything else must spell at
least one byte.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_steps(tokenizer: Any) -> list[dict[str, Any]]:
    """The fast tokenizer's decoder, flattened to a list of steps (empty when it has none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return []
    spec = json.loads(backend.to_str())["decoder"]
    if spec is None:
        return []
    return spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]


def _piece_spelling(piece: str, steps: list[dict[str, Any]]) -> bytes:
    match = _BYTE_PIECE.match(piece)
    if match and any(s["type"] == "ByteFallback" for s in steps):
        return bytes([int(match.group(1), 16)])
    for step in steps:
        if step["type"] == "Replace" and "String" in step["pattern"]:
            piece = piece.replace(step["pattern"]["String"], step["content"])
        elif step["type"] == "Metaspace":
            piece = piece.replace(step.get("replacement", "▁"), " ")
    return piece.encode("utf-8")


def token_spellings(tokenizer: Any, eos_ids: list[int]) -> list[bytes | None]:
    """Each id's spelling (see the module docstring); None for special tokens, ``b""`` for EOS ids.

    Raises:
        ValueError: when a non-special token spells nothing (the byte-level source could not place it).
    """
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    steps = _decoder_steps(tokenizer)
    byte_level = any(s["type"] == "ByteLevel" for s in steps)
    table = _byte_level_decoding()
    special = set(getattr(tokenizer, "all_special_ids", []))
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(token_id)
    out: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if token_id in eos_ids:
            out.append(b"")
        elif token_id in special or piece is None:
            out.append(None)
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            out.append(_piece_spelling(piece, steps))
        if out[-1] == b"" and token_id not in eos_ids:
            out[-1] = None  # spells nothing: treated as a special token
    return out


@dataclass
class SpellingTable:
    """A source's byte-bearing tokens sorted by spelling, for prefix-range queries.

    Tokens whose spelling starts with a byte string ``u`` are the contiguous range
    :meth:`prefix_range` of the sorted order; within it, the token spelling ``u`` exactly (if any)
    comes first and the rest are sorted by their byte after ``u``.

    Attributes:
        order: ``(N,)`` token ids of the byte-bearing tokens, sorted by spelling.
        spellings: their spellings, in that order.
        eos_ids: the ids that end the text.
        excluded: ids that spell nothing and do not end it (special tokens, padded rows excluded).
        first_bounds: ``(257,)`` where the tokens starting with byte b begin (``[b]``) and end (``[b+1]``).
        next_byte: ``(N, M)`` int16: byte j of each sorted spelling, -1 past its end (M: longest spelling).
        vocab: ids covered (the tokenizer's length).
        by_id: each id's spelling (None: spells nothing; ``b""``: an end-of-sequence id).
    """

    order: torch.Tensor
    spellings: list[bytes]
    eos_ids: list[int]
    excluded: list[int]
    first_bounds: torch.Tensor
    next_byte: torch.Tensor
    vocab: int
    by_id: list[bytes | None]

    @classmethod
    def build(cls, tokenizer: Any, eos_ids: list[int]) -> SpellingTable:
        spelled = token_spellings(tokenizer, eos_ids)
        bearing = sorted((s, i) for i, s in enumerate(spelled) if s)
        spellings = [s for s, _ in bearing]
        order = torch.tensor([i for _, i in bearing], dtype=torch.long)
        longest = max((len(s) for s in spellings), default=1)
        padded = np.full((len(spellings), longest), -1, dtype=np.int16)
        for row, s in enumerate(spellings):
            padded[row, : len(s)] = np.frombuffer(s, dtype=np.uint8)
        next_byte = torch.from_numpy(padded)
        firsts = next_byte[:, 0].long()
        first_bounds = torch.searchsorted(firsts, torch.arange(257))
        return cls(
            order=order,
            spellings=spellings,
            eos_ids=[i for i, s in enumerate(spelled) if s == b""],
            excluded=[i for i, s in enumerate(spelled) if s is None],
            first_bounds=first_bounds,
            next_byte=next_byte,
            vocab=len(spelled),
            by_id=spelled,
        )

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """``[lo, hi)`` of the sorted tokens whose spelling starts with ``prefix`` (non-empty)."""
        lo = bisect.bisect_left(self.spellings, prefix)
        stripped = prefix.rstrip(b"\xff")
        if not stripped:
            return lo, len(self.spellings)
        upper = stripped[:-1] + bytes([stripped[-1] + 1])
        return lo, bisect.bisect_left(self.spellings, upper, lo)

    def exact(self, spelling: bytes, lo: int, hi: int) -> list[int]:
        """Sorted positions in ``[lo, hi)`` whose spelling is exactly ``spelling`` (several ids may share one)."""
        out = []
        for pos in range(lo, hi):
            if self.spellings[pos] != spelling:
                break
            out.append(pos)
        return out
