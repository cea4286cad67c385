"""Choosing the next token from fused scores: greedy, or sampling with per-row counter-based noise.

Sampling uses the Gumbel-max trick: ``argmax(scores + G)`` with ``G = -log(-log(U))`` draws a token
with probability ``softmax(scores)``. The uniforms ``U`` are not drawn from a stateful generator but
computed by hashing ``(row key, token index, stream, vocabulary id)`` with integer arithmetic, so:

* a row's tokens depend only on its own key (derived from the seed and the prompt's index), never
  on which other rows share its batch or how many tokens they accepted;
* the CPU and the GPU compute the same uniforms bit for bit (integer ops only), and the whole choice
  can be captured in a CUDA graph (no generator state to advance);
* speculative decoding draws its draft, acceptance and residual samples from separate streams.

Temperature, top-k and top-p are transformers' own warpers, so they behave exactly as in
``model.generate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from trimix.config import GenerationConfig

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
STREAM_SAMPLE, STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 0, 1, 2, 3


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (lowbias32) on int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, rows: Sequence[int]) -> torch.Tensor:
    """One 32-bit key per row from the run's seed and each row's own index (its prompt's, or a request's)."""
    folded = (seed & _MASK32) ^ ((seed >> 32) & _MASK32)
    base = hash32(torch.tensor([folded], dtype=torch.long))
    return hash32(base ^ hash32(torch.tensor(list(rows), dtype=torch.long) & _MASK32))


def uniform_noise(
    keys: torch.Tensor, counters: torch.Tensor, width: int, stream: int = STREAM_SAMPLE
) -> torch.Tensor:
    """Uniforms in ``(0, 1)`` for each row's current token index: float32 ``(B, width)``.

    Args:
        keys: ``(B,)`` row keys (see :func:`row_keys`).
        counters: ``(B,)`` the index of the token being chosen in each row's output.
        width: how many uniforms per row (the vocabulary size, or 1).
        stream: separates the uses of one token index (sampling, drafting, acceptance, residual).
    """
    salt = _mul32((counters & _MASK32), _GOLDEN) ^ ((stream * 0x85EBCA77) & _MASK32)
    row = hash32(keys ^ hash32(salt))
    ids = _mul32(torch.arange(width, device=keys.device), _GOLDEN)
    bits = hash32((row[:, None] + ids[None, :]) & _MASK32)
    # The top 24 bits, centred in their bucket: exactly representable in float32, never 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(
    keys: torch.Tensor, counters: torch.Tensor, width: int, stream: int = STREAM_SAMPLE
) -> torch.Tensor:
    """``-log(-log(U))`` for the uniforms of :func:`uniform_noise`."""
    return -torch.log(-torch.log(uniform_noise(keys, counters, width, stream)))


class TokenChooser:
    """Maps fused scores ``(B, V)`` to next tokens ``(B,)``; graph-capturable, reproducible per row.

    Args:
        generation: the decoding settings (do_sample, temperature, top_k, top_p).
    """

    def __init__(self, generation: GenerationConfig) -> None:
        self.do_sample = generation.do_sample
        self.warpers = LogitsProcessorList()
        if self.do_sample:
            if generation.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(generation.temperature))
            if generation.top_k > 0:
                self.warpers.append(TopKLogitsWarper(generation.top_k))
            if generation.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(generation.top_p))

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores actually sampled from (after temperature, top-k and top-p); unchanged when greedy."""
        return self.warpers(None, scores) if self.warpers else scores

    def __call__(
        self,
        scores: torch.Tensor,
        keys: torch.Tensor,
        counters: torch.Tensor,
        stream: int = STREAM_SAMPLE,
    ) -> torch.Tensor:
        if not self.do_sample:
            return scores.argmax(dim=-1)
        warped = self.warp(scores)
        return (warped + gumbel_noise(keys, counters, warped.shape[-1], stream)).argmax(dim=-1)


def sampling_key(generation: GenerationConfig) -> tuple:
    """What decides how a row's token is chosen: rows with equal keys share one :class:`TokenChooser`."""
    if not generation.do_sample:
        return (False,)
    return (True, generation.temperature, generation.top_k, generation.top_p)


def choose_rows(
    scores: torch.Tensor,
    settings: Sequence[GenerationConfig],
    keys: torch.Tensor,
    counters: torch.Tensor,
    stream: int = STREAM_SAMPLE,
) -> torch.Tensor:
    """Per-row token choice when rows carry different sampling settings (a server batch): rows that share
    settings are chosen together by one :class:`TokenChooser`, each with its own noise, so a row's token
    is the one it would get alone."""
    groups: dict[tuple, list[int]] = {}
    for i, generation in enumerate(settings):
        groups.setdefault(sampling_key(generation), []).append(i)
    if len(groups) == 1:
        return TokenChooser(settings[0])(scores, keys, counters, stream)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for rows in groups.values():
        index = torch.tensor(rows, device=scores.device)
        tokens[index] = TokenChooser(settings[rows[0]])(scores[index], keys[index], counters[index], stream)
    return tokens
