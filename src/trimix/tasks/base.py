"""The task interface: examples, few-shot prompts, answer extraction and scoring.

A task knows its data and prompt format, never whether it talks to one model or a fusion. Prompts
are an instruction line, few-shot blocks with the answer filled in, and the unlabeled input block
ending with the answer label, separated by blank lines (the MiLiC-Eval / TriMix layout).
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
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


_FIELD_OPEN, _FIELD_CLOSE = "\x02", "\x03"  # mark a field's own text inside a block while rendering


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt, where its unlabeled input block starts, where the task's own text lies, and what was cut.

    Attributes:
        text: the prompt.
        input_start: character offset of the item's block (after the instruction and exemplars).
        spans: ``(start, end)`` character spans of the fields' own text (passages, questions, options,
            exemplar answers): everything else is template (instruction, field labels, separators).
        clipped: how many fields were cut to the passage budget.
    """

    text: str
    input_start: int
    spans: tuple[tuple[int, int], ...] = ()
    clipped: int = 0


def stratified_sample(
    pool: list[Example], n: int | None, seed: int, labels: Sequence[str] | None = None
) -> list[Example]:
    """Few-shot exemplars drawn with ``seed``: ``n`` of the pool, or, with ``labels``, one per label in that
    order, shuffled and cut to ``n`` when given (the paper's one-per-label classification exemplars)."""
    rng = random.Random(seed)
    if labels is None:
        return rng.sample(pool, min(n if n is not None else 3, len(pool)))
    groups = {label: [e for e in pool if e.target == label] for label in labels}
    picked = [rng.choice(items) for items in groups.values() if items]
    rng.shuffle(picked)
    return picked if n is None else picked[:n]


@dataclass
class Task(ABC):
    """A task for one language. Subclasses define the data, the blocks and the scoring.

    Attributes:
        lang: the language code of the items (e.g. ``uig_Arab``).
        prompt_lang: language of the instructions and labels, ``en`` or ``zh``.
        n_shots: number of exemplars (None: the task's default).
        shot_seed: seed for drawing exemplars from the train split.
        max_chars: the passage budget: a field's text is cut to this many characters (the paper's 512;
            256 for title generation).
        selection_max_chars: the budget when rendering prompts for label-free weight selection (the
            paper's 384 for classification); None: ``max_chars``.
        max_new_tokens: generation budget (None: the task's default, ``default_max_new_tokens``).
        stop: generation stops at these strings; the paper's protocol keeps the first line.
    """

    lang: str
    prompt_lang: PromptLang = "en"
    n_shots: int | None = None
    shot_seed: int = 0
    max_chars: int = 512
    selection_max_chars: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ("\n",)
    name: ClassVar[str] = "task"
    kind: ClassVar[Literal["generate", "choice", "perplexity"]] = "generate"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy",)
    default_max_new_tokens: ClassVar[int] = 16
    description: ClassVar[str] = ""
    _shot_cache: list[Example] | None = field(default=None, init=False, repr=False)
    _budget: int | None = field(default=None, init=False, repr=False)
    _cut: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_chars < 1 or (self.selection_max_chars is not None and self.selection_max_chars < 1):
            raise ValueError(f"max_chars must be positive; got {self.max_chars}, {self.selection_max_chars}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive; got {self.max_new_tokens}")
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def full_name(self) -> str:
        return f"{self.name}_{self.lang}"

    def generation_settings(self) -> dict[str, Any]:
        """What generation cells decode with (recorded in every prediction row)."""
        return {
            "max_new_tokens": self.max_new_tokens or self.default_max_new_tokens,
            "stop": list(self.stop),
            "max_chars": self.max_chars,
        }

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """All items of a split."""

    @abstractmethod
    def instruction(self) -> str:
        """The first line of every prompt."""

    @abstractmethod
    def block(self, example: Example) -> str:
        """The item's fields under their labels, ending with the answer label (no answer); field text goes
        through :meth:`field` (or :meth:`clip`) so that renders know where it lies and what was cut."""

    def answer_text(self, example: Example) -> str:
        """What follows the answer label in an exemplar."""
        return example.target

    def shots(self) -> list[Example]:
        """Few-shot exemplars drawn with ``shot_seed`` from the train split (cached); classification tasks
        take one per label (:meth:`shot_labels`)."""
        if self._shot_cache is None:
            labels = self.shot_labels()
            n = self.default_shots() if self.n_shots is None and labels is None else self.n_shots
            self._shot_cache = stratified_sample(self.examples("train"), n, self.shot_seed, labels)
        return self._shot_cache

    def shot_labels(self) -> list[str] | None:
        """The labels to draw one exemplar each for (None: draw exemplars regardless of label)."""
        return None

    def default_shots(self) -> int:
        return 3

    def render(self, example: Example, selection: bool = False) -> RenderedPrompt:
        """The full prompt for an item: instruction, exemplars with answers, then the item.

        Args:
            example: the item.
            selection: render for label-free weight selection (its passage budget).
        """
        self.start_render(selection)
        parts = [self.instruction()]
        parts += [f"{self.block(s)} {self.field(self.answer_text(s), clip=False)}" for s in self.shots()]
        return self.finish_render("\n\n".join(parts) + "\n\n", self.block(example))

    def start_render(self, selection: bool) -> None:
        """Set the passage budget of a render (the selection one with ``selection``) and reset its cut count."""
        self._budget = (self.selection_max_chars or self.max_chars) if selection else self.max_chars
        self._cut = 0

    def finish_render(self, head: str, item: str) -> RenderedPrompt:
        """The prompt ``head + item`` (both with field markers) with the item's start and the field spans."""
        text, spans = _strip_fields(head + item)
        return RenderedPrompt(text, len(_strip_fields(head)[0]), spans, self._cut)

    def field(self, value: str, clip: bool = True) -> str:
        """A field's own text inside a block: cut to the passage budget (when ``clip``) and marked."""
        return f"{_FIELD_OPEN}{self.clip(value) if clip else value}{_FIELD_CLOSE}"

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
        """Cut ``text`` to the passage budget (counted in the render's ``clipped``)."""
        budget = self._budget or self.max_chars
        if len(text) <= budget:
            return text
        self._cut += 1
        return text[:budget]


def _strip_fields(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Remove field markers; return the clean text and the spans the markers enclosed."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length, start = 0, 0
    for piece in re.split(f"([{_FIELD_OPEN}{_FIELD_CLOSE}])", marked):
        if piece == _FIELD_OPEN:
            start = length
        elif piece == _FIELD_CLOSE:
            if length > start:
                spans.append((start, length))
        else:
            out.append(piece)
            length += len(piece)
    return "".join(out), tuple(spans)
