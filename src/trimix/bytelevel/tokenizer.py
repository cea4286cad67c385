"""The fused vocabulary of byte-level fusion: the 256 bytes, end-of-sequence and a start marker.

It answers the calls the decoding core, the scorer and the server make of a tokenizer (encode with
offsets, decode, special ids, the chat template of the source it stands in for). Ids 0-255 are the
bytes of the UTF-8 text; :data:`END` (256) ends it; :data:`START` (257) is prepended when a caller
asks for special tokens and tells a byte-level source to add its own tokenizer's (BOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trimix.bytelevel.marginal import BYTE_VOCAB, END

START = 257


def _byte_name(b: int) -> str:
    return chr(b) if 0x21 <= b <= 0x7E else f"<0x{b:02X}>"


class ByteTokenizer:
    """UTF-8 bytes as token ids, standing in for a source's own tokenizer (``inner``)."""

    eos_token = "</s>"
    bos_token = "<s>"
    unk_token = None
    unk_token_id = None
    eos_token_id = END
    bos_token_id = START
    padding_side = "left"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pad_token: str | None = self.eos_token
        self.name_or_path = f"bytes:{getattr(inner, 'name_or_path', '')}"

    # -------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        return BYTE_VOCAB

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else (END if self.pad_token == self.eos_token else START)

    @property
    def all_special_ids(self) -> list[int]:
        return [END, START]

    @property
    def chat_template(self) -> str | None:
        return getattr(self.inner, "chat_template", None)

    def get_vocab(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.convert_ids_to_tokens(list(range(BYTE_VOCAB))))}

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        def name(i: int) -> str:
            return self.eos_token if i == END else self.bos_token if i == START else _byte_name(i)

        return name(int(ids)) if isinstance(ids, int) else [name(int(i)) for i in ids]

    # -------------------------------------------------------------- encode
    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        return ([START] if add_special_tokens else []) + list(text.encode("utf-8"))

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        return_tensors: str | None = None,
        return_offsets_mapping: bool = False,
        padding_side: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens) for t in texts]
        offsets = [self._offsets(t, add_special_tokens) for t in texts] if return_offsets_mapping else None
        mask = [[1] * len(r) for r in ids]
        if padding or return_tensors == "pt":
            width = max((len(r) for r in ids), default=0)
            pad = END
            left = (padding_side or self.padding_side) == "left"
            ids = [([pad] * (width - len(r)) + r) if left else (r + [pad] * (width - len(r))) for r in ids]
            mask = [([0] * (width - len(m)) + m) if left else (m + [0] * (width - len(m))) for m in mask]
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if offsets is not None:
            out["offset_mapping"] = offsets
        if return_tensors == "pt":
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        elif single:
            out = {k: v[0] for k, v in out.items()}
        return out

    @staticmethod
    def _offsets(text: str, add_special_tokens: bool) -> list[tuple[int, int]]:
        """Each byte's character span (all bytes of one character share it); ``(0, 0)`` for START."""
        spans = [(0, 0)] if add_special_tokens else []
        for i, ch in enumerate(text):
            spans += [(i, i + 1)] * len(ch.encode("utf-8"))
        return spans

    # -------------------------------------------------------------- decode
    def decode(
        self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False, **_: Any
    ) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out, run = [], bytearray()
        for i in ids:
            if int(i) < 256:
                run.append(int(i))
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.convert_ids_to_tokens(int(i)))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(
        self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False, **kw: Any
    ) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens, **kw) for r in rows]

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """The source's own chat template, rendered as text (tokenised here when asked for ids)."""
        tokenize = kwargs.pop("tokenize", True)
        text = self.inner.apply_chat_template(*args, tokenize=False, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, folder: Any) -> None:
        raise NotImplementedError("a byte-level fusion has no tokenizer files to save; save the sources'")
