"""Datasets for trimix's lm-eval tasks, read from the SIB-200 files bundled with trimix (offline)."""

from __future__ import annotations

from typing import Any


def load_sib200(lang: str, **_: Any):
    """SIB-200 topic classification for one bundled language as a ``datasets.DatasetDict``
    (train / validation / test; fields ``index_id``, ``category``, ``text``)."""
    import datasets

    from trimix.data import read_sib200

    splits = {"train": "train", "validation": "dev", "test": "test"}
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(
                [
                    {"index_id": r.index_id, "category": r.category, "text": r.text}
                    for r in read_sib200(lang, split)
                ]
            )
            for name, split in splits.items()
        }
    )
