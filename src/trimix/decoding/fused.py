"""The fused language model: one object for generation, streaming, likelihood and many-weight scoring.

:class:`FusedLM` holds a :class:`SourcePool` (the loaded sources, shared) and a
:class:`~trimix.fusion.Fusion` (the weights). ``with_weights`` / ``with_fusion`` return another model
over the same loaded sources. Everything goes through the sources' backends
(:class:`~trimix.backends.base.SourceBackend`): no model internals here.

Decoding engines (``generation.engine``):

* ``eager``: one cached forward per source per step on caches that grow; finished rows are dropped.
* ``static``: preallocated caches and one in-place fused step (:mod:`trimix.decoding.static`); the
  CPU reference of the graph path.
* ``graphs``: the static step captured as a CUDA graph per batch bucket and replayed.
* ``auto`` (default): ``graphs`` when every fused source sits on one CUDA device, else ``eager``.

The loops live in :mod:`trimix.decoding.runners`; all of them choose tokens with the same
:func:`~trimix.fusion.fused_scores` (the fusion method's ``combine``) and
:class:`~trimix.decoding.sampling.TokenChooser`; sampling noise is keyed per row (seed and prompt
index), so a prompt's output does not depend on the batch it shares.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from trimix.backends.base import STATIC, has_capability
from trimix.backends.loading import Source, load_source
from trimix.config import FusionConfig, GenerationConfig, TrimixConfig, resolve_generation
from trimix.decoding.likelihood import LikelihoodMethods
from trimix.decoding.pool import SourcePool
from trimix.decoding.results import (
    Generation,
    Loglikelihood,
    SourceCandidates,
    StreamEvent,
    TokenInspection,
    inspect_tokens,
)
from trimix.decoding.scheduler import decode_prompts
from trimix.decoding.stopping import emit_text
from trimix.decoding.text import (
    encode_texts,
    readable_token,
    rolling_windows,
    split_continuation,
)
from trimix.errors import ConfigError, DataError
from trimix.fusion import Fusion, fused_scores
from trimix.fusion.methods import get_method

logger = logging.getLogger(__name__)

Engine = Literal["auto", "eager", "static", "graphs"]


class FusedLM(LikelihoodMethods):
    """Several causal LMs decoding as one, their next-token logits fused by a :class:`Fusion`.

    Args:
        sources: loaded sources, or a :class:`SourcePool` shared with other fused models.
        fusion: the weights (and plausibility rule); a single loaded source needs none.
        vocab_mode: ``exact`` or ``shared_prefix`` (only when ``sources`` is a list).

    Example:
        >>> lm = trimix.load("run.yaml")  # doctest: +SKIP
        >>> lm.generate(["Translate to English: ..."], max_new_tokens=32)[0].text  # doctest: +SKIP
        >>> lm.with_weights(large=0.3, small_cpt=0.9).loglikelihood([("2 + 2 =", " 4")])  # doctest: +SKIP
    """

    def __init__(
        self,
        sources: Sequence[Source] | SourcePool,
        fusion: Fusion | None = None,
        *,
        vocab_mode: str = "exact",
    ) -> None:
        self.pool = sources if isinstance(sources, SourcePool) else SourcePool(sources, vocab_mode=vocab_mode)
        if fusion is None:
            if len(self.pool.sources) != 1:
                raise ConfigError(f"several sources ({', '.join(self.pool.sources)}) need a fusion (weights)")
            (role,) = self.pool.sources
            fusion = Fusion({role: 1.0}, "single", options={"role": role})
        unknown = [r for r in fusion.weights if r not in self.pool.roles]
        if unknown:
            raise ConfigError(
                f"the fusion weights role(s) {unknown} that no source has; roles: {self.pool.roles}"
            )
        self.fusion = fusion
        self.sources = [self.pool.get(role) for role in fusion.roles]
        self.roles = tuple(s.role for s in self.sources)
        plaus = fusion.plausibility
        self.plausibility_index = self.roles.index(plaus.role) if plaus else None
        self.fusion_device = self.sources[0].input_device
        self.combine = get_method(fusion.method).combine  # the method's combination of source logits
        described = fusion.describe()
        if described not in self.pool.described:  # once per fusion (a server builds one per request)
            self.pool.described.add(described)
            logger.info("fusion %s over %d tokens", described, self.vocab_size)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: TrimixConfig, load_all: bool = False) -> FusedLM:
        """The fused model a config describes. Sources of weight 0 are loaded only with ``load_all`` or
        when a later ``with_weights`` / ``with_fusion`` weights them."""
        fusion = config.resolved_fusion()
        wanted = [m for m in config.models if load_all or m.role in fusion.roles]
        skipped = [m.role for m in config.models if m not in wanted]
        if skipped:
            logger.info("not loading source(s) %s: weight 0", skipped)
        sources = [
            load_source(
                m, default_dtype=config.dtype, default_device=config.device, cache_dir=config.cache_dir
            )
            for m in wanted
        ]
        return cls(SourcePool(sources, config, config.fusion.vocab), fusion)

    def with_fusion(self, fusion: Fusion | FusionConfig | dict[str, Any]) -> FusedLM:
        """Another fused model over the same loaded sources (no reload); a source that the new fusion
        weights but that was not loaded yet is loaded from the config (or the call fails naming it)."""
        if isinstance(fusion, dict):
            fusion = FusionConfig.model_validate(fusion)
        if isinstance(fusion, FusionConfig):
            given = {
                r: (self.fusion.weights.get(r) if r in self.fusion.weights else None) for r in self.pool.roles
            }
            fusion = fusion.resolve(given)
        return FusedLM(self.pool, fusion)

    def with_weights(self, method: str | None = None, **weights: float) -> FusedLM:
        """The same sources fused with other weights, read by ``method`` (default: the current one).

        Under TriMix, ``with_weights(large=0.3, small_cpt=0.9)`` derives small_base = -0.2; under
        ``weighted``, every source needs a weight. The plausibility rule is kept.

        Raises:
            ConfigError: unknown roles, or weights the method cannot read.
        """
        method = method or self.fusion.method
        unknown = [r for r in weights if r not in self.pool.roles]
        if unknown:
            raise ConfigError(
                f"with_weights names role(s) {unknown} that no source has; roles: {self.pool.roles}"
            )
        given = {r: weights.get(r) for r in self.pool.roles}
        try:
            fusion = Fusion.resolve(
                method,
                given,
                role=self.fusion.options.get("role"),
                alpha=float(self.fusion.options.get("alpha", 1.0)),
                plausibility=self.fusion.plausibility,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return FusedLM(self.pool, fusion)

    # ---------------------------------------------------------------- properties
    @property
    def generation(self) -> GenerationConfig:
        """The run's ``generation`` section (defaults for a model built without a config): what
        ``generate`` and ``stream`` decode with unless a call gives settings of its own."""
        config = self.pool.config
        return config.generation if config is not None else GenerationConfig()

    @property
    def tokenizer(self) -> Any:
        return self.sources[0].tokenizer

    @property
    def vocab_size(self) -> int:
        return self.pool.vocab_size

    def weight_vector(self) -> list[float]:
        return self.fusion.vector(self.roles)

    def eos_token_ids(self, generation: GenerationConfig) -> list[int]:
        """EOS ids: the config's, else every source tokenizer's and generation config's EOS."""
        if generation.eos_token_ids is not None:
            return list(generation.eos_token_ids)
        ids = {i for source in self.sources for i in source.backend.eos_token_ids}
        return sorted(i for i in ids if i < self.vocab_size)

    def engine_for(self, generation: GenerationConfig) -> str:
        """The decoding engine a generation uses (``auto`` resolved)."""
        devices = {s.input_device for s in self.sources}
        one_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
        one_cuda = one_cuda and all(s.config.device_map is None for s in self.sources)
        engine = generation.engine
        if engine == "auto":
            static = all(has_capability(s.backend, STATIC) for s in self.sources)
            return "graphs" if one_cuda and static else "eager"
        if engine == "graphs" and not one_cuda:
            raise ConfigError(
                "generation.engine 'graphs' needs every fused source on one CUDA device (no device_map); "
                f"they are on {sorted(str(d) for d in devices)}. Use engine 'eager' (or 'auto')."
            )
        if engine in ("static", "graphs"):
            lacking = [s.role for s in self.sources if not has_capability(s.backend, STATIC)]
            if lacking:
                raise ConfigError(
                    f"generation.engine {engine!r} needs preallocated caches, which the backend of "
                    f"source(s) {lacking} does not have; use engine 'eager' (or 'auto')"
                )
        if engine == "static" and any(s.config.device_map is not None for s in self.sources):
            raise ConfigError(
                "generation.engine 'static' does not support sources split by device_map; use 'eager'"
            )
        return engine

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompts: Sequence[str],
        generation: GenerationConfig | None = None,
        progress: bool = False,
        *,
        row_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> list[Generation]:
        """Generate a completion for every prompt.

        Args:
            prompts: input texts; each source formats them by its ``prompt_format``.
            generation: decoding settings; keyword ``overrides`` replace single fields.
            progress: show a progress bar over prompts.
            row_ids: each prompt's sampling key (default: its index); a prompt with the same key and
                seed samples the same tokens whatever else is in its batch.

        Returns:
            One :class:`Generation` per prompt, in input order.

        Raises:
            DataError: an empty prompt, or (with ``on_context_limit: error``) a prompt whose length plus
                ``max_new_tokens`` exceeds a source's context.
        """
        gen = resolve_generation(generation or self.generation, overrides, origin="generation keyword")
        results: list[Generation | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
            for event in decode_prompts(self, prompts, gen, row_ids, deltas=False):  # stream's loop
                if event.generation is not None:
                    results[event.index] = event.generation
                    bar.update(1)
        return results  # type: ignore[return-value]

    def stream(
        self,
        prompts: Sequence[str],
        generation: GenerationConfig | None = None,
        *,
        row_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> Iterator[StreamEvent]:
        """Yield each generated token as soon as it is chosen, with its decoded text delta; a prompt's last
        event carries its whole :class:`Generation`."""
        gen = resolve_generation(generation or self.generation, overrides, origin="generation keyword")
        yield from decode_prompts(self, prompts, gen, row_ids, deltas=True)

    def fuse(
        self, source_logits: Sequence[torch.Tensor], weights: torch.Tensor, *, plausibility: bool = True
    ) -> torch.Tensor:
        """The fused scores a token is chosen from: each source's logits ``(B, ..., R_i)`` combined by the
        fusion method with per-row ``weights`` ``(B, S)``, implausible tokens at ``-inf`` (float32
        ``(B, ..., V)``). Every runner's step fuses through here."""
        return fused_scores(
            source_logits,
            weights,
            self.vocab_size,
            self.plausibility_index if plausibility else None,
            self.plausibility_alpha,
            self.combine,
        )

    def render(self, prompt: str | list[dict[str, str]]) -> dict[str, str]:
        """What each fused source reads for a prompt.

        A completion prompt is formatted by each source (its ``prompt_format``). Chat messages: sources with
        ``prompt_format: chat`` apply their own chat template; the others read the messages as the first
        chat source renders them, or, when no source reads chat, as plain ``Role: content`` lines ending
        with ``Assistant:``.
        """
        if isinstance(prompt, str):
            return {s.role: s.format_prompt(prompt) for s in self.sources}
        chat = [s for s in self.sources if s.config.prompt_format == "chat"]
        if chat:
            first = chat[0]
            shared = first.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            bos = first.tokenizer.bos_token
            if bos and shared.startswith(bos):  # raw sources add their own BOS when they tokenise
                shared = shared[len(bos) :]
        else:
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
            shared = "\n".join([*lines, "Assistant:"])
        return {
            s.role: (
                s.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                if s.config.prompt_format == "chat"
                else shared
            )
            for s in self.sources
        }

    def encode(self, source: Source, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise prompts for one source (formatted by its ``prompt_format``): left-padded ids and mask."""
        return encode_texts(source, [source.format_prompt(p) for p in prompts])

    def token_budgets(
        self,
        encodings: Sequence[dict[str, torch.Tensor]],
        max_new_tokens: int | Sequence[int],
        on_context_limit: str | Sequence[str] = "error",
    ) -> list[int]:
        """How many tokens each row may generate: its ``max_new_tokens`` (one for all rows, or one per row),
        or less where a source's context ends (each source's own encoding of the row counts);
        ``on_context_limit`` is one for all rows or one per row.

        Raises:
            DataError: with ``on_context_limit: error``, for the first row that does not fit.
        """
        rows = int(encodings[0]["input_ids"].shape[0])
        wanted = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
        modes = [on_context_limit] * rows if isinstance(on_context_limit, str) else list(on_context_limit)
        budgets = list(wanted)
        for source, enc in zip(self.sources, encodings, strict=True):
            limit = source.max_positions
            if limit is None:
                continue
            for i, length in enumerate(enc["attention_mask"].sum(-1).tolist()):
                room = limit - length
                if room < wanted[i] and modes[i] == "error":
                    raise DataError(
                        f"prompt {i} has {length} tokens for source {source.role!r}; with max_new_tokens "
                        f"{wanted[i]} it needs {length + wanted[i]} positions, more than the "
                        f"source's context of {limit}. Shorten the prompt or lower max_new_tokens"
                    )
                budgets[i] = min(budgets[i], max(room, 0))
        return budgets

    @property
    def plausibility_alpha(self) -> float:
        """The plausibility threshold (0 without the constraint)."""
        return self.fusion.plausibility.alpha if self.fusion.plausibility else 0.0

    def drafter(self, generation: GenerationConfig) -> str:
        """The role that drafts for speculative fusion: ``speculative.draft``, else the fused source with the
        largest weight (the one with the fewest parameters among equals)."""
        spec = generation.speculative
        if self.pool.space == "bytes":
            raise ConfigError(
                "speculative fusion works on shared tokens; this fusion runs at the byte level (the "
                "sources' tokenizers differ, or fusion.space: bytes). Remove generation.speculative."
            )
        if spec is not None and spec.draft is not None:
            if spec.draft not in self.pool.roles:
                raise ConfigError(
                    f"speculative.draft {spec.draft!r} is not a source; roles are {', '.join(self.pool.roles)}"
                )
            return spec.draft
        return max(
            self.roles, key=lambda r: (self.fusion.weight(r), -self.pool.get(r).backend.num_parameters)
        )

    def inspect_step(
        self,
        source_logits: Sequence[torch.Tensor],
        scores: torch.Tensor,
        tokens: torch.Tensor,
        k: int,
        weights: torch.Tensor | None = None,
    ) -> list[TokenInspection]:
        """What each source proposed at one decoding step (its top-``k`` candidates) and how much each
        contributed to the chosen token's margin over the runner-up (``generate --inspect``, the server's
        ``trimix.inspect``); see :func:`trimix.decoding.results.inspect_tokens`."""
        if weights is None:
            weights = torch.tensor([self.weight_vector()] * tokens.shape[0], device=scores.device)
        return inspect_tokens(
            self.roles, self.vocab_size, self.token_text, source_logits, scores, tokens, k, weights
        )

    def token_text(self, token_id: int) -> str:
        """A token as readable text; a piece of a multi-byte character is marked ``⟨partial⟩``."""
        return readable_token(self.tokenizer, token_id)


__all__ = [
    "Engine",
    "FusedLM",
    "Generation",
    "Loglikelihood",
    "SourceCandidates",
    "SourcePool",
    "StreamEvent",
    "TokenInspection",
    "emit_text",
    "encode_texts",
    "readable_token",
    "rolling_windows",
    "split_continuation",
]
