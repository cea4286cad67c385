"""MiLiC-Eval tasks, read from the released JSON lists.

Layout: ``ROOT/<task>/<lang>/{test,dev}.json`` and exemplar files ``train_1.json`` ... ``train_3.json``,
each a JSON list of objects with a string ``id``. Languages: ``bo`` (Tibetan), ``ug`` (Uyghur),
``kk`` (Kazakh, Arabic script), ``mn`` (Mongolian, traditional script). Every malformed item is
rejected with its file, item number and field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from trimix.errors import DataError
from trimix.io import read_text
from trimix.metrics import last_number
from trimix.tasks.base import Example, RenderedPrompt, Task, language_name
from trimix.tasks.shapes import LETTERS, MultipleChoicePrompt, TranslationPrompt


def read_json_items(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects each with a non-empty string ``id`` (JSONL accepted too)."""
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    text = read_text(path, "data file")
    try:
        items = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {number} is not a JSON object")
        key = str(item.get("id"))
        if "id" in item and key in seen:
            raise DataError(
                f"{path}: item {number} has id {key!r}, as item {seen[key]} does; ids must be unique (results "
                "are keyed by them)"
            )
        seen[key] = number
    return items


def require(item: dict[str, Any], field: str, kind: type | tuple[type, ...], where: str) -> Any:
    """A field of an item, checked for presence, type and non-emptiness."""
    if field not in item:
        raise DataError(f"{where}: missing field '{field}'")
    value = item[field]
    if not isinstance(value, kind) or (isinstance(value, (str, list, dict)) and not value):
        raise DataError(
            f"{where}: field '{field}' must be a non-empty {getattr(kind, '__name__', kind)}; got {value!r}"
        )
    return value


def paper_language_name(code: str, prompt_lang: str) -> str:
    """A language's name as the paper's prompts write it (Chinese is 汉语 in Chinese prompts)."""
    return "汉语" if prompt_lang == "zh" and code == "zh" else language_name(code, prompt_lang)


@dataclass
class MilicTask(Task):
    """Shared reading and prompting of MiLiC-Eval items; subclasses parse one task's fields.

    ``prompt_style: paper`` (the default) renders prompts as the TriMix authors' evaluation code does:
    every exemplar is a whole block — instruction line, fields, answer — and the item repeats the
    instruction; the wording, field labels, answer separators and exemplars (the first ``n`` items of
    ``train_<exemplar_file>.json`` in file order; classification: the first ``n`` per label, shuffled with
    seed 0) are the paper's, and ``n`` defaults to what its scripts pass (:attr:`paper_shots`: 5 at
    inference and 3 in weight selection; title generation 3 and 3; classification 3 and 1 per label).
    Dialogue passages are not cut, as in the paper. ``compact`` is trimix's own shorter layout (the
    instruction once, then the blocks; seeded exemplars), as the SIB-200 tasks use.
    """

    root: str | Path | None = None
    exemplar_file: int = 1
    prompt_style: Literal["paper", "compact"] = "paper"
    folder: ClassVar[str] = ""
    paper_shots: ClassVar[tuple[int, int]] = (5, 3)  # (inference, weight selection) in the paper's scripts
    paper_answer_space: ClassVar[str] = ""  # after the item's answer label in English prompts
    _paper_exemplars: dict[bool, list[Example]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_style not in ("paper", "compact"):
            raise ValueError(f"prompt_style must be 'paper' or 'compact'; got {self.prompt_style!r}")

    def generation_settings(self) -> dict[str, Any]:
        return super().generation_settings() | {"prompt_style": self.prompt_style}

    def render(self, example: Example, selection: bool = False) -> RenderedPrompt:
        if self.prompt_style == "compact":
            return super().render(example, selection)
        self.start_render(selection)
        instruction = self.paper_instruction()
        answer_sep = "" if self.prompt_lang == "zh" else " "
        head = "".join(
            f"{instruction}\n{self.paper_block(s)}{answer_sep}{self.field(self.answer_text(s), clip=False)}\n\n"
            for s in self.paper_exemplars(selection)
        )
        item_end = "" if self.prompt_lang == "zh" else self.paper_answer_space
        return self.finish_render(f"{head}{instruction}\n", self.paper_block(example) + item_end)

    def paper_exemplars(self, selection: bool = False) -> list[Example]:
        """The paper's exemplars: the first ``n`` items of the exemplar file, in file order."""
        if selection not in self._paper_exemplars:
            n = self.n_shots if self.n_shots is not None else self.paper_shots[int(selection)]
            self._paper_exemplars[selection] = self.examples("train")[:n]
        return self._paper_exemplars[selection]

    def paper_instruction(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def paper_block(self, example: Example) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def paper_name(self, code: str | None = None) -> str:
        return paper_language_name(code or self.lang, self.prompt_lang)

    def _path(self, split: str) -> Path:
        if not self.root:
            raise DataError(
                f"task {self.name!r} needs the MiLiC-Eval data folder: pass root: PATH (holding {self.folder}/<lang>/)"
            )
        name = f"train_{self.exemplar_file}.json" if split == "train" else f"{split}.json"
        return Path(self.root).expanduser() / self.folder / self.lang / name

    def examples(self, split: str) -> list[Example]:
        path = self._path(split)
        parsed = []
        for number, item in enumerate(read_json_items(path), start=1):
            where = f"{path}: item {number}"
            item_id = require(item, "id", (str, int), where)
            parsed.append(self.parse(item, f"{where} (id {item_id})", str(item_id)))
        if not parsed:
            raise DataError(f"{path} holds no items")
        return parsed

    def parse(self, item: dict[str, Any], where: str, item_id: str) -> Example:  # pragma: no cover - abstract
        raise NotImplementedError

    def parse_choice(self, item: dict[str, Any], where: str) -> tuple[list[str], str]:
        options = require(item, "options", list, where)
        if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) and o for o in options):
            raise DataError(f"{where}: field 'options' must list 2-5 non-empty strings; got {options!r}")
        answer = require(item, "answer", str, where).strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise DataError(
                f"{where}: field 'answer' must be a letter A-{LETTERS[len(options) - 1]}; got {answer!r}"
            )
        return options, answer


