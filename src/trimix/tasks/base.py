"""The task interface: examples, few-shot prompts, answer extraction and scoring.

A task knows its data and prompt format, never whether it talks to one model or a fusion. Prompts
are an instruction line, few-shot blocks with the answer filled in, and the unlabeled input block
ending with the answer label, separated by blank lines (the MiLiC-Eval / TriMix layout).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

LANGUAGE_NAMES = {
    "en": {
        "eng_Latn": "English",
        "zho_Hans": "Chinese",
        "uig_Arab": "Uyghur",
        "kaz_Cyrl": "Kazakh",
        "kaz_Arab": "Kazakh",
        "bod_Tibt": "Tibetan",
        "khk_Cyrl": "Mongolian",
        "mon_Mong": "Mongolian",
        "ben_Beng": "Bengali",
        "tam_Taml": "Tamil",
        "tel_Telu": "Telugu",
        "ory_Orya": "Odia",
        "bo": "Tibetan",
        "ug": "Uyghur",
        "kk": "Kazakh",
        "mn": "Mongolian",
        "zh": "Chinese",
        "en": "English",
    },
    "zh": {
        "eng_Latn": "英语",
        "zho_Hans": "中文",
        "uig_Arab": "维吾尔语",
        "kaz_Cyrl": "哈萨克语",
        "kaz_Arab": "哈萨克语",
        "bod_Tibt": "藏语",
        "khk_Cyrl": "蒙古语",
        "mon_Mong": "蒙古语",
        "ben_Beng": "孟加拉语",
        "tam_Taml": "泰米尔语",
        "tel_Telu": "泰卢固语",
        "ory_Orya": "奥里亚语",
        "bo": "藏语",
        "ug": "维吾尔语",
        "kk": "哈萨克语",
        "mn": "蒙古语",
        "zh": "中文",
        "en": "英语",
    },
}
PromptLang = Literal["en", "zh"]


def language_name(code: str, prompt_lang: PromptLang = "en") -> str:
    """Human name of a language code in the prompt language (the code itself when unknown)."""
    return LANGUAGE_NAMES[prompt_lang].get(code, code)


@dataclass(frozen=True)
class Example:
    """One evaluation item: the fields a prompt shows, the gold answer, and the options if any."""

    id: str
    fields: dict[str, Any]
    target: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt and the character offset where its unlabeled input block starts."""

    id: str
    text: str
    input_start: int


@dataclass
class Task(ABC):
    """A task for one language. Subclasses define the data, the blocks and the scoring.

    Attributes:
        lang: the language code of the items (e.g. ``uig_Arab``).
        prompt_lang: language of the instructions and labels, ``en`` or ``zh``.
        n_shots: number of exemplars (None: the task's default).
        shot_seed: seed for drawing exemplars from the train split.
    """

    lang: str
    prompt_lang: PromptLang = "en"
    n_shots: int | None = None
    shot_seed: int = 0
    max_chars: int = 512
    name: ClassVar[str] = "task"
    kind: ClassVar[Literal["generate", "choice", "perplexity"]] = "generate"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy",)
    max_new_tokens: ClassVar[int] = 16
    description: ClassVar[str] = ""
    _shot_cache: list[Example] | None = field(default=None, init=False, repr=False)

    @property
    def full_name(self) -> str:
        return f"{self.name}_{self.lang}"

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """All items of a split."""

    @abstractmethod
    def instruction(self) -> str:
        """The first line of every prompt."""

    @abstractmethod
    def block(self, example: Example) -> str:
        """The item's fields under their labels, ending with the answer label (no answer)."""

    def answer_text(self, example: Example) -> str:
        """What follows the answer label in an exemplar."""
        return example.target

    def shots(self) -> list[Example]:
        """Few-shot exemplars drawn with ``shot_seed`` from the train split (cached)."""
        if self._shot_cache is None:
            pool = self.examples("train")
            rng = random.Random(self.shot_seed)
            n = self.default_shots() if self.n_shots is None else self.n_shots
            self._shot_cache = rng.sample(pool, min(n, len(pool)))
        return self._shot_cache

    def default_shots(self) -> int:
        return 3

    def render(self, example: Example) -> RenderedPrompt:
        """The full prompt for an item: instruction, exemplars with answers, then the item."""
        parts = [self.instruction()]
        parts += [f"{self.block(s)} {self.answer_text(s)}" for s in self.shots()]
        head = "\n\n".join(parts) + "\n\n"
        return RenderedPrompt(example.id, head + self.block(example), len(head))

    def extract(self, generated: str) -> str:
        """The answer in a generation: its first line, stripped (the paper's rule)."""
        lines = generated.strip().splitlines()
        return lines[0].strip() if lines else ""

    def is_correct(self, prediction: str, example: Example) -> bool:
        """Accuracy tasks: whether an extracted prediction matches the gold answer (case-insensitive)."""
        return prediction.strip().lower() == example.target.strip().lower()

    @property
    def target_lang(self) -> str:
        """Language of the references (BLEU picks its tokenizer by it)."""
        return self.lang

    def clip(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars]
