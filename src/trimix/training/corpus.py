"""Raw-text corpora for continual pretraining: reading, de-duplication, splitting and packing."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from trimix.errors import DataError
from trimix.io import read_documents

__all__ = ["BlockDataset", "CorpusSplit", "pack_blocks", "read_documents", "split_corpus"]

logger = logging.getLogger(__name__)


@dataclass
class CorpusSplit:
    """De-duplicated, shuffled documents split into training and held-out parts."""

    train: list[str]
    validation: list[str]
    duplicates_removed: int
    sources: list[str]


def split_corpus(
    paths: list[str], text_field: str, dedup: bool, seed: int, validation_fraction: float, max_validation: int
) -> CorpusSplit:
    """Read every file, drop exact duplicates, shuffle with ``seed``, and hold out a validation slice."""
    if not paths:
        raise DataError("no corpus given: set `cpt.corpus` or pass --corpus FILE")
    docs = [d for p in paths for d in read_documents(p, text_field)]
    if not docs:
        raise DataError(f"corpus {paths} holds no text")
    removed = 0
    if dedup:
        unique = list(dict.fromkeys(docs))
        removed = len(docs) - len(unique)
        docs = unique
    random.Random(seed).shuffle(docs)
    n_val = min(max_validation, max(1, round(len(docs) * validation_fraction)))
    if len(docs) - n_val < 1:
        raise DataError(
            f"corpus {paths} has {len(docs)} document(s): too few to hold out validation text and train"
        )
    return CorpusSplit(docs[n_val:], docs[:n_val], removed, list(paths))


def pack_blocks(docs: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenise documents, join them with EOS, and cut fixed-length blocks that each start with BOS.

    Returns:
        ``(num_blocks, block_size)`` token ids; the ragged tail is dropped.

    Raises:
        DataError: fewer tokens than one block.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = block_size - len(bos)
    n_blocks = len(stream) // width
    if n_blocks == 0:
        raise DataError(
            f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}; lower block_size"
        )
    body = torch.tensor(stream[: n_blocks * width]).view(n_blocks, width)
    if bos:
        body = torch.cat([torch.full((n_blocks, 1), bos[0]), body], dim=1)
    return body


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as causal-LM training examples (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block}
