"""Prompts and texts as token ids: left-padded batches, the lm-evaluation-harness context/continuation
split, rolling windows, and tokens shown as readable text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trimix.backends.loading import Source
from trimix.errors import DataError


def encode_texts(source: Source, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenise texts exactly as given (already rendered for ``source``): left-padded ids and mask.

    Raises:
        DataError: a text that tokenises to nothing.
    """
    enc = source.tokenizer(
        texts,
        padding=True,
        return_tensors="pt",
        padding_side="left",
        add_special_tokens=source.adds_special_tokens,
    )
    for i, n in enumerate(enc["attention_mask"].sum(-1).tolist()):
        if n == 0:
            raise DataError(f"prompt {i} is empty after tokenisation for source {source.role!r}")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def is_token_ids(prompt: Any) -> bool:
    """Whether a prompt is given as token ids of the fused vocabulary (not as text or chat messages)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def encode_rows(source: Source, rows: Sequence[str | list[int]]) -> dict[str, torch.Tensor]:
    """Like :func:`encode_texts`, where some rows may be token ids already (read as they are)."""
    if not any(is_token_ids(r) for r in rows):
        return encode_texts(source, rows)
    ids = [list(r) if is_token_ids(r) else encode_texts(source, [r])["input_ids"][0].tolist() for r in rows]
    width = max(len(r) for r in ids)
    pad = int(source.tokenizer.pad_token_id)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask}


def readable_token(tokenizer: Any, token_id: int) -> str:
    """A token as the text it stands for (byte-level symbols decoded); a token that is only part of a
    multi-byte UTF-8 character decodes to U+FFFD and is shown as ``⟨partial⟩``."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text  # SentencePiece decoders drop a word-initial space when a token stands alone
    return text.replace("\ufffd", "⟨partial⟩")


def split_continuation(source: Source, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context join the continuation; the continuation's
    tokens are the whole encoding's after the context's encoding; an empty context becomes a prefix token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    special = source.adds_special_tokens
    tokenizer = source.tokenizer
    whole = tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
    if not context:
        prefix = prefix_token(tokenizer)
        body = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return [prefix], body
    context_ids = tokenizer(context, add_special_tokens=special)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows ``(context, targets)`` covering every token once, each input at most ``max_length``."""
    windows = []
    for start in range(0, len(tokens), max_length):
        targets = tokens[start : start + max_length]
        history = [prefix, *tokens][: start + 1]  # everything before the first target, prefix included
        context = history[-(max_length - len(targets) + 1) :]
        windows.append((context, targets))
    return windows


def prefix_token(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return int(token)
