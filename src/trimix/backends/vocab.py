"""Check that the sources describe one vocabulary, and decide how many logits are fused.

Qwen2.5-1.5B has 151,936 output rows and Qwen2.5-7B 152,064 for the same 151,665-token tokenizer:
the extra rows are padding. Fusion therefore runs over the tokenizer's real vocabulary, ids
``[0, V)``; padded rows are never generated and no weight is resized.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from transformers import PreTrainedTokenizerBase

from trimix.errors import VocabularyMismatchError

logger = logging.getLogger(__name__)

_SPECIALS = ("bos_token_id", "eos_token_id", "unk_token_id")
_PROBE = "TriMix probe: Hello, world! 123 ئۇيغۇرچە тест བོད་ 中文"


def _id_to_token(tokenizer: PreTrainedTokenizerBase, size: int) -> list[str | None]:
    return tokenizer.convert_ids_to_tokens(list(range(size)))


def check_vocabularies(
    tokenizers: Mapping[str, PreTrainedTokenizerBase],
    logit_rows: Mapping[str, int],
    mode: str = "exact",
) -> int:
    """Verify that all tokenizers agree and every model has a logit for each token.

    Args:
        tokenizers: role -> tokenizer.
        logit_rows: role -> number of logits the model outputs per position.
        mode: ``exact`` requires tokenizers of one size; ``shared_prefix`` fuses over the ids all of
            them share (the larger tokenizers' extra tokens can then never be generated).

    Returns:
        V, the number of token ids fused (logits are sliced to ``[..., :V]``).

    Raises:
        VocabularyMismatchError: naming the first disagreement and how to resolve it.
    """
    roles = list(tokenizers)
    first = roles[0]
    sizes = {role: len(tok) for role, tok in tokenizers.items()}
    if mode == "exact" and len(set(sizes.values())) > 1:
        raise VocabularyMismatchError(
            f"tokenizer sizes differ: {sizes}. Fusion needs one vocabulary; if they agree on their shared "
            "ids, set `fusion.vocab: shared_prefix` to fuse on those."
        )
    vocab = min(sizes.values())
    reference = _id_to_token(tokenizers[first], vocab)
    for role in roles[1:]:
        tokens = _id_to_token(tokenizers[role], vocab)
        if tokens != reference:
            idx = next(i for i, (a, b) in enumerate(zip(reference, tokens, strict=True)) if a != b)
            raise VocabularyMismatchError(
                f"tokenizers disagree: id {idx} is {reference[idx]!r} for {first} but {tokens[idx]!r} for {role}. "
                "All sources must share one tokenizer (e.g. the same model family)."
            )
        _check_specials(first, tokenizers[first], role, tokenizers[role])
        # Same vocabulary, same specials, yet a different normaliser would split prompts differently.
        # (With shared_prefix a larger tokenizer may legitimately merge more, so only exact mode checks.)
        probe_a = tokenizers[first](_PROBE)["input_ids"]
        probe_b = tokenizers[role](_PROBE)["input_ids"]
        if mode == "exact" and probe_a != probe_b:
            raise VocabularyMismatchError(
                f"tokenizers of {first} and {role} share a vocabulary but encode the same text differently "
                f"({probe_a[:8]}... vs {probe_b[:8]}...); their normalisation or special-token settings differ"
            )
    _check_rows(vocab, logit_rows)
    return vocab


def _check_specials(
    role_a: str, tok_a: PreTrainedTokenizerBase, role_b: str, tok_b: PreTrainedTokenizerBase
) -> None:
    for attr in _SPECIALS:
        a, b = getattr(tok_a, attr, None), getattr(tok_b, attr, None)
        if a != b:
            raise VocabularyMismatchError(f"special token {attr} is {a} for {role_a} but {b} for {role_b}")


def _check_rows(vocab: int, logit_rows: Mapping[str, int]) -> None:
    short = {role: rows for role, rows in logit_rows.items() if rows < vocab}
    if short:
        raise VocabularyMismatchError(
            f"model(s) {short} output fewer logits than the tokenizer's {vocab} tokens; "
            "a model and its tokenizer do not belong together"
        )
    padded = {role: rows for role, rows in logit_rows.items() if rows > vocab}
    if padded:
        logger.info(
            "fusing over the tokenizer's %d ids; padded output rows %s are ignored and never generated",
            vocab,
            padded,
        )
