"""SIB-200 topic classification and FLORES translation built from its sentence-parallel rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from trimix.data import read_sib200, sib200_labels
from trimix.errors import DataError
from trimix.tasks.base import Example, Task, language_name
from trimix.tasks.shapes import TranslationPrompt

_ZH_LABELS = {
    "science/technology": "科学/技术",
    "travel": "旅行",
    "politics": "政治",
    "sports": "体育",
    "health": "健康",
    "entertainment": "娱乐",
    "geography": "地理",
}


@dataclass
class Sib200Topic(Task):
    """Topic classification over the 7 SIB-200 labels; exemplars: one per label (as in the paper)."""

    root: Path | str | None = None
    selection_max_chars: int | None = 384  # the paper's classification budget in weight selection
    name: ClassVar[str] = "sib200_topic"
    kind: ClassVar[str] = "choice"
    default_max_new_tokens: ClassVar[int] = 8
    description: ClassVar[str] = "SIB-200 topic classification, 7 labels (accuracy)"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = _folder(self.root)

    def label(self, category: str) -> str:
        return _ZH_LABELS.get(category, category) if self.prompt_lang == "zh" else category

    def labels(self) -> list[str]:
        return [self.label(c) for c in sib200_labels(self.root)]

    def examples(self, split: str) -> list[Example]:
        known = sib200_labels(self.root)
        choices = tuple(self.label(c) for c in known)
        rows = read_sib200(self.lang, split, self.root)
        for row in rows:
            if row.category not in known:
                raise DataError(
                    f"{row.where}: category {row.category!r} is not in labels.txt ({', '.join(known)}); "
                    "no answer could match it: fix the row or add the label"
                )
        return [Example(r.index_id, {"text": r.text}, self.label(r.category), choices) for r in rows]

    def shot_labels(self) -> list[str]:
        return self.labels()

    def instruction(self) -> str:
        name = language_name(self.lang, self.prompt_lang)
        if self.prompt_lang == "zh":
            return f"请判断以下{name}文本的主题。候选标签：{'、'.join(self.labels())}。"
        return (
            f"Classify the topic of the following {name} text. Candidate labels: {', '.join(self.labels())}."
        )

    def block(self, example: Example) -> str:
        text = self.field(example.fields["text"])
        return f"文本：{text}\n主题：" if self.prompt_lang == "zh" else f"Text: {text}\nTopic:"


def _folder(root: Path | str | None) -> Path | None:
    """A user's data folder (``~`` expanded), or None for the bundled data."""
    return None if root is None else Path(root).expanduser()


@dataclass
class Sib200Translation(TranslationPrompt, Task):
    """Sentence translation between two SIB-200 languages (parallel FLORES rows), scored with chrF++ and BLEU.

    ``lang`` is the low-resource side; ``direction`` says whether it is the source (``to``) or the
    target (``from``) of ``pivot`` (``eng_Latn`` or ``zho_Hans``).
    """

    pivot: str = "eng_Latn"
    direction: str = "to"
    root: Path | str | None = None
    name: ClassVar[str] = "sib200_mt"
    metric_names: ClassVar[tuple[str, ...]] = ("chrf_pp", "bleu")
    default_max_new_tokens: ClassVar[int] = 128
    description: ClassVar[str] = (
        "FLORES sentence translation LRL<->pivot from SIB-200's parallel rows (chrF++, BLEU)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = _folder(self.root)
        if self.direction not in {"to", "from"}:
            raise ValueError(
                f"direction must be 'to' (LRL -> pivot) or 'from' (pivot -> LRL); got {self.direction!r}"
            )

    @property
    def pair(self) -> tuple[str, str]:
        return (self.lang, self.pivot) if self.direction == "to" else (self.pivot, self.lang)

    def examples(self, split: str) -> list[Example]:
        src, tgt = self.pair
        source_rows, target_rows = read_sib200(src, split, self.root), read_sib200(tgt, split, self.root)
        if [r.index_id for r in source_rows] != [r.index_id for r in target_rows]:
            raise ValueError(f"SIB-200 {src} and {tgt} {split} rows are not parallel (index_id differs)")
        return [
            Example(f"{s.index_id}", {"source": s.text}, t.text)
            for s, t in zip(source_rows, target_rows, strict=True)
        ]
