"""Raw-text corpora for continual pretraining: reading, de-duplication, splitting and packing."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from trimix.errors import DataError

logger = logging.getLogger(__name__)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a ``.txt`` file (one per line) or ``.jsonl`` file (``text_field`` of each object).

    Raises:
        DataError: a missing or non-text file, bad JSON, or a missing field (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"corpus file {str(path)!r} is not a text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file {str(path)!r} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from exc
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            docs.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{number}: no string field {text_field!r}; set `cpt.text_field` to the text key"
            )
        if value.strip():
            docs.append(value.strip())
    return docs


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
