"""GGUF sources run by llama.cpp (``backend: llama_cpp``), behind the core of the backend protocol.

llama.cpp decodes a GGUF file as it is (quantized weights, a lean C++ loop) instead of dequantising it
for transformers. One llama.cpp context serves a source: each row of a decoding state is a llama.cpp
**sequence** (its own id in a KV cache all sequences share), so a batch of rows is one ``llama_decode``
call whatever their lengths; rolling a row back (speculation) and dropping finished rows remove that
sequence's cache cells; new rows take free sequence ids (continuous batching). Full-vocabulary logits
are read for every position that asks for them.

The tokenizer is the Hugging Face tokenizer read from the same GGUF file (so the source fuses with
transformers sources of the same vocabulary), checked at load against llama.cpp's own tokenisation of
probe texts. Optional capabilities: ``"fork"`` (a forked row's sequence shares its source's cache cells)
and ``"selected"`` (llama.cpp computes the output head only at the positions a caller reads, which the
weight search and log-likelihood scoring ask for); no hidden states (the scorer keeps the logits of the
scored positions) and no preallocated caches (the eager engine runs it).

Settings (``backend_options`` of the source): ``n_ctx`` (KV cells shared by all rows, default 8192),
``n_seq_max`` (most rows at once, default 64), ``n_threads`` (default: the machine's cores),
``n_batch`` (tokens per ``llama_decode``, default 512), ``kv_type`` (``f16``, llama.cpp's default, or
``f32``: keys, values and attention at full precision, as transformers computes them), ``prompt_cache``
(how many recent prompts keep their cache cells, default 32; 0: none).

**Prompt cache.** A prefilled prompt stays in the KV cache as a sequence of its own (its cells shared
with the row, so it costs no cell until the row leaves); a later prompt that starts with at least
``REUSE_MIN`` of its tokens copies those cells instead of recomputing them — the same prompts decoded
under several fusions, weight vectors or requests with one system prompt prefill once. The least
recently used prompt goes first; all of them go when the cache has no cell left for a decode. Note:
llama.cpp's quantized kernels are not batch-invariant (a position's logits depend slightly on how many
tokens one call computes), so a reused prompt's logits may differ from a fresh prefill's in the last
digits, as two batch sizes' do.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trimix.backends.base import FORK, SELECTED
from trimix.backends.prompt_cache import PromptCache
from trimix.errors import ConfigError, SourceLoadError

logger = logging.getLogger(__name__)

PROBES = ("Hello world, 123", " ئۇيغۇر تىلى", "  two  spaces\nnew line", "བོད་ཡིག", "中文 text")
OPTIONS = {
    "n_ctx": 8192,
    "n_seq_max": 64,
    "n_threads": None,
    "n_batch": 512,
    "kv_type": "f16",
    "prompt_cache": 32,
}
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
KV_TYPES = {"f16": 1, "f32": 0}  # ggml's type ids: the KV cache's precision


def available() -> bool:
    """Whether ``llama-cpp-python`` is installed (the ``llama-cpp`` extra)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LlamaCppState:
    """The rows of a decoding state: each row's llama.cpp sequence id and its length in tokens."""

    seqs: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def next_position(self) -> torch.Tensor:
        return torch.tensor(self.lengths, dtype=torch.long)


