"""SIB-200 topic classification and FLORES translation built from its sentence-parallel rows."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from trimix.data import read_sib200, sib200_labels
from trimix.tasks.base import Example, Task, language_name

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

    root: Path | None = None
    name: ClassVar[str] = "sib200_topic"
    kind: ClassVar[str] = "choice"
    max_new_tokens: ClassVar[int] = 8
    description: ClassVar[str] = "SIB-200 topic classification, 7 labels (accuracy)"

    def label(self, category: str) -> str:
        return _ZH_LABELS.get(category, category) if self.prompt_lang == "zh" else category

    def labels(self) -> list[str]:
        return [self.label(c) for c in sib200_labels(self.root)]

    def examples(self, split: str) -> list[Example]:
        choices = tuple(self.labels())
        return [
            Example(r.index_id, {"text": r.text}, self.label(r.category), choices)
            for r in read_sib200(self.lang, split, self.root)
        ]

    def default_shots(self) -> int:
        return len(self.labels())

    def shots(self) -> list[Example]:
        if self._shot_cache is None:
            pool = self.examples("train")
            rng = random.Random(self.shot_seed)
            n = self.default_shots() if self.n_shots is None else self.n_shots
            by_label = {label: [e for e in pool if e.target == label] for label in self.labels()}
            picked = [rng.choice(items) for items in by_label.values() if items][:n]
            rng.shuffle(picked)
            self._shot_cache = picked
        return self._shot_cache

    def instruction(self) -> str:
        name = language_name(self.lang, self.prompt_lang)
        if self.prompt_lang == "zh":
            return f"请判断以下{name}文本的主题。候选标签：{'、'.join(self.labels())}。"
        return (
            f"Classify the topic of the following {name} text. Candidate labels: {', '.join(self.labels())}."
        )

    def block(self, example: Example) -> str:
        text = self.clip(example.fields["text"])
        return f"文本：{text}\n主题：" if self.prompt_lang == "zh" else f"Text: {text}\nTopic:"


@dataclass
class Sib200Translation(Task):
    """Sentence translation between two SIB-200 languages (parallel FLORES rows), scored with chrF++ and BLEU.

    ``lang`` is the low-resource side; ``direction`` says whether it is the source (``to``) or the
    target (``from``) of ``pivot`` (``eng_Latn`` or ``zho_Hans``).
    """

    pivot: str = "eng_Latn"
    direction: str = "to"
    root: Path | None = None
    name: ClassVar[str] = "sib200_mt"
    metric_names: ClassVar[tuple[str, ...]] = ("chrf_pp", "bleu")
    max_new_tokens: ClassVar[int] = 128
    description: ClassVar[str] = (
        "FLORES sentence translation LRL<->pivot from SIB-200's parallel rows (chrF++, BLEU)"
    )

    def __post_init__(self) -> None:
        if self.direction not in {"to", "from"}:
            raise ValueError(
                f"direction must be 'to' (LRL -> pivot) or 'from' (pivot -> LRL); got {self.direction!r}"
            )

    @property
    def pair(self) -> tuple[str, str]:
        return (self.lang, self.pivot) if self.direction == "to" else (self.pivot, self.lang)

    @property
    def full_name(self) -> str:
        src, tgt = self.pair
        return f"{self.name}_{src}-{tgt}"

    @property
    def target_lang(self) -> str:
        return self.pair[1]

    def examples(self, split: str) -> list[Example]:
        src, tgt = self.pair
        source_rows, target_rows = read_sib200(src, split, self.root), read_sib200(tgt, split, self.root)
        if [r.index_id for r in source_rows] != [r.index_id for r in target_rows]:
            raise ValueError(f"SIB-200 {src} and {tgt} {split} rows are not parallel (index_id differs)")
        return [
            Example(f"{s.index_id}", {"source": s.text}, t.text)
            for s, t in zip(source_rows, target_rows, strict=True)
        ]

    def instruction(self) -> str:
        src, tgt = (language_name(c, self.prompt_lang) for c in self.pair)
        if self.prompt_lang == "zh":
            return f"将以下{src}句子翻译成{tgt}。"
        return f"Translate the following {src} sentence into {tgt}."

    def block(self, example: Example) -> str:
        src, tgt = (language_name(c, self.prompt_lang) for c in self.pair)
        sep = "：" if self.prompt_lang == "zh" else ":"
        return f"{src}{sep} {self.clip(example.fields['source'])}\n{tgt}{sep}"
