"""The data shipped with trimix (SIB-200 for 10 languages, a Uyghur corpus) and their readers.

See README.md in this folder for sources and licenses (CC BY-SA 4.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trimix.errors import DataError
from trimix.io import read_documents, read_text

DATA_DIR = Path(__file__).parent
SIB200_DIR = DATA_DIR / "sib200"
UYGHUR_CORPUS = DATA_DIR / "corpora" / "uig_udt.txt"
SIB200_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class SibRow:
    """One SIB-200 example: a FLORES sentence and its topic."""

    index_id: str
    category: str
    text: str
    where: str = ""  # file:line, for messages


def _root(root: Path | str | None) -> Path:
    if root is None:
        return SIB200_DIR
    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"SIB-200 data folder {str(folder)!r} is a file; `root` names the folder that holds labels.txt and "
            "one folder per language (LANG/test.tsv)"
        )
    if not folder.is_dir():
        raise DataError(
            f"SIB-200 data folder {str(folder)!r} does not exist (relative paths are relative to the config file "
            "when they start with ./, else to the working directory)"
        )
    return folder


def sib200_languages(root: Path | str | None = None) -> list[str]:
    """Language codes (FLORES style, e.g. ``uig_Arab``) available under ``root``."""
    return sorted(p.name for p in _root(root).iterdir() if (p / "test.tsv").is_file())


def sib200_labels(root: Path | str | None = None) -> list[str]:
    """The 7 topic labels, in file order."""
    path = _root(root) / "labels.txt"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: a SIB-200 folder needs labels.txt (one topic label per line)"
        )
    return [line.strip() for line in read_text(path, "SIB-200 labels file").splitlines() if line.strip()]


def read_sib200(lang: str, split: str, root: Path | str | None = None) -> list[SibRow]:
    """Read one SIB-200 split (tab-separated, no quoting: texts contain quote characters).

    Raises:
        DataError: unknown language or split, or a malformed row (file, line and field named).
    """
    root = _root(root)
    if split not in SIB200_SPLITS:
        raise DataError(f"SIB-200 split must be one of {', '.join(SIB200_SPLITS)}; got {split!r}")
    path = root / lang / f"{split}.tsv"
    if not path.is_file():
        raise DataError(
            f"no SIB-200 data for language {lang!r} at {path}; available: {', '.join(sib200_languages(root))}"
        )
    lines = read_text(path, "SIB-200 file").splitlines()
    if not lines or lines[0].split("\t") != ["index_id", "category", "text"]:
        raise DataError(f"{path}:1: expected the header 'index_id<TAB>category<TAB>text'")
    rows = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{path}:{number}: expected 3 tab-separated fields, found {len(parts)}")
        index_id, category, text = (p.strip() for p in parts)
        for field, value in (("index_id", index_id), ("category", category), ("text", text)):
            if not value:
                raise DataError(f"{path}:{number}: field '{field}' is empty")
        if index_id in seen:
            raise DataError(
                f"{path}:{number}: index_id {index_id!r} repeats line {seen[index_id]}; ids must be unique "
                "(results are keyed by them)"
            )
        seen[index_id] = number
        rows.append(SibRow(index_id, category, text, f"{path}:{number}"))
    return rows


def sib200_spec(name: str) -> tuple[str, str] | None:
    """``(lang, split)`` of a ``sib200:LANG:SPLIT`` text name; None for any other name (a file path).

    Raises:
        DataError: a ``sib200:`` name of another shape or split.
    """
    if not name.startswith("sib200:"):
        return None
    parts = name.split(":")
    if len(parts) != 3 or parts[2] not in SIB200_SPLITS:
        raise DataError(
            f"text {name!r}: write sib200:LANG:SPLIT with SPLIT one of {', '.join(SIB200_SPLITS)}, "
            "e.g. sib200:eng_Latn:dev"
        )
    return parts[1], parts[2]


def read_text_spec(spec: str | Path, limit: int | None = None) -> list[str]:
    """Texts named by ``sib200:LANG:SPLIT`` (the bundled SIB-200 sentences) or a text/JSONL file path."""
    name = str(spec)
    bundled = sib200_spec(name)
    texts = [row.text for row in read_sib200(*bundled)] if bundled else read_documents(name)
    return texts if limit is None else texts[:limit]