@dataclass
class MilicReadingComprehension(MultipleChoicePrompt, MilicTask):
    name: ClassVar[str] = "milic_reading_comprehension"
    folder: ClassVar[str] = "reading_comprehension"
    description: ClassVar[str] = "MiLiC-Eval reading comprehension, options A-D (accuracy)"

    def parse(self, item, where, item_id):
        context = require(item, "context", list, where)
        question = require(item, "question", str, where)
        options, answer = self.parse_choice(item, where)
        fields = {"context": "\n".join(map(str, context)), "question": question, "options": options}
        return Example(item_id, fields, answer, tuple(LETTERS[: len(options)]))

    def paper_instruction(self):
        if self.prompt_lang == "zh":
            return f"请阅读以下{self.paper_name()}对话并回答问题。"
        return f"Please read the following {self.paper_name()} dialogue and answer the question."

    def paper_block(self, example):
        return self.choice_block(example, ("Context:", "对话内容："), clip=False)  # dialogues are not cut


@dataclass
class MilicResponseSelection(MilicReadingComprehension):
    name: ClassVar[str] = "milic_response_selection"
    folder: ClassVar[str] = "response_selection"
    description: ClassVar[str] = "MiLiC-Eval response selection, options A-D (accuracy)"

    def parse(self, item, where, item_id):
        context = require(item, "context", list, where)
        options, answer = self.parse_choice(item, where)
        return Example(
            item_id,
            {"context": "\n".join(map(str, context)), "options": options},
            answer,
            tuple(LETTERS[: len(options)]),
        )

    def instruction(self):
        name = language_name(self.lang, self.prompt_lang)
        if self.prompt_lang == "zh":
            return f"选择最适合接在以下{name}对话之后的回复。只输出选项字母。"
        return f"Choose the best response to continue the {name} dialogue; answer with the option letter."

    def paper_instruction(self):
        if self.prompt_lang == "zh":
            return f"请为以下{self.paper_name()}对话选择合适的回答。"
        return f"Please select an appropriate response for the following {self.paper_name()} dialogue."


