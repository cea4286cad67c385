"""Datasets for trimix's lm-eval tasks, read from the SIB-200 files bundled with trimix (offline)."""

from __future__ import annotations

import random
from typing import Any

# The bundled files are sorted by category, and lm-eval's --limit N takes the first N documents: in a
# fixed shuffled order, any prefix is a fair sample (the first 60 sorted test rows are 51 of one label).
SHUFFLE_SEED = 0


def load_sib200(lang: str, **_: Any):
    """SIB-200 topic classification for one bundled language as a ``datasets.DatasetDict``
    (train / validation / test; fields ``index_id``, ``category``, ``text``), each split in a fixed
    shuffled order (seed ``SHUFFLE_SEED``)."""
    import datasets

    from trimix.data import read_sib200

    splits = {"train": "train", "validation": "dev", "test": "test"}
    out = {}
    for name, split in splits.items():
        rows = [
            {"index_id": r.index_id, "category": r.category, "text": r.text} for r in read_sib200(lang, split)
        ]
        random.Random(SHUFFLE_SEED).shuffle(rows)
        out[name] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)
