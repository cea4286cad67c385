"""Belebele-format multiple choice (passage, question, four options), read from a JSON list or JSONL file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from trimix.errors import DataError
from trimix.tasks.base import Example, Task
from trimix.tasks.milic import read_json_items, require
from trimix.tasks.shapes import LETTERS, MultipleChoicePrompt


@dataclass
class Belebele(MultipleChoicePrompt, Task):
    """Belebele-format multiple choice: passage, question, four options, the correct option's number.

    Fields (as released): ``flores_passage``, ``question``, ``mc_answer1`` ... ``mc_answer4``,
    ``correct_answer_num``. Belebele has no train split: exemplars come from ``train_path`` when given,
    otherwise they are drawn from the file itself and left out of the evaluated items.
    """

    path: str | None = None
    train_path: str | None = None
    name: ClassVar[str] = "belebele"
    description: ClassVar[str] = "Belebele-format reading comprehension, 4 options (accuracy)"

    def _read(self, path: str | None) -> list[Example]:
        if not path:
            raise DataError("task 'belebele' needs path: FILE (JSON list or JSONL in the Belebele format)")
        items = []
        for number, item in enumerate(read_json_items(Path(path).expanduser()), start=1):
            where = f"{path}: item {number}"
            options = [require(item, f"mc_answer{i}", str, where) for i in range(1, 5)]
            answer = str(require(item, "correct_answer_num", (str, int), where)).strip()
            if answer not in {"1", "2", "3", "4"}:
                raise DataError(f"{where}: field 'correct_answer_num' must be 1-4; got {answer!r}")
            fields = {
                "context": require(item, "flores_passage", str, where),
                "question": require(item, "question", str, where),
                "options": options,
            }
            items.append(
                Example(str(item.get("id", number)), fields, LETTERS[int(answer) - 1], tuple(LETTERS[:4]))
            )
        return items

    def examples(self, split: str) -> list[Example]:
        items = self._read(self.path)
        if split == "train":
            return self._read(self.train_path) if self.train_path else items
        held = set() if self.train_path else {e.id for e in self.shots()}
        return [e for e in items if e.id not in held]