@dataclass
class MilicTextClassification(MilicTask):
    selection_max_chars: int | None = 384  # the paper's classification budget in weight selection
    name: ClassVar[str] = "milic_text_classification"
    folder: ClassVar[str] = "text_classification"
    kind: ClassVar[str] = "choice"
    default_max_new_tokens: ClassVar[int] = 8
    description: ClassVar[str] = "MiLiC-Eval topic classification; labels in the prompt language (accuracy)"

    def parse(self, item, where, item_id):
        text = require(item, "text", str, where)
        label = require(item, "label", dict, where)
        if not isinstance(label.get(self.prompt_lang), str) or not label[self.prompt_lang]:
            raise DataError(f"{where}: field 'label' has no '{self.prompt_lang}' entry; got {label!r}")
        return Example(item_id, {"text": text}, label[self.prompt_lang])

    def examples(self, split):
        items = super().examples(split)
        # The candidate label set is every distinct label in the test file (as the paper defines it).
        labels = tuple(sorted({e.target for e in super().examples("test")}))
        unknown = [e for e in items if e.target not in labels]
        if unknown:
            raise DataError(
                f"{self._path(split)}: item id {unknown[0].id} has label {unknown[0].target!r}, "
                f"not in the test file's label set {list(labels)}"
            )
        return [Example(e.id, e.fields, e.target, labels) for e in items]

    def shot_labels(self):
        return sorted({e.target for e in self.examples("train")})

    def instruction(self):
        name = language_name(self.lang, self.prompt_lang)
        labels = self.examples("test")[0].choices
        if self.prompt_lang == "zh":
            return f"判断以下{name}文本的类别。候选标签：{'、'.join(labels)}。"
        return f"Classify the following {name} text. Candidate labels: {', '.join(labels)}."

    def block(self, example):
        text = self.field(example.fields["text"])
        return f"文本：{text}\n类别：" if self.prompt_lang == "zh" else f"Text: {text}\nLabel:"

    def paper_exemplars(self, selection=False):
        """The paper's classification exemplars: the first ``n`` of each label (default 3 at inference, 1
        in weight selection) in the exemplar file, shuffled with seed 0. The paper walks the labels in a
        Python set's order, which changes from process to process; trimix walks them sorted."""
        if selection not in self._paper_exemplars:
            n = self.n_shots if self.n_shots is not None else (1 if selection else 3)
            pool, labels = self.examples("train"), self.examples("test")[0].choices
            picked = [e for label in labels for e in [x for x in pool if x.target == label][:n]]
            random.Random(0).shuffle(picked)
            self._paper_exemplars[selection] = picked
        return self._paper_exemplars[selection]

    def paper_instruction(self):
        if self.prompt_lang == "zh":
            return f"请判断以下{self.paper_name()}文本的类别："
        return f"Please classify the following {self.paper_name()} text."

    def paper_block(self, example):
        text = self.field(example.fields["text"])
        labels = ("、" if self.prompt_lang == "zh" else ", ").join(example.choices)
        if self.prompt_lang == "zh":
            return f"文本：{text}\n候选类别：{labels}\n答案："
        return f"Text: {text}\nCandidate labels: {labels}\nAnswer:"


@dataclass
class MilicTitleGeneration(MilicTask):
    name: ClassVar[str] = "milic_title_generation"
    folder: ClassVar[str] = "title_generation_200"
    metric_names: ClassVar[tuple[str, ...]] = ("rouge_l_f",)
    default_max_new_tokens: ClassVar[int] = 64
    description: ClassVar[str] = "MiLiC-Eval title generation for LRL articles (ROUGE-L F1, Unicode-aware)"
    paper_shots: ClassVar[tuple[int, int]] = (3, 3)
    paper_answer_space: ClassVar[str] = " "
    max_chars: int = 256

    def parse(self, item, where, item_id):
        return Example(
            item_id, {"content": require(item, "content", str, where)}, require(item, "title", str, where)
        )

    def instruction(self):
        name = language_name(self.lang, self.prompt_lang)
        if self.prompt_lang == "zh":
            return f"为以下{name}文章写一个{name}标题。"
        return f"Write a title in {name} for the following {name} article."

    def block(self, example):
        content = self.field(example.fields["content"])
        return f"文章：{content}\n标题：" if self.prompt_lang == "zh" else f"Article: {content}\nTitle:"

    def paper_instruction(self):
        if self.prompt_lang == "zh":
            return f"请为以下{self.paper_name()}文章写一个标题。"
        return f"Please write a title for the following article in {self.paper_name()}."

    def paper_block(self, example):
        return self.block(example)


