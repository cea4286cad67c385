"""Vocabulary extension for continual pretraining (``trimix cpt --extend-vocab N``).

1. :func:`learn_tokens`: a BPE is trained on the corpus with the ``tokenizers`` library (words keep
   their leading space, as SentencePiece's ``▁`` does); its merges, most frequent first, give the
   candidates, and the first N that the base tokenizer splits into two or more tokens are kept.
2. :func:`add_tokens`: they join the base tokenizer as added tokens, matched in the text before the
   model's own merges (the longest first); a tokenizer whose normaliser writes spaces as ``▁`` gets
   them in that spelling, others in plain text.
3. :func:`init_new_rows`: the model gets one input (and, when untied, output) embedding row per new
   token, set to the mean of the rows of the pieces the base tokenizer splits it into: the simple
   initialisation that vocabulary-adaptation studies find robust in low-resource settings.

The new rows are then trained with the LoRA (PEFT's trainable token rows) or with everything else
under ``method: full``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

SPACE = "\u2581"


def learn_tokens(texts: Sequence[str], base_tokenizer: Any, count: int) -> list[str]:
    """Up to ``count`` new tokens (as text, a leading space kept) for the language of ``texts``: the most
    frequent BPE merges of the corpus that the base tokenizer does not already have as one token."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=4 * count + 2000, min_frequency=2, show_progress=False)
    learner.train_from_iterator(texts, trainer=trainer)
    vocab = learner.get_vocab()
    known = base_tokenizer.get_vocab()
    metaspace = _normalizes_spaces(base_tokenizer)
    out: list[str] = []
    for piece in sorted(vocab, key=vocab.get):
        text = piece.replace(SPACE, " ")
        if len(text.strip()) < 2 or "  " in text or text.endswith(" ") or _spelled(text, metaspace) in known:
            continue
        if len(base_tokenizer(text, add_special_tokens=False)["input_ids"]) < 2:
            continue  # the base tokenizer already spells it in one token
        out.append(text)
        if len(out) == count:
            break
    if len(out) < count:
        logger.warning("the corpus yields only %d new tokens of the %d asked for", len(out), count)
    return out


def _normalizes_spaces(tokenizer: Any) -> bool:
    """Whether the tokenizer's normaliser writes spaces as ``▁`` before matching (Gemma, Llama 2): added
    tokens are then matched in that spelling. (A Metaspace *pre-tokenizer* acts after added tokens are
    matched, so there they keep plain spaces.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str()).get("normalizer") or {}
    steps = spec.get("normalizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    return any(s.get("type") == "Replace" and s.get("content") == SPACE for s in steps)


def _spelled(text: str, metaspace: bool) -> str:
    """``text`` as a tokenizer writes it in its vocabulary (``▁`` for spaces where its normaliser does)."""
    return text.replace(" ", SPACE) if metaspace else text


def add_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` (text) to ``tokenizer`` in its own spelling; return their ids, in order."""
    metaspace = _normalizes_spaces(tokenizer)
    added = [AddedToken(_spelled(t, metaspace), normalized=metaspace, special=False) for t in tokens]
    before = len(tokenizer)
    tokenizer.add_tokens(added)
    ids = tokenizer.convert_tokens_to_ids([a.content for a in added])
    if len(tokenizer) - before != len(tokens) or None in ids:
        raise ValueError(f"{len(tokens)} tokens asked for, {len(tokenizer) - before} added")
    return list(ids)


def pieces_of(base_tokenizer: Any, tokens: Sequence[str]) -> list[list[int]]:
    """Each new token's ids under the base tokenizer (what its embedding is initialised from)."""
    return [base_tokenizer(t, add_special_tokens=False)["input_ids"] for t in tokens]


@torch.no_grad()
def init_new_rows(model: Any, new_ids: Sequence[int], pieces: Sequence[Sequence[int]]) -> None:
    """Grow the model's embeddings to hold ``new_ids`` and set each new row (input, and output when not
    tied to the input) to the mean of its ``pieces``' rows."""
    size = max(new_ids) + 1
    if model.get_input_embeddings().weight.shape[0] < size:
        model.resize_token_embeddings(size, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for matrix in matrices:
        for new, old in zip(new_ids, pieces, strict=True):
            matrix[new] = matrix[list(old)].mean(0)


def token_modules(model: Any) -> list[str]:
    """Names of the embedding modules whose new rows train under LoRA: the input embedding, and the
    output head when it is not tied to it."""
    names = {id(m): n for n, m in model.named_modules()}
    wanted = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != wanted[0].weight.data_ptr():
        wanted.append(output)
    return [names[id(m)].rsplit(".", 1)[-1] for m in wanted]


def tokens_per_byte(tokenizer: Any, texts: Sequence[str]) -> float:
    """Tokens the tokenizer spends per UTF-8 byte of ``texts`` (special tokens not counted)."""
    tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return tokens / max(1, sum(len(t.encode("utf-8")) for t in texts))
