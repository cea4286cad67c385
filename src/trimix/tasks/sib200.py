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

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return {"accuracy": 100.0 * (prediction.strip().lower() == example.target.lower())}
