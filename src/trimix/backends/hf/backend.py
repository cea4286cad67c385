"""The transformers backend: :class:`HFBackend` (the core protocol, hidden states, fork)."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from trimix.backends import attention
from trimix.backends.base import FORK, HIDDEN, STATIC
from trimix.backends.hf.state import ColumnCursor, HFState, SlotLayer, attention_bias, shifted
from trimix.backends.hf.static import InPlaceSteps
from trimix.errors import SourceLoadError

logger = logging.getLogger(__name__)

_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_SUPPORTED_ATTENTION = ("sdpa", "eager", attention.NAME)
_PROBE_TEXT = "TriMix probe: the quick brown fox 123. ئۇيغۇرچە"


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The keyword ``decoder``'s forward takes the cache by.

    transformers renamed ``past_key_values`` to ``cache`` during 5.x (5.25 names ``cache`` and warns, with a
    FutureWarning, on ``past_key_values``; 5.17 knows only ``past_key_values``), and a family's forward may lag
    behind. So ask the forward itself: ``cache`` where its signature names it, else ``past_key_values``.
    """
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _layer_windows(model: PreTrainedModel) -> tuple[dict[str, int | None], bool]:
    """Attention layer type -> sliding window (None: full), and whether the model takes a dict of masks."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        unknown = sorted(set(layer_types) - set(_SUPPORTED_LAYER_TYPES))
        if unknown:
            raise SourceLoadError(
                f"{type(model).__name__} has attention layers of type {unknown}, which trimix's backend does not "
                f"mask (it supports {', '.join(_SUPPORTED_LAYER_TYPES)}); please report this model family"
            )
        return {t: (window if t == "sliding_attention" else None) for t in sorted(set(layer_types))}, True
    use_window = bool(window) and getattr(config, "use_sliding_window", True)
    return {"full_attention": window if use_window else None}, False


class HFBackend(InPlaceSteps):
    """A loaded transformers causal LM (or a PEFT model around one) as a trimix source backend.

    Args:
        model: the model, in eval mode, with ``sdpa`` or ``eager`` attention.
        tokenizer: its tokenizer.
        verify: check once, on a short probe, that trimix's masks and head reproduce the model's forward.

    Raises:
        SourceLoadError: an attention implementation or layer type trimix cannot mask, or a model whose
            logits the backend does not reproduce.
    """

    capabilities = frozenset({HIDDEN, STATIC, FORK})

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, verify: bool = True
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        config = model.config.get_text_config()
        implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        if implementation not in _SUPPORTED_ATTENTION:
            raise SourceLoadError(
                f"{type(model).__name__} uses attention {implementation!r}; trimix passes explicit masks, which need "
                f"{' or '.join(_SUPPORTED_ATTENTION)} (load it with attn_implementation='sdpa')"
            )
        if implementation == "sdpa" and self._on_cuda(model):
            use_grouped_attention(model)
        self.windows, self.mask_dict = _layer_windows(model)
        self.num_layers = int(config.num_hidden_layers)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.decoder = model.get_decoder()
        self.cache_keyword = cache_keyword(self.decoder)
        self._compiled: Any = None
        if verify:
            self._verify()

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def logit_rows(self) -> int:
        head = self.model.get_output_embeddings()
        if head is not None and hasattr(head, "weight"):
            return int(head.weight.shape[0])
        return int(self.model.config.get_text_config().vocab_size)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(value) if value else None

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids: the tokenizer's and the model's generation config's."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if configured is not None:
            ids.update([configured] if isinstance(configured, int) else configured)
        return sorted(ids)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---------------------------------------------------------------- the interface
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capacity: int | None = None,
        *,
        hidden: bool = False,
        into: HFState | None = None,
    ) -> tuple[torch.Tensor, HFState]:
        """Run a left-padded batch; return the last position's logits ``(B, R)`` (or every position's
        final hidden states ``(B, L, H)`` with ``hidden``) and the state.

        ``into`` reuses a preallocated state of the same batch size: its tensors keep their addresses
        (a CUDA graph captured on them stays valid) and only their contents are replaced.
        """
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).bool()
        batch, width = input_ids.shape
        if into is not None:
            if not into.is_static or into.batch_size != batch:
                raise ValueError("prefill(into=...) needs a preallocated state of the same batch size")
            state, capacity = into, into.capacity
            state.valid.zero_()
            state.positions.zero_()
            state.length = 0
        else:
            state = self._empty_state(batch, capacity)
        if capacity is not None and width > capacity:
            raise ValueError(f"a prompt of {width} columns does not fit a cache of {capacity}")
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        states = self._forward(state, input_ids, mask, positions)
        if into is not None:
            state.next_position.copy_(mask.sum(-1))
        else:
            state.next_position = mask.sum(-1)
        if hidden:
            return states, state
        return self.head_logits(states[:, -1]), state

    @torch.inference_mode()
    def advance(
        self, state: HFState, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, hidden: bool = False
    ) -> torch.Tensor:
        """Feed ``(B, k)`` tokens; ``valid`` ``(B, k)`` marks right padding (rows fed fewer tokens).

        Returns:
            Logits ``(B, k, R)`` after each token, or final hidden states ``(B, k, H)`` with ``hidden``.
        """
        tokens = tokens.to(self.device)
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.to(self.device).bool()
        positions = state.next_position[:, None] + valid.long().cumsum(-1) - 1
        states = self._forward(state, tokens, valid, positions)
        state.next_position = state.next_position + valid.sum(-1)
        return states if hidden else self.head_logits(states)

    @torch.inference_mode()
    def crop(self, state: HFState, lengths: torch.Tensor) -> None:
        """Keep the first ``lengths[b]`` tokens of row b (``lengths <= next_position``)."""
        lengths = lengths.to(state.next_position.device)
        if bool((lengths > state.next_position).any()):
            raise ValueError("crop can only shorten rows")
        keep = state.valid & (state.positions < lengths[:, None])
        used = keep.any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 0
        if state.is_static:
            state.valid.copy_(keep)
        else:
            state.valid, state.positions = keep[:, :length], state.positions[:, :length]
            for layer in state.cache.layers:
                if layer.is_initialized:
                    layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        state.length = length
        if state.is_static:  # in place: a captured graph keeps reading the same tensor
            state.next_position.copy_(lengths)
        else:
            state.next_position = lengths.clone()

    @torch.inference_mode()
    def keep_rows(self, state: HFState, rows: torch.Tensor) -> None:
        rows = rows.to(state.valid.device)
        state.cache.batch_select_indices(rows)
        state.valid, state.positions = state.valid[rows], state.positions[rows]
        state.next_position = state.next_position[rows]

    @torch.inference_mode()
    def compact(self, state: HFState) -> None:
        """Drop the leading columns that no row holds a token in.

        A long-lived batch (the server's) gains columns whenever a row joins with a longer history than
        the others; without this, its cache would grow for as long as requests keep arriving. Masks
        speak of positions, so dropping unused columns changes nothing else. A preallocated cache
        keeps its layout.
        """
        if state.capacity is not None or state.length == 0:
            return
        used = state.valid[:, : state.length].any(dim=0)
        first = int(used.int().argmax()) if bool(used.any()) else state.length
        if first == 0:
            return
        for layer in state.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        state.valid, state.positions = state.valid[:, first:], state.positions[:, first:]
        state.length -= first

    @torch.inference_mode()
    def insert_rows(self, state: HFState, new: HFState) -> None:
        """Append ``new``'s rows. Column layouts may differ: the state with fewer used columns is shifted
        right by invalid columns (masks speak of positions, not columns, so nothing else changes)."""
        length = max(state.length, new.length)
        width = max(state.capacity or 0, new.capacity or 0) or None
        if width is not None and length > width:
            raise ValueError(f"rows of {length} columns do not fit a cache of {width}")
        mine = shifted(state, length - state.length, width or length)
        theirs = shifted(new, length - new.length, width or length)
        for i, layer in enumerate(state.cache.layers):
            layer.keys = torch.cat([mine[0][2 * i], theirs[0][2 * i]])
            layer.values = torch.cat([mine[0][2 * i + 1], theirs[0][2 * i + 1]])
            if isinstance(layer, SlotLayer):
                layer.capacity = width
        state.valid = torch.cat([mine[1], theirs[1]])
        state.positions = torch.cat([mine[2], theirs[2]])
        state.next_position = torch.cat([state.next_position, new.next_position])
        state.length = length
        if width is not None:
            state.capacity = width

    @torch.inference_mode()
    def fork(self, state: HFState, repeats: int) -> HFState:
        """A copy of the state with every row repeated ``repeats`` times (``[r0, r0, r1, r1, ...]``)."""
        copied = copy.deepcopy(state)
        copied.cache.batch_repeat_interleave(repeats)
        copied.valid = copied.valid.repeat_interleave(repeats, 0)
        copied.positions = copied.positions.repeat_interleave(repeats, 0)
        copied.next_position = copied.next_position.repeat_interleave(repeats, 0)
        return copied

    @torch.inference_mode()
    def take(self, state: HFState, rows: torch.Tensor) -> HFState:
        """A new state holding copies of ``rows`` (repeats allowed) and nothing else; ``state`` is
        unchanged. Only the taken rows are copied (a byte-level source forwards just the tokenizations
        that crossed a token boundary this way)."""
        if state.is_static:
            raise ValueError("take: preallocated caches are not copied row by row")
        cache = copy.copy(state.cache)
        cache.layers = [copy.copy(layer) for layer in state.cache.layers]
        taken = HFState(cache, state.valid, state.positions, state.next_position, state.length)
        self.keep_rows(taken, rows)
        return taken

    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits from final hidden states: the output projection, then soft-capping if the
        family has it (read from the config, e.g. Gemma 2's ``final_logit_softcapping``)."""
        head = self.model.get_output_embeddings()
        if (
            out is not None
            and isinstance(head, torch.nn.Linear)
            and head.bias is None
            and hidden.dtype == torch.float32
        ):
            logits = torch.matmul(hidden, head.weight[: out.shape[-1]].T, out=out)
        else:
            logits = head(hidden)
            if out is not None:
                logits = out.copy_(logits[..., : out.shape[-1]])
        if self.softcap and out is not None:
            return logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return self._soft_capped(logits)

    def restricted_head(self, ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Logits over the rows ``ids`` only (soft-capped like :meth:`head_logits`); the rows are copied
        once here, so each call reads ``len(ids)`` rows of the output projection instead of all of them."""
        head = self.model.get_output_embeddings()
        ids = ids.to(head.weight.device)
        weight = head.weight.detach().index_select(0, ids).contiguous()
        bias = head.bias.detach().index_select(0, ids) if getattr(head, "bias", None) is not None else None

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            return self._soft_capped(torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias))

        return logits

    def _soft_capped(self, logits: torch.Tensor) -> torch.Tensor:
        """``cap * tanh(logits / cap)`` for families with final-logit soft-capping, else ``logits``."""
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _on_cuda(model: PreTrainedModel) -> bool:
        return model.get_input_embeddings().weight.device.type == "cuda"

    def _empty_state(self, batch: int, capacity: int | None) -> HFState:
        device = self.device
        if capacity is None:
            return HFState(
                cache=DynamicCache(),
                valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
                next_position=torch.zeros(batch, dtype=torch.long, device=device),
                length=0,
            )
        cursor = ColumnCursor()
        return HFState(
            cache=Cache(layers=[SlotLayer(capacity, cursor) for _ in range(self.num_layers)]),
            valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
            positions=torch.zeros(batch, capacity, dtype=torch.long, device=device),
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
            length=0,
            capacity=capacity,
            cursor=cursor,
        )

    def _forward(
        self, state: HFState, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Write ``ids`` (with their validity and positions) after the used columns; return hidden states."""
        width = ids.shape[1]
        start, end = state.length, state.length + width
        positions = positions.masked_fill(~valid, 0)
        if state.is_static:
            if end > state.capacity:
                raise ValueError(
                    f"the preallocated cache holds {state.capacity} columns; {end} are needed. "
                    "Allocate it for the longest prompt plus max_new_tokens"
                )
            state.valid[:, start:end] = valid
            state.positions[:, start:end] = positions
            state.cursor.cols = torch.arange(start, end, device=ids.device)
        else:
            state.valid = torch.cat([state.valid, valid], dim=1)
            state.positions = torch.cat([state.positions, positions], dim=1)
        state.length = end
        out = self.decoder(
            input_ids=ids,
            attention_mask=self._masks(state.valid, state.positions, positions),
            position_ids=positions,
            **{self.cache_keyword: state.cache},
            use_cache=True,
        )
        return out.last_hidden_state

    def _masks(
        self, valid: torch.Tensor, positions: torch.Tensor, queries: torch.Tensor
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        masks = {
            kind: attention_bias(valid, positions, queries, window, self.dtype)
            for kind, window in self.windows.items()
        }
        return masks if self.mask_dict else masks["full_attention"]

    @torch.inference_mode()
    def _verify(self) -> None:
        ids = self.tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"][:, :16].to(self.device)
        reference = self.model(input_ids=ids).logits[0].float()
        states, _ = self.prefill(ids, torch.ones_like(ids), hidden=True)
        mine = self.head_logits(states[0]).float()
        scale = 1.0 + float(reference.abs().max())
        tolerance = 1e-4 if self.dtype == torch.float32 else 2e-2
        gap = float((reference - mine).abs().max())
        if gap > tolerance * scale:
            raise SourceLoadError(
                f"{type(self.model).__name__}: trimix's attention masks and output head do not reproduce the "
                f"model's own forward pass (largest logit difference {gap:.3g} on a {ids.shape[1]}-token probe); "
                "please report this model family"
            )


def use_grouped_attention(model: PreTrainedModel) -> None:
    """Switch a CUDA model from ``sdpa`` to :func:`~trimix.backends.attention.grouped_sdpa` (same math, no
    per-head copies of the cache); keep ``sdpa`` with a warning if transformers refuses."""
    attention.register()
    try:
        model.set_attn_implementation(attention.NAME)
    except (ValueError, KeyError, AttributeError) as exc:  # pragma: no cover - depends on the family
        logger.warning(
            "keeping sdpa attention for %s (%s): decoding copies the cache per query head",
            type(model).__name__,
            exc,
        )