@dataclass
class MilicMath(MilicTask):
    name: ClassVar[str] = "milic_math"
    folder: ClassVar[str] = "math"
    default_max_new_tokens: ClassVar[int] = 256
    description: ClassVar[str] = "MiLiC-Eval math word problems; the last number of the output (accuracy)"
    paper_answer_space: ClassVar[str] = " "

    def parse(self, item, where, item_id):
        question = require(item, "question", str, where)
        answer = require(item, "answer", (str, int, float), where)
        if last_number(str(answer)) is None:
            raise DataError(f"{where}: field 'answer' must be a number; got {answer!r}")
        cot = item.get("cot") or {}
        return Example(item_id, {"question": question, "cot": cot}, str(answer))

    def answer_text(self, example):
        cot = example.fields["cot"].get(self.prompt_lang) if isinstance(example.fields["cot"], dict) else None
        return cot or example.target

    def instruction(self):
        name = language_name(self.lang, self.prompt_lang)
        if self.prompt_lang == "zh":
            return f"解答以下{name}数学题，逐步推理并给出最终数字答案。"
        return f"Solve the following math problem written in {name}. Reason step by step and end with the number."

    def block(self, example):
        q = self.field(example.fields["question"], clip=False)
        return (
            f"题目：{q}\n逐步解答：" if self.prompt_lang == "zh" else f"Problem: {q}\nStep-by-step solution:"
        )

    def paper_instruction(self):
        if self.prompt_lang == "zh":
            return f"请分步解答下面的{self.paper_name()}数学问题。"
        return f"Please solve the following {self.paper_name()} math problem step by step."

    def paper_block(self, example):
        q = self.field(example.fields["question"], clip=False)
        return (
            f"问题：{q}\n分步解答：" if self.prompt_lang == "zh" else f"Problem: {q}\nStep-by-step solution:"
        )

    def extract(self, generated):
        value = last_number(generated.strip().split("\n\n")[0])
        return "" if value is None else f"{value:g}"

    def is_correct(self, prediction, example):
        gold, guess = last_number(example.target), last_number(prediction)
        return guess is not None and gold is not None and abs(guess - gold) < 1e-6


@dataclass
class MilicTranslation(TranslationPrompt, MilicTask):
    """MiLiC-Eval translation; ``source`` and ``target`` are language codes present in the items."""

    name: ClassVar[str] = "milic_translation"
    folder: ClassVar[str] = "translation_dialogue"
    metric_names: ClassVar[tuple[str, ...]] = ("chrf_pp", "bleu")
    default_max_new_tokens: ClassVar[int] = 200
    unit: ClassVar[tuple[str, str]] = ("text", "文本")
    description: ClassVar[str] = "MiLiC-Eval translation between the LRL and en/zh (chrF++, BLEU)"
    paper_answer_space: ClassVar[str] = " "
    source: str | None = None
    target: str = "en"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.source or self.lang, self.target)

    def parse(self, item, where, item_id):
        src, tgt = self.pair
        return Example(item_id, {"source": require(item, src, str, where)}, require(item, tgt, str, where))

    def paper_instruction(self):
        src, tgt = (self.paper_name(c) for c in self.pair)
        if self.prompt_lang == "zh":
            return f"请将下面的{src}文本翻译成{tgt}。"
        return f"Please translate the following {src} text into {tgt}."

    def paper_block(self, example):
        src, tgt = (self.paper_name(c) for c in self.pair)
        sep = "：" if self.prompt_lang == "zh" else ": "
        return f"{src}{sep}{self.field(example.fields['source'], clip=False)}\n{tgt}{sep.rstrip()}"
