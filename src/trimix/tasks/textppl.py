"""Raw-text perplexity of the fused model on a text file (one document per line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trimix.errors import DataError
from trimix.io import read_documents
from trimix.tasks.base import Example, Task


@dataclass
class TextPerplexity(Task):
    """Each line of ``path`` is scored from its BOS; the cell's values are the perplexity per token of
    the fused vocabulary (per byte under byte-level fusion) and bits per byte (total NLL over the lines'
    UTF-8 bytes, in bits), which compares models whose tokenizers differ.

    ``dev_path`` holds other text of the same kind for weight selection; without it the task has no dev
    split, so selected weights are refused rather than chosen on the evaluated lines.
    """

    path: str | None = None
    dev_path: str | None = None
    name: ClassVar[str] = "text_ppl"
    kind: ClassVar[str] = "perplexity"
    metric_names: ClassVar[tuple[str, ...]] = ("perplexity", "bits_per_byte")
    description: ClassVar[str] = "perplexity of the (fused) model on a raw text file (lower is better)"

    def examples(self, split: str) -> list[Example]:
        if not self.path:
            raise DataError("task 'text_ppl' needs path: FILE (a text file, one document per line)")
        if split in {"dev", "train"}:
            if not self.dev_path:
                raise DataError(
                    "task 'text_ppl' has no dev split: give options.dev_path (other text of the same kind) to select "
                    "weights for it, or evaluate it with fixed weights"
                )
            return [
                Example(f"dev{i + 1}", {"text": t}, "") for i, t in enumerate(read_documents(self.dev_path))
            ]
        return [Example(f"line{i + 1}", {"text": t}, "") for i, t in enumerate(read_documents(self.path))]

    def instruction(self) -> str:
        return ""

    def block(self, example: Example) -> str:
        return self.field(example.fields["text"], clip=False)
