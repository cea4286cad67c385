"""Prompt shapes that several tasks share: translation of one field, and lettered multiple choice."""

from __future__ import annotations

import string
from typing import ClassVar

from trimix.tasks.base import Example, language_name

LETTERS = string.ascii_uppercase[:5]


def lettered(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False))


class TranslationPrompt:
    """``{src}: <text>\\n{tgt}:`` under "Translate the following {src} {unit} into {tgt}." (SIB-200's FLORES
    rows, MiLiC-Eval); the task defines ``pair`` (source and target language codes)."""

    unit: ClassVar[tuple[str, str]] = ("sentence", "句子")  # (English, Chinese) name of what is translated

    @property
    def full_name(self) -> str:
        src, tgt = self.pair
        return f"{self.name}_{src}-{tgt}"

    @property
    def target_lang(self) -> str:
        return self.pair[1]

    def instruction(self) -> str:
        src, tgt = (language_name(c, self.prompt_lang) for c in self.pair)
        if self.prompt_lang == "zh":
            return f"将以下{src}{self.unit[1]}翻译成{tgt}。"
        return f"Translate the following {src} {self.unit[0]} into {tgt}."

    def block(self, example: Example) -> str:
        src, tgt = (language_name(c, self.prompt_lang) for c in self.pair)
        sep = "：" if self.prompt_lang == "zh" else ":"
        return f"{src}{sep} {self.field(example.fields['source'])}\n{tgt}{sep}"


class MultipleChoicePrompt:
    """A passage (cut to the budget), an optional question and lettered options; answered with a letter."""

    letter_answers: ClassVar[bool] = True
    kind: ClassVar[str] = "choice"
    default_max_new_tokens: ClassVar[int] = 2

    def instruction(self) -> str:
        name = language_name(self.lang, self.prompt_lang)
        if self.prompt_lang == "zh":
            return f"阅读以下{name}材料，回答选择题。只输出选项字母。"
        return f"Read the {name} passage and answer the multiple-choice question with the option letter."

    def block(self, example: Example) -> str:
        return self.choice_block(example, ("Context:", "材料："))

    def choice_block(self, example: Example, context_label: tuple[str, str], clip: bool = True) -> str:
        """The passage under ``context_label`` (English, Chinese), cut to the budget when ``clip``, the
        question if any, the lettered options and the answer label."""
        f = example.fields
        zh = self.prompt_lang == "zh"
        parts = [f"{context_label[zh]}\n{self.field(f['context'], clip=clip)}"]
        if "question" in f:
            parts.append(f"{'问题：' if zh else 'Question: '}{self.field(f['question'], clip=False)}")
        parts.append(f"{'选项：' if zh else 'Options:'}\n{self.field(lettered(f['options']), clip=False)}")
        parts.append("答案：" if zh else "Answer:")
        return "\n".join(parts)

    def extract(self, generated: str) -> str:
        """The answer letter: the first character of the first line, if it is one of A-E."""
        first = super().extract(generated)[:1].upper()
        return first if first in LETTERS else ""
