"""Byte-level fusion: sources with different tokenizers meet at the byte level.

:mod:`~trimix.bytelevel.spelling` (what each token spells), :mod:`~trimix.bytelevel.marginal` (a
source's exact next-byte distribution from its token distributions), :mod:`~trimix.bytelevel.backend`
(a token-level backend seen one byte at a time) and :mod:`~trimix.bytelevel.tokenizer` (the fused
byte vocabulary).
"""

from trimix.bytelevel.backend import ByteLevelBackend, ByteState
from trimix.bytelevel.marginal import BYTE_VOCAB, END, RowTree
from trimix.bytelevel.tokenizer import START, ByteTokenizer

__all__ = ["BYTE_VOCAB", "END", "START", "ByteLevelBackend", "ByteState", "ByteTokenizer", "RowTree"]
