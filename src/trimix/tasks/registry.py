"""Tasks by name: ``get_task("sib200_topic", lang="uig_Arab")``."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from trimix.errors import ConfigError
from trimix.tasks.base import Task
from trimix.tasks.belebele import Belebele
from trimix.tasks.milic import (
    MilicMath,
    MilicReadingComprehension,
    MilicResponseSelection,
    MilicTextClassification,
    MilicTitleGeneration,
    MilicTranslation,
)
from trimix.tasks.sib200 import Sib200Topic, Sib200Translation
from trimix.tasks.textppl import TextPerplexity

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        Sib200Topic,
        Sib200Translation,
        MilicReadingComprehension,
        MilicResponseSelection,
        MilicTextClassification,
        MilicTitleGeneration,
        MilicMath,
        MilicTranslation,
        Belebele,
        TextPerplexity,
    )
}


def get_task(name: str, lang: str, **options: Any) -> Task:
    """Instantiate a registered task for a language.

    Raises:
        ConfigError: unknown task name (with the closest match) or option.
    """
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown task {name!r}.{hint} Available: {', '.join(sorted(TASKS))} (see `trimix ls tasks`)"
        )
    cls = TASKS[name]
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "lang"]
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"task {name!r} has no option {option!r}{hint} Its options: {', '.join(known) or 'none'}"
            )
    try:
        return cls(lang=lang, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"task {name!r}: {exc}") from exc
