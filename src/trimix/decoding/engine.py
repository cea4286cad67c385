"""Fused, batched, cached decoding.

Each source keeps its own KV cache, attention mask and position ids, because sources may read
different prompt texts (a chat template for an instruct ``large`` model) and therefore pad
differently. Only the generated tokens are shared: at every step each source runs one forward on
the previous token, the logits are fused by :class:`~trimix.fusion.FusionSpec`, one token is chosen,
and rows that finished are dropped from every cache so they stop costing compute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from trimix.backends.loading import Source, load_source
from trimix.backends.vocab import check_vocabularies
from trimix.config import GenerationConfig, PlausibilityConfig, TrimixConfig
from trimix.decoding.sampling import TokenSelector
from trimix.errors import ConfigError, DataError
from trimix.fusion.spec import FusionSpec

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class SourceCandidates:
    """One source's view of one generated position."""

    prob_of_chosen: float
    top: list[tuple[str, float]]


@dataclass
class TokenInspection:
    """Which source drove one generated token: the chosen token and every source's top candidates."""

    token_id: int
    token: str
    fused_prob: float
    fused_top: list[tuple[str, float]]
    sources: dict[str, SourceCandidates]


@dataclass
class Generation:
    """The output for one prompt."""

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    inspection: list[TokenInspection] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.inspection is None:
            data.pop("inspection")
        return data