class LlamaCppBackend:
    """A GGUF model in a llama.cpp context (see the module docstring).

    Args:
        gguf_path: the model file.
        tokenizer: its Hugging Face tokenizer (read from the same file).
        options: ``n_ctx``, ``n_seq_max``, ``n_threads``, ``n_batch``.

    Raises:
        SourceLoadError: llama-cpp-python is missing, the file does not load, or its tokenisation differs
            from the tokenizer's.
    """

    capabilities = frozenset({FORK, SELECTED})

    def __init__(self, gguf_path: str | Path, tokenizer: Any, options: dict[str, Any] | None = None) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise SourceLoadError(
                "backend llama_cpp needs llama-cpp-python: pip install 'trimix[llama-cpp]' (it builds llama.cpp)"
            ) from exc
        unknown = sorted(set(options or {}) - set(OPTIONS))
        if unknown:
            raise SourceLoadError(
                f"unknown backend_options {unknown} for llama_cpp; it takes {', '.join(OPTIONS)}"
            )
        settings = {**OPTIONS, **(options or {})}
        self.lib, self.tokenizer, self.path = llama_cpp, tokenizer, Path(gguf_path)
        _route_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise SourceLoadError(f"llama.cpp could not load {self.path}")
        threads = int(settings["n_threads"] or os.cpu_count() or 1)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = int(settings["n_ctx"])
        params.n_batch = params.n_ubatch = int(settings["n_batch"])
        rows, kept = int(settings["n_seq_max"]), int(settings["prompt_cache"])
        if rows < 1 or kept < 0 or rows + kept > MAX_SEQUENCES:
            raise SourceLoadError(
                f"backend_options: n_seq_max ({rows}) + prompt_cache ({kept}) must be 1..{MAX_SEQUENCES} "
                "(llama.cpp's most sequences)"
            )
        params.n_seq_max = rows + kept
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # every row draws cells from one cache of n_ctx cells
        if settings["kv_type"] not in KV_TYPES:
            raise SourceLoadError(
                f"backend_options.kv_type must be one of {', '.join(KV_TYPES)}; got {settings['kv_type']!r}"
            )
        params.type_k = params.type_v = KV_TYPES[settings["kv_type"]]
        if settings["kv_type"] == "f32":  # flash attention would round queries and keys to f16
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        if not self.context:
            raise SourceLoadError(f"llama.cpp could not create a context for {self.path} ({settings})")
        self.memory = llama_cpp.llama_get_memory(self.context)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_batch = int(settings["n_batch"])
        self.free = list(range(rows - 1, -1, -1))  # sequence ids not in use by rows
        self.prompts = PromptCache(llama_cpp, self.memory, range(rows, rows + kept))
        self._finalizer = weakref.finalize(self, _free, llama_cpp, self.model, self.context)
        self._check_tokenizer()
        logger.info(
            "llama.cpp: %s (%d tokens, %d KV cells for up to %d rows, %d threads)",
            self.path.name,
            self.n_vocab,
            params.n_ctx,
            rows,
            threads,
        )

    # ---------------------------------------------------------------- properties
    @property
    def logit_rows(self) -> int:
        return self.n_vocab

    @property
    def max_positions(self) -> int | None:
        return int(self.lib.llama_model_n_ctx_train(self.model)) or None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {int(self.lib.llama_vocab_eos(self.vocab)), int(self.lib.llama_vocab_eot(self.vocab))}
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(i for i in ids if i >= 0)

    @property
    def num_parameters(self) -> int:
        return int(self.lib.llama_model_n_params(self.model))

    # ---------------------------------------------------------------- the protocol's core
    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, LlamaCppState]:
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        if not all(prompts):
            raise ValueError("every row of a prefill needs at least one token")
        state = self._new_state(len(prompts))
        rows = [
            prompt[self.prompts.reuse(seq, prompt) :] for seq, prompt in zip(state.seqs, prompts, strict=True)
        ]
        for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            state.lengths[b] = len(prompt) - len(row)
        wanted = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.bool)
        for b, row in enumerate(rows):
            wanted[b, len(row) - 1] = True
        logits = self._decode(state, rows, wanted)
        for seq, prompt in zip(state.seqs, prompts, strict=True):
            self.prompts.remember(seq, prompt)
        return logits, state

    @torch.inference_mode()
    def advance(
        self, state: LlamaCppState, tokens: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        valid = torch.ones(tokens.shape, dtype=torch.bool) if valid is None else valid.bool().cpu()
        out = torch.zeros(*tokens.shape, self.n_vocab)
        out[valid] = self.advance_selected(state, tokens, valid, valid)
        return out

    @torch.inference_mode()
    def advance_selected(
        self, state: LlamaCppState, tokens: torch.Tensor, valid: torch.Tensor | None, outputs: torch.Tensor
    ) -> torch.Tensor:
        """Capability ``"selected"``: llama.cpp computes (and copies out) only the logits asked for."""
        valid = torch.ones(tokens.shape, dtype=torch.bool) if valid is None else valid.bool().cpu()
        rows = [row[keep].tolist() for row, keep in zip(tokens.cpu(), valid, strict=True)]
        wanted = torch.zeros(len(rows), max([len(r) for r in rows] + [1]), dtype=torch.bool)
        for b, (keep, asked) in enumerate(zip(valid, outputs.cpu().bool(), strict=True)):
            wanted[b, : int(keep.sum())] = asked[keep]
        return self._decode(state, rows, wanted)

    def fork(self, state: LlamaCppState, repeats: int) -> LlamaCppState:
        """Capability ``"fork"``: each new sequence shares its source row's cache cells (no copy)."""
        forked = self._new_state(state.batch_size * repeats)
        for i, (seq, length) in enumerate(
            (seq, length)
            for seq, length in zip(state.seqs, state.lengths, strict=True)
            for _ in range(repeats)
        ):
            self.lib.llama_memory_seq_cp(self.memory, seq, forked.seqs[i], -1, -1)
            forked.lengths[i] = length
        return forked

    def take(self, state: LlamaCppState, rows: torch.Tensor) -> LlamaCppState:
        """A new state whose sequences share the cells of ``rows`` (repeats allowed); ``state`` is unchanged
        (a byte-level source continues several tokenizations from one row this way)."""
        picked = rows.tolist()
        taken = self._new_state(len(picked))
        for i, b in enumerate(picked):
            self.lib.llama_memory_seq_cp(self.memory, state.seqs[b], taken.seqs[i], -1, -1)
            taken.lengths[i] = state.lengths[b]
        return taken

    def crop(self, state: LlamaCppState, lengths: torch.Tensor) -> None:
        for b, keep in enumerate(lengths.tolist()):
            if keep < state.lengths[b]:
                if not self.lib.llama_memory_seq_rm(self.memory, state.seqs[b], int(keep), -1):
                    raise RuntimeError(
                        f"llama.cpp could not roll sequence {state.seqs[b]} back to {keep} tokens"
                    )
                state.lengths[b] = int(keep)

    def keep_rows(self, state: LlamaCppState, rows: torch.Tensor) -> None:
        kept = rows.tolist()
        for b in sorted(set(range(state.batch_size)) - set(kept)):
            self._release(state.seqs[b])
        state.seqs[:] = [state.seqs[b] for b in kept]  # in place: the state's finalizer holds this list
        state.lengths[:] = [state.lengths[b] for b in kept]

    def insert_rows(self, state: LlamaCppState, new: LlamaCppState) -> None:
        state.seqs += new.seqs
        state.lengths += new.lengths
        new.seqs.clear()  # the rows now belong to ``state`` (in place: ``new``'s finalizer releases nothing)
        new.lengths.clear()

    def compact(self, state: LlamaCppState) -> None:
        """Nothing to do: llama.cpp reuses the cells of removed sequences."""

    # ---------------------------------------------------------------- internals
    def _new_state(self, rows: int) -> LlamaCppState:
        if rows > len(self.free):
            raise ConfigError(
                f"llama.cpp source {self.path.name}: {rows} new rows but only {len(self.free)} free sequences; "
                "raise backend_options.n_seq_max or lower the batch size"
            )
        state = LlamaCppState([self.free.pop() for _ in range(rows)], [0] * rows)
        weakref.finalize(state, _release_all, weakref.ref(self), state.seqs)
        return state

    def _release(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free.append(seq)

    def _decode(self, state: LlamaCppState, rows: Sequence[list[int]], wanted: torch.Tensor) -> torch.Tensor:
        """Feed each row its tokens (in batches of at most ``n_batch`` tokens); the logits after the fed
        tokens ``wanted`` ``(B, k)`` marks, row by row, ``(wanted.sum(), R)``."""
        lib = self.lib
        items = [(b, j, token) for b, tokens in enumerate(rows) for j, token in enumerate(tokens)]
        order = torch.zeros_like(wanted, dtype=torch.long)
        order[wanted] = torch.arange(int(wanted.sum()))  # row-major: where each asked position's row goes
        out = torch.empty(int(wanted.sum()), self.n_vocab)
        wanted_at, order_at = wanted.tolist(), order.tolist()  # read per token below: lists, not tensors
        target = out.numpy()
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            batch = lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                asked = []
                for i, (b, j, token) in enumerate(chunk):
                    batch.token[i] = int(token)
                    batch.pos[i] = state.lengths[b] + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = state.seqs[b]
                    batch.logits[i] = int(wanted_at[b][j])
                    if wanted_at[b][j]:
                        asked.append((i, order_at[b][j]))
                code = lib.llama_decode(self.context, batch)
                if code == 1 and self.prompts:  # no free cell: the prompt cache's cells go first
                    self.prompts.forget()
                    code = lib.llama_decode(self.context, batch)
                if code != 0:
                    self._roll_back(state)  # the chunks decoded before this one leave the cache too
                    raise _decode_error(code, len(chunk), int(lib.llama_n_ctx(self.context)))
                for i, slot in asked:
                    pointer = lib.llama_get_logits_ith(self.context, i)
                    target[slot] = np.ctypeslib.as_array(
                        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
                    )
            finally:
                lib.llama_batch_free(batch)
        for b, tokens in enumerate(rows):
            state.lengths[b] += len(tokens)
        return out

    def _roll_back(self, state: LlamaCppState) -> None:
        """Remove every cell a failed decode call added to the state's sequences (positions from each row's
        length on), so the state is as it was before the call."""
        for seq, length in zip(state.seqs, state.lengths, strict=True):
            self.lib.llama_memory_seq_rm(self.memory, seq, int(length), -1)

    def _check_tokenizer(self) -> None:
        """The Hugging Face tokenizer must read text as llama.cpp does, or fused token ids would disagree."""
        if len(self.tokenizer) > self.n_vocab:
            raise SourceLoadError(
                f"{self.path.name}: the tokenizer has {len(self.tokenizer)} tokens, llama.cpp's vocabulary {self.n_vocab}"
            )
        for text in PROBES:
            ours = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = self._llama_tokenize(text)
            if ours != theirs:
                raise SourceLoadError(
                    f"{self.path.name}: llama.cpp tokenises {text!r} as {theirs[:12]}, the tokenizer as {ours[:12]}; "
                    "the source cannot be fused by token ids (use backend: hf)"
                )

    def _llama_tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (self.lib.llama_token * size)()
        count = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, size, False, False)
        return list(buffer[:count])


def _decode_error(code: int, tokens: int, cells: int) -> Exception:
    """llama_decode's return code as a message: 1 a full KV cache (a setting), anything else a failure."""
    if code == 1:
        return ConfigError(
            f"llama.cpp could not decode {tokens} tokens: the KV cache of {cells} cells is full; "
            "raise backend_options.n_ctx or lower the batch size"
        )
    return RuntimeError(f"llama.cpp could not decode {tokens} tokens (llama_decode returned {code})")


_LOG_CALLBACK: Any = None  # kept alive: llama.cpp calls it from C


def _route_logs(lib: Any) -> None:
    """llama.cpp's own log (model loading, cache sizes) to this module's logger: warnings and errors at
    WARNING, the rest at DEBUG, instead of pages on stderr."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 3 warn, 4 error, 5 continued

    def forward(level: int, text: bytes, _: Any) -> None:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            logger.log(levels.get(level, logging.DEBUG), "llama.cpp: %s", message)

    _LOG_CALLBACK = lib.llama_log_callback(forward)
    lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _release_all(owner: weakref.ref, seqs: list[int]) -> None:
    """A state that was dropped without ``keep_rows([])``: give its sequences back."""
    backend = owner()
    if backend is not None:
        for seq in list(seqs):
            backend._release(seq)


def _free(lib: Any, model: Any, context: Any) -> None:
    lib.llama_free(context)
    lib.llama_model_free(model)