@dataclass
class StreamEvent:
    """One generated token of one prompt, as it is produced."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: FinishReason | None = None


@dataclass
class _SourceState:
    cache: Any
    attention_mask: torch.Tensor  # (B, L)
    next_position: torch.Tensor  # (B,)

    def keep_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.attention_mask.device)
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]


@dataclass
class _Step:
    rows: list[int]  # original indices (within the batch) of the rows decoded this step
    tokens: list[int]
    finish: list[FinishReason | None]
    inspection: list[TokenInspection] | None = None


@dataclass
class _RowText:
    """Per-row bookkeeping shared by generate() and stream()."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    inspection: list[TokenInspection] = field(default_factory=list)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token (pads get 1, as in HF)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class FusedLM:
    """Several causal LMs decoding as one, their next-token logits fused by fixed weights.

    Args:
        sources: loaded sources (any number, unique roles); their ``weight`` fields are used.
        plausibility: optional constraint (role and alpha).
        vocab_mode: ``exact`` or ``shared_prefix`` (see :func:`trimix.backends.check_vocabularies`).

    Example:
        >>> lm = FusedLM.from_config(load_config("configs/trimix.yaml"))  # doctest: +SKIP
        >>> lm.generate(["Translate to English: ..."], max_new_tokens=32)[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        sources: Sequence[Source],
        plausibility: PlausibilityConfig | None = None,
        vocab_mode: str = "exact",
    ) -> None:
        if not sources:
            raise ConfigError("FusedLM needs at least one source")
        self.sources = list(sources)
        roles = tuple(s.role for s in self.sources)
        if len(set(roles)) != len(roles):
            raise ConfigError(f"source roles must be unique; got {roles}")
        vocab = check_vocabularies(
            {s.role: s.tokenizer for s in self.sources},
            {s.role: s.logit_rows for s in self.sources},
            vocab_mode,
        )
        plaus_index = None
        if plausibility is not None:
            if plausibility.role not in roles:
                raise ConfigError(
                    f"plausibility role {plausibility.role!r} is not among the loaded sources {roles}"
                )
            plaus_index = roles.index(plausibility.role)
        self.spec = FusionSpec(
            roles=roles,
            weights=tuple(float(s.weight) for s in self.sources),
            vocab_size=vocab,
            plausibility_index=plaus_index,
            plausibility_alpha=plausibility.alpha if plausibility else 0.1,
        )
        for source in self.sources:
            if source.tokenizer.pad_token_id is None:
                # Pads are masked out; any id works, and EOS is the conventional choice.
                source.tokenizer.pad_token = source.tokenizer.eos_token
        self.fusion_device = self.sources[0].input_device
        logger.info("fusion of %s with weights %s over %d tokens", roles, self.spec.weights, vocab)

    @classmethod
    def from_config(cls, config: TrimixConfig, load_all: bool = False) -> FusedLM:
        """Load the sources a config uses (non-zero weight or the plausibility role), or all with ``load_all``."""
        plaus_role = config.fusion.plausibility.role if config.fusion.plausibility else None
        used = [m for m in config.models if load_all or m.weight or m.role == plaus_role]
        skipped = [m.role for m in config.models if m not in used]
        if skipped:
            logger.info("not loading source(s) %s: weight 0", skipped)
        if not used:
            raise ConfigError("every source has weight 0; nothing to decode with")
        sources = [
            load_source(
                m, default_dtype=config.dtype, default_device=config.device, cache_dir=config.cache_dir
            )
            for m in used
        ]
        return cls(sources, config.fusion.plausibility, config.fusion.vocab)

    @property
    def tokenizer(self) -> Any:
        return self.sources[0].tokenizer

    def eos_token_ids(self, generation: GenerationConfig) -> list[int]:
        """EOS ids: the config's, else every source tokenizer's and generation config's EOS."""
        if generation.eos_token_ids is not None:
            return list(generation.eos_token_ids)
        ids: set[int] = set()
        for source in self.sources:
            if source.tokenizer.eos_token_id is not None:
                ids.add(int(source.tokenizer.eos_token_id))
            gen_eos = getattr(getattr(source.model, "generation_config", None), "eos_token_id", None)
            if gen_eos is not None:
                ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        return sorted(i for i in ids if i < self.spec.vocab_size)

    # ------------------------------------------------------------------ public entry points
    def generate(
        self,
        prompts: Sequence[str],
        generation: GenerationConfig | None = None,
        progress: bool = False,
        **overrides: Any,
    ) -> list[Generation]:
        """Generate a completion for every prompt.

        Args:
            prompts: input texts; each source formats them by its ``prompt_format``.
            generation: decoding settings; keyword ``overrides`` replace single fields.
            progress: show a progress bar over prompts.

        Returns:
            One :class:`Generation` per prompt, in input order.
        """
        gen = _merge_generation(generation, overrides)
        results: list[Generation] = []
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
        for start in range(0, len(prompts), gen.batch_size):
            batch = list(prompts[start : start + gen.batch_size])
            rows = [_RowText() for _ in batch]
            for step in self._decode_batch(batch, gen):
                for j, (row, token, reason) in enumerate(
                    zip(step.rows, step.tokens, step.finish, strict=True)
                ):
                    rows[row].token_ids.append(token)
                    rows[row].finish_reason = reason
                    if step.inspection is not None:
                        rows[row].inspection.append(step.inspection[j])
            results.extend(self._finish(p, r, gen) for p, r in zip(batch, rows, strict=True))
            bar.update(len(batch))
        bar.close()
        return results

    def stream(
        self, prompts: Sequence[str], generation: GenerationConfig | None = None, **overrides: Any
    ) -> Iterator[StreamEvent]:
        """Yield each generated token as soon as it is chosen, with its decoded text delta."""
        gen = _merge_generation(generation, overrides)
        for start in range(0, len(prompts), gen.batch_size):
            batch = list(prompts[start : start + gen.batch_size])
            rows = [_RowText() for _ in batch]
            shown = [""] * len(batch)
            for step in self._decode_batch(batch, gen):
                for row, token, reason in zip(step.rows, step.tokens, step.finish, strict=True):
                    rows[row].token_ids.append(token)
                    rows[row].finish_reason = reason
                    text = self._finish(batch[row], rows[row], gen).text
                    delta = text[len(shown[row]) :] if text.startswith(shown[row]) else text
                    shown[row] = text
                    yield StreamEvent(start + row, token, delta, reason is not None, reason)

    # ------------------------------------------------------------------ internals
    def _finish(self, prompt: str, row: _RowText, gen: GenerationConfig) -> Generation:
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        if row.finish_reason == "stop":
            text = text[: _first_stop(text, gen.stop)]
        return Generation(
            prompt=prompt,
            text=text,
            token_ids=list(row.token_ids),
            finish_reason=row.finish_reason or "length",
            inspection=row.inspection if gen.inspect_top_k else None,
        )

    def encode(self, source: Source, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise prompts for one source: left-padded ids and attention mask on its input device."""
        texts = [source.format_prompt(p) for p in prompts]
        enc = source.tokenizer(
            texts,
            padding=True,
            return_tensors="pt",
            padding_side="left",
            add_special_tokens=source.adds_special_tokens,
        )
        lengths = enc["attention_mask"].sum(-1)
        for i, n in enumerate(lengths.tolist()):
            if n == 0:
                raise DataError(f"prompt {i} is empty after tokenisation for source {source.role!r}")
        limit = source.max_positions
        if limit is not None and int(lengths.max()) > limit:
            i = int(lengths.argmax())
            raise DataError(
                f"prompt {i} has {int(lengths[i])} tokens for source {source.role!r}, "
                f"{int(lengths[i]) - limit} more than its context of {limit}; shorten it"
            )
        device = source.input_device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def _prefill(self, source: Source, prompts: Sequence[str]) -> tuple[torch.Tensor, _SourceState]:
        enc = self.encode(source, prompts)
        positions = left_padded_positions(enc["attention_mask"])
        out = source.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        state = _SourceState(out.past_key_values, enc["attention_mask"], positions[:, -1] + 1)
        return out.logits[:, -1, :], state

    @staticmethod
    def _advance(source: Source, state: _SourceState, tokens: torch.Tensor) -> torch.Tensor:
        device = state.attention_mask.device
        state.attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones((state.attention_mask.shape[0], 1))], dim=-1
        )
        out = source.model(
            input_ids=tokens.to(device)[:, None],
            attention_mask=state.attention_mask,
            position_ids=state.next_position[:, None],
            past_key_values=state.cache,
            use_cache=True,
        )
        state.next_position = state.next_position + 1
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def _decode_batch(self, prompts: Sequence[str], gen: GenerationConfig) -> Iterator[_Step]:
        selector = TokenSelector(gen, device=self.fusion_device)
        eos = torch.tensor([] if gen.ignore_eos else self.eos_token_ids(gen), dtype=torch.long)
        eos = eos.to(self.fusion_device)
        prefilled = [self._prefill(s, prompts) for s in self.sources]
        logits = [p[0] for p in prefilled]
        states = [p[1] for p in prefilled]
        active = torch.arange(len(prompts))
        generated: list[list[int]] = [[] for _ in prompts]
        for step in range(gen.max_new_tokens):
            source_logits = [x.to(self.fusion_device) for x in logits]
            scores = self.spec.scores(source_logits)  # (b, V)
            tokens = selector(scores)  # (b,)
            token_list = tokens.tolist()
            is_eos = torch.isin(tokens, eos).tolist()
            finish: list[FinishReason | None] = []
            for row, token, hit_eos in zip(active.tolist(), token_list, is_eos, strict=True):
                generated[row].append(token)
                if hit_eos:
                    finish.append("eos")
                elif gen.stop and self._hits_stop(generated[row], gen.stop):
                    finish.append("stop")
                elif step == gen.max_new_tokens - 1:
                    finish.append("length")
                else:
                    finish.append(None)
            inspection = (
                self._inspect(source_logits, scores, tokens, gen.inspect_top_k) if gen.inspect_top_k else None
            )
            yield _Step(active.tolist(), token_list, finish, inspection)
            keep = torch.tensor([f is None for f in finish])
            if not keep.any():
                return
            if not keep.all():
                active, tokens = active[keep], tokens[keep]
                kept_rows = keep.nonzero().squeeze(-1)
                for state in states:
                    state.keep_rows(kept_rows)
            logits = [self._advance(s, st, tokens) for s, st in zip(self.sources, states, strict=True)]

    def _hits_stop(self, token_ids: list[int], stops: Sequence[str]) -> bool:
        # Decode only a tail long enough to contain any stop string (a token is at least one character
        # or a byte fragment of one); a full decode happens once, at the end.
        tail_tokens = max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(token_ids[-tail_tokens:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _inspect(
        self, source_logits: Sequence[torch.Tensor], scores: torch.Tensor, tokens: torch.Tensor, k: int
    ) -> list[TokenInspection]:
        vocab = self.spec.vocab_size
        fused_probs = torch.softmax(scores, dim=-1)
        source_probs = [torch.softmax(x[..., :vocab].float(), dim=-1) for x in source_logits]
        convert = self.tokenizer.convert_ids_to_tokens
        result = []
        for i, token in enumerate(tokens.tolist()):

            def top(probs: torch.Tensor, i: int = i) -> list[tuple[str, float]]:
                values, ids = probs[i].topk(min(k, vocab))
                return [(convert(int(t)), float(v)) for v, t in zip(values, ids, strict=True)]

            result.append(
                TokenInspection(
                    token_id=token,
                    token=convert(token),
                    fused_prob=float(fused_probs[i, token]),
                    fused_top=top(fused_probs),
                    sources={
                        role: SourceCandidates(float(p[i, token]), top(p))
                        for role, p in zip(self.spec.roles, source_probs, strict=True)
                    },
                )
            )
        return result


def _first_stop(text: str, stops: Sequence[str]) -> int:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else len(text)


def _merge_generation(generation: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    base = generation or GenerationConfig()
    if not overrides:
        return base
    try:
        return GenerationConfig.model_validate({**base.model_dump(), **overrides})
    except Exception as exc:
        raise ConfigError(f"invalid generation setting(s) {overrides}: {exc}") from exc
