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

All engines choose tokens with the same :func:`~trimix.fusion.fused_scores` and
:class:`~trimix.decoding.sampling.TokenChooser`; sampling noise is keyed per row (seed and prompt
index), so a prompt's output does not depend on the batch it shares.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from trimix.backends.loading import Source, load_source
from trimix.backends.vocab import check_vocabularies
from trimix.config import FusionConfig, GenerationConfig, TrimixConfig, resolve_generation
from trimix.data import read_text_spec
from trimix.decoding.sampling import STREAM_DRAFT, TokenChooser, row_keys, sampling_key
from trimix.decoding.speculative import (
    K_AUTO_START,
    SpeculativeStats,
    describe_stats,
    frequent_tokens,
    next_k,
    verify_drafts,
)
from trimix.decoding.static import (
    Batch,
    FusedStep,
    GraphSession,
    SessionPool,
    bucket_capacity,
    bucket_size,
)
from trimix.decoding.stopping import FinishReason, StopChecker, first_stop
from trimix.errors import ConfigError, DataError
from trimix.fusion import Fusion, fused_scores, margin_contributions
from trimix.fusion.methods import get_method

logger = logging.getLogger(__name__)

Engine = Literal["auto", "eager", "static", "graphs"]


@dataclass
class SourceCandidates:
    """One source's view of one generated position."""

    prob_of_chosen: float
    top: list[tuple[str, float]]


@dataclass
class TokenInspection:
    """Which source drove one generated token: the chosen token, every source's top candidates, and each
    source's share of the fused margin over the runner-up (``contributions``; the largest: ``leader``).
    Tokens are shown as text (a piece of a multi-byte character is marked ``⟨partial⟩``)."""

    token_id: int
    token: str
    fused_prob: float
    fused_top: list[tuple[str, float]]
    sources: dict[str, SourceCandidates]
    contributions: dict[str, float] = field(default_factory=dict)
    leader: str | None = None


@dataclass
class Generation:
    """The output for one prompt."""

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    inspection: list[TokenInspection] | None = None
    stats: dict[str, Any] | None = None  # speculative decoding: acceptance accounting of this prompt

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("inspection", "stats"):
            if data[optional] is None:
                data.pop(optional)
        return data


@dataclass
class StreamEvent:
    """One generated token of one prompt, as it is produced."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    generation: Generation | None = None  # the whole result, on a prompt's last event


@dataclass(frozen=True)
class Loglikelihood:
    """A continuation's fused log-probability given its context, and whether greedy decoding produces it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class _Step:
    rows: list[int]  # indices (within the batch) of the rows that got a token this step
    tokens: list[int]
    finish: list[FinishReason | None]
    inspection: list[TokenInspection] | None = None
    closed: list[tuple[int, FinishReason]] = field(default_factory=list)  # rows ended without a token
    stats: dict[int, dict[str, Any]] | None = None  # speculative accounting per row, sent once per batch
    texts: list[str] = field(default_factory=list)  # each row's text after this step (set by _decode_batch)


@dataclass
class _RowText:
    """Per-row bookkeeping shared by generate() and stream()."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    inspection: list[TokenInspection] = field(default_factory=list)
    stats: dict[str, Any] | None = None


class SourcePool:
    """The loaded sources that a family of fused models shares, loading a config's others on demand.

    Args:
        sources: loaded sources (unique roles).
        config: the run config they came from; roles it names but that are not loaded yet are loaded
            when a fusion first weights them.
        vocab_mode: ``exact`` or ``shared_prefix`` (see :func:`trimix.backends.check_vocabularies`).
    """

    def __init__(
        self, sources: Sequence[Source], config: TrimixConfig | None = None, vocab_mode: str = "exact"
    ) -> None:
        roles = [s.role for s in sources]
        if len(set(roles)) != len(roles):
            raise ConfigError(f"source roles must be unique; got {roles}")
        self.sources: dict[str, Source] = {s.role: s for s in sources}
        self.config = config
        self.vocab_mode = vocab_mode
        self.sessions = SessionPool()
        self.vocab_size = self._check() if self.sources else 0
        self._token_counts: dict[tuple[str, tuple[str, ...]], Counter[int]] = {}

    @property
    def roles(self) -> list[str]:
        """Every role this pool can provide (loaded or loadable)."""
        known = [m.role for m in self.config.models] if self.config is not None else []
        return known + [r for r in self.sources if r not in known]

    def get(self, role: str) -> Source:
        """The loaded source of ``role``, loading it from the config if needed."""
        if role in self.sources:
            return self.sources[role]
        if self.config is None or role not in [m.role for m in self.config.models]:
            raise ConfigError(f"no source has role {role!r}; roles are {', '.join(self.roles)}")
        logger.info("loading source %s (a fusion weights it)", role)
        source = load_source(
            self.config.source(role),
            default_dtype=self.config.dtype,
            default_device=self.config.device,
            cache_dir=self.config.cache_dir,
        )
        self.sources[role] = source
        self.vocab_size = self._check()
        return source

    def token_counts(self, role: str, texts: Sequence[str]) -> Counter[int]:
        """How often each token id occurs in ``texts`` (files or ``sib200:LANG:SPLIT``, see
        :func:`trimix.data.read_text_spec`) under ``role``'s tokenizer; counted once, then remembered."""
        key = (role, tuple(texts))
        if key not in self._token_counts:
            tokenizer = self.get(role).tokenizer
            counts: Counter[int] = Counter()
            for spec in texts:
                documents = read_text_spec(spec)
                for start in range(0, len(documents), 256):
                    for ids in tokenizer(documents[start : start + 256], add_special_tokens=False)[
                        "input_ids"
                    ]:
                        counts.update(ids)
            logger.info("draft vocabulary: %d distinct tokens in %s", len(counts), ", ".join(texts))
            self._token_counts[key] = counts
        return self._token_counts[key]

    def _check(self) -> int:
        sources = list(self.sources.values())
        vocab = check_vocabularies(
            {s.role: s.tokenizer for s in sources}, {s.role: s.logit_rows for s in sources}, self.vocab_mode
        )
        for source in sources:
            if source.tokenizer.pad_token_id is None:
                # Pads are masked out; any id works, and EOS is the conventional choice.
                source.tokenizer.pad_token = source.tokenizer.eos_token
        return vocab


class FusedLM:
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
        logger.info("fusion %s over %d tokens", fusion.describe(), self.vocab_size)

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
            return "graphs" if one_cuda else "eager"
        if engine == "graphs" and not one_cuda:
            raise ConfigError(
                "generation.engine 'graphs' needs every fused source on one CUDA device (no device_map); "
                f"they are on {sorted(str(d) for d in devices)}. Use engine 'eager' (or 'auto')."
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
        ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        results: list[Generation] = []
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
        for start in range(0, len(prompts), gen.batch_size):
            batch = list(prompts[start : start + gen.batch_size])
            rows = [_RowText() for _ in batch]
            for step in self._decode_batch(batch, gen, ids[start : start + gen.batch_size]):
                for row, reason in step.closed:
                    rows[row].finish_reason = reason
                for row, stats in (step.stats or {}).items():
                    rows[row].stats = stats
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
        all_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        for start in range(0, len(prompts), gen.batch_size):
            batch = list(prompts[start : start + gen.batch_size])
            rows = [_RowText() for _ in batch]
            shown = [""] * len(batch)
            for step in self._decode_batch(batch, gen, all_ids[start : start + len(batch)]):
                for row, reason in step.closed:
                    rows[row].finish_reason = reason
                    yield StreamEvent(
                        start + row, -1, "", True, reason, self._finish(batch[row], rows[row], gen)
                    )
                for row, stats in (step.stats or {}).items():
                    rows[row].stats = stats
                for j, (row, token, reason) in enumerate(
                    zip(step.rows, step.tokens, step.finish, strict=True)
                ):
                    rows[row].token_ids.append(token)
                    rows[row].finish_reason = reason
                    # While a row runs, its text is the stop checker's (grown incrementally); its last
                    # event carries the whole decode, so the deltas add up to the final text exactly.
                    final = self._finish(batch[row], rows[row], gen) if reason is not None else None
                    text = final.text if final is not None else step.texts[j]
                    delta, shown[row] = emit_text(shown[row], text, reason is not None, gen.stop)
                    yield StreamEvent(start + row, token, delta, reason is not None, reason, final)

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
        on_context_limit: str = "error",
    ) -> list[int]:
        """How many tokens each row may generate: its ``max_new_tokens`` (one for all rows, or one per row),
        or less where a source's context ends (each source's own encoding of the row counts).

        Raises:
            DataError: with ``on_context_limit: error``, for the first row that does not fit.
        """
        rows = int(encodings[0]["input_ids"].shape[0])
        wanted = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
        budgets = list(wanted)
        for source, enc in zip(self.sources, encodings, strict=True):
            limit = source.max_positions
            if limit is None:
                continue
            for i, length in enumerate(enc["attention_mask"].sum(-1).tolist()):
                room = limit - length
                if room < wanted[i] and on_context_limit == "error":
                    raise DataError(
                        f"prompt {i} has {length} tokens for source {source.role!r}; with max_new_tokens "
                        f"{wanted[i]} it needs {length + wanted[i]} positions, more than the "
                        f"source's context of {limit}. Shorten the prompt or lower max_new_tokens"
                    )
                budgets[i] = min(budgets[i], max(room, 0))
        return budgets

    def _finish(self, prompt: str, row: _RowText, gen: GenerationConfig) -> Generation:
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        if row.finish_reason == "stop":
            text = text[: first_stop(text, gen.stop)]
        return Generation(
            prompt=prompt,
            text=text,
            token_ids=list(row.token_ids),
            finish_reason=row.finish_reason or "length",
            inspection=row.inspection if gen.inspect_top_k else None,
            stats=row.stats,
        )

    def _decode_batch(
        self, prompts: Sequence[str], gen: GenerationConfig, row_ids: Sequence[int]
    ) -> Iterator[_Step]:
        encodings = [self.encode(s, prompts) for s in self.sources]
        budgets = self.token_budgets(encodings, gen.max_new_tokens, gen.on_context_limit)
        if any(b == 0 for b in budgets):
            yield _Step([], [], [], closed=[(i, "context") for i, b in enumerate(budgets) if b == 0])
        engine = self.engine_for(gen)
        logger.debug("decoding %d prompts with engine %s", len(prompts), engine)
        tracker = StopChecker.for_batch(
            self.tokenizer,
            budgets,
            stops=gen.stop,
            max_new_tokens=gen.max_new_tokens,
            eos=[] if gen.ignore_eos else self.eos_token_ids(gen),
        )
        keys = row_keys(gen.seed, row_ids)
        if gen.speculative is not None:
            if engine != "eager":
                logger.info("speculative fusion runs on the eager engine (engine %s was asked)", engine)
            steps = self._decode_speculative(prompts, encodings, gen, keys, tracker)
        elif engine == "eager":
            steps = self._decode_eager(encodings, gen, keys, tracker)
        else:
            steps = self._decode_static(encodings, gen, keys, tracker, engine == "graphs")
        for step in steps:  # each row's text as the stop checker holds it after this step
            step.texts = [tracker.rows[row].text for row in step.rows]
            yield step

    @torch.inference_mode()
    def _decode_eager(
        self,
        encodings: list[dict[str, torch.Tensor]],
        gen: GenerationConfig,
        keys: torch.Tensor,
        tracker: StopChecker,
    ) -> Iterator[_Step]:
        device = self.fusion_device
        chooser = TokenChooser(gen)
        batch = len(tracker.rows)
        weights = torch.tensor([self.weight_vector()] * batch, dtype=torch.float32, device=device)
        keys, counters = keys.to(device), torch.zeros(batch, dtype=torch.long, device=device)
        prefilled = [
            s.backend.prefill(e["input_ids"], e["attention_mask"])
            for s, e in zip(self.sources, encodings, strict=True)
        ]
        logits, states = [p[0] for p in prefilled], [p[1] for p in prefilled]
        active = torch.arange(batch)
        alive = [i for i in range(batch) if not tracker.done(i)]
        if len(alive) < batch:  # rows with no room at all never decode
            active = torch.tensor(alive, dtype=torch.long)
            self._keep(states, active)
            logits = [x[active.to(x.device)] for x in logits]
        while active.numel():
            rows = active.to(device)
            source_logits = [x.to(device) for x in logits]
            scores = fused_scores(
                source_logits,
                weights[rows],
                self.vocab_size,
                self.plausibility_index,
                self.plausibility_alpha,
                self.combine,
            )
            tokens = chooser(scores, keys[rows], counters[rows])
            counters[rows] += 1
            finish = tracker.record(active.tolist(), tokens.tolist())
            inspection = (
                self.inspect_step(source_logits, scores, tokens, gen.inspect_top_k)
                if gen.inspect_top_k
                else None
            )
            yield _Step(active.tolist(), tokens.tolist(), finish, inspection)
            keep = torch.tensor([f is None for f in finish])
            if not keep.any():
                return
            if not keep.all():
                kept = keep.nonzero().squeeze(-1)
                active, tokens = active[kept], tokens[kept.to(tokens.device)]
                self._keep(states, kept)
            logits = [
                s.backend.advance(st, tokens[:, None])[:, -1]
                for s, st in zip(self.sources, states, strict=True)
            ]

    def _keep(self, states: list[Any], rows: torch.Tensor) -> None:
        for source, state in zip(self.sources, states, strict=True):
            source.backend.keep_rows(state, rows)

    @property
    def plausibility_alpha(self) -> float:
        """The plausibility threshold (0 without the constraint)."""
        return self.fusion.plausibility.alpha if self.fusion.plausibility else 0.0

    @torch.inference_mode()
    def _decode_static(
        self,
        encodings: list[dict[str, torch.Tensor]],
        gen: GenerationConfig,
        keys: torch.Tensor,
        tracker: StopChecker,
        graphs: bool,
    ) -> Iterator[_Step]:
        live = len(tracker.rows)
        widest = max(int(e["input_ids"].shape[1]) for e in encodings)
        needed = widest + max(r.budget for r in tracker.rows.values())
        batch, capacity = (bucket_size(live), bucket_capacity(needed)) if graphs else (live, needed)
        padded = Batch(
            [
                _pad_rows(e["input_ids"], batch, s.tokenizer.pad_token_id)
                for s, e in zip(self.sources, encodings, strict=True)
            ],
            [_pad_rows(e["attention_mask"], batch, 0) for e in encodings],
        )
        chooser = TokenChooser(gen)
        eos = torch.tensor(tracker.eos, dtype=torch.long, device=self.fusion_device)
        compiled = gen.compile if gen.compile is not None else graphs

        def make_step(backends: list[Any], states: list[Any]) -> FusedStep:
            return FusedStep(
                backends,
                states,
                self.vocab_size,
                self.plausibility_index,
                self.plausibility_alpha,
                chooser,
                eos,
                int(self.tokenizer.pad_token_id),
                compiled,
                self.combine,
            )

        def create() -> GraphSession:
            return GraphSession([s.backend for s in self.sources], batch, capacity, make_step, graphs)

        if graphs:
            key = (
                self.roles,
                batch,
                capacity,
                self.plausibility_index,
                self.plausibility_alpha,
                self.fusion.method,
                sampling_key(gen),
                tuple(tracker.eos),
                compiled,
            )
            session, fresh = self.pool.sessions.get(key, create)
            if fresh:
                logger.info("engine graphs: new session for batch %d, %d cache columns", batch, capacity)
        else:
            session = create()
        weights = torch.tensor([self.weight_vector()] * batch, dtype=torch.float32)
        all_keys = torch.cat([keys, torch.zeros(batch - live, dtype=torch.long)])
        session.load(padded, all_keys.to(self.fusion_device), weights.to(self.fusion_device), live)
        step = session.step_fn
        never = [i for i in range(live) if tracker.done(i)]
        if never:
            step.finished[torch.tensor(never, device=step.finished.device)] = True
        while True:
            active = [i for i in range(live) if not tracker.done(i)]
            if not active:
                return
            chosen = step.chosen.tolist()
            tokens = [chosen[i] for i in active]
            finish = tracker.record(active, tokens)
            inspection = None
            if gen.inspect_top_k:
                rows = torch.tensor(active, device=self.fusion_device)
                inspection = self.inspect_step(
                    [x[rows] for x in step.source_logits],
                    step.scores[rows],
                    step.chosen[rows],
                    gen.inspect_top_k,
                )
            yield _Step(active, tokens, finish, inspection)
            ended = [i for i, f in zip(active, finish, strict=True) if f is not None]
            if ended:
                step.finished[torch.tensor(ended, device=step.finished.device)] = True
            if all(tracker.done(i) for i in range(live)):
                return
            session.step()

    def drafter(self, generation: GenerationConfig) -> str:
        """The role that drafts for speculative fusion: ``speculative.draft``, else the fused source with the
        largest weight (the one with the fewest parameters among equals)."""
        spec = generation.speculative
        if spec is not None and spec.draft is not None:
            if spec.draft not in self.pool.roles:
                raise ConfigError(
                    f"speculative.draft {spec.draft!r} is not a source; roles are {', '.join(self.pool.roles)}"
                )
            return spec.draft
        return max(
            self.roles, key=lambda r: (self.fusion.weight(r), -self.pool.get(r).backend.num_parameters)
        )

    @torch.inference_mode()
    def _decode_speculative(
        self,
        prompts: Sequence[str],
        encodings: list[dict[str, torch.Tensor]],
        gen: GenerationConfig,
        keys: torch.Tensor,
        tracker: StopChecker,
    ) -> Iterator[_Step]:
        """Rounds of draft-then-verify on growing caches (see :mod:`trimix.decoding.speculative`)."""
        device, vocab = self.fusion_device, self.vocab_size
        chooser = TokenChooser(gen)
        batch = len(tracker.rows)
        draft_role = self.drafter(gen)
        drafter = self.pool.get(draft_role)
        draft_index = self.roles.index(draft_role) if draft_role in self.roles else None
        weights = torch.tensor([self.weight_vector()] * batch, dtype=torch.float32, device=device)
        keys = keys.to(device)
        prefilled = [
            s.backend.prefill(e["input_ids"], e["attention_mask"])
            for s, e in zip(self.sources, encodings, strict=True)
        ]
        states = [state for _, state in prefilled]
        if draft_index is None:
            enc = self.encode(drafter, prompts)
            _, draft_state = drafter.backend.prefill(enc["input_ids"], enc["attention_mask"])
        else:
            draft_state = states[draft_index]
        all_states = states + ([draft_state] if draft_index is None else [])
        backends = [s.backend for s in self.sources] + ([drafter.backend] if draft_index is None else [])
        draft_head, draft_ids = None, None
        if gen.speculative.draft_vocab is not None:
            draft_enc = enc if draft_index is None else encodings[draft_index]
            draft_ids = frequent_tokens(
                self.pool.token_counts(draft_role, gen.speculative.draft_vocab_text),
                gen.speculative.draft_vocab,
                [
                    *draft_enc["input_ids"][draft_enc["attention_mask"].bool()].tolist(),
                    *self._eos(tracker).tolist(),
                ],
                vocab,
            )
            draft_head = drafter.backend.restricted_head(draft_ids)
            draft_ids = draft_ids.to(device)
            logger.info("the drafter proposes among %d of %d tokens", len(draft_ids), vocab)
        # The first token comes from the prefill, as in plain fused decoding.
        logits = [x.to(device) for x, _ in prefilled]
        scores = fused_scores(
            logits, weights, vocab, self.plausibility_index, self.plausibility_alpha, self.combine
        )
        first = chooser(scores, keys, torch.zeros(batch, dtype=torch.long, device=device))
        alive = [i for i in range(batch) if not tracker.done(i)]
        finish = tracker.record(alive, first[alive].tolist())
        inspection = (
            self.inspect_step([x[alive] for x in logits], scores[alive], first[alive], gen.inspect_top_k)
            if gen.inspect_top_k
            else None
        )
        yield _Step(alive, first[alive].tolist(), finish, inspection)
        stats = {row: SpeculativeStats() for row in range(batch)}
        active = [row for row, reason in zip(alive, finish, strict=True) if reason is None]
        self._keep_all(backends, all_states, torch.tensor(active, dtype=torch.long))
        pending = first[torch.tensor(active, dtype=torch.long, device=device)]
        k = gen.speculative.k if gen.speculative.k != "auto" else K_AUTO_START
        total = SpeculativeStats()
        while active:
            rows = torch.tensor(active, dtype=torch.long, device=device)
            room = min(tracker.rows[r].budget - len(tracker.tokens(r)) for r in active)
            k_round = max(0, min(k, room - 1))
            counters = torch.tensor([len(tracker.tokens(r)) for r in active], dtype=torch.long, device=device)
            before = [state.next_position.clone() for state in all_states]
            # draft_logits: what each draft was chosen from; drafter_logits: the drafter's full logits at the
            # k + 1 positions (the same unless the drafter proposes from a smaller vocabulary).
            token, draft_logits, draft_hidden, drafts = pending, [], [], []
            for j in range(k_round + 1):
                if draft_head is None:
                    step_logits = drafter.backend.advance(draft_state, token[:, None])[:, -1].to(device)
                    draft_logits.append(step_logits)
                else:
                    hidden = drafter.backend.advance(draft_state, token[:, None], hidden=True)[:, -1]
                    draft_hidden.append(hidden)
                    if j == k_round:
                        break
                    restricted = draft_head(hidden).to(device)
                    if (
                        not chooser.do_sample
                    ):  # greedy: the argmax among the draft vocabulary (ids are sorted)
                        token = draft_ids[restricted.float().argmax(-1)]
                        drafts.append(token)
                        continue
                    # sampling: the proposal over the whole vocabulary, for the noise and the acceptance rule
                    step_logits = _spread(restricted, draft_ids, vocab)
                    draft_logits.append(step_logits)
                if j < k_round:
                    token = self._draft_choice(chooser, step_logits[:, :vocab], keys[rows], counters + j)
                    drafts.append(token)
            sequence = torch.stack([pending, *drafts], dim=1)  # (b, k + 1)
            if draft_index is None:
                drafter_logits = None
            elif draft_head is None:
                drafter_logits = torch.stack(draft_logits, 1)
            else:
                drafter_logits = drafter.backend.head_logits(torch.stack(draft_hidden, 1)).to(device)
            source_logits = [
                drafter_logits if i == draft_index else source.backend.advance(states[i], sequence).to(device)
                for i, source in enumerate(self.sources)
            ]
            scores = fused_scores(
                source_logits,
                weights[rows],
                vocab,
                self.plausibility_index,
                self.plausibility_alpha,
                self.combine,
            )
            drafted = torch.stack(drafts, 1) if drafts else sequence[:, :0]
            target = _warp_positions(chooser, scores)
            draft_scores = None  # greedy: drafts are checked against the fused argmax
            if chooser.do_sample:
                draft_scores = (
                    _warp_positions(chooser, torch.stack(draft_logits[:k_round], 1)[..., :vocab].float())
                    if k_round
                    else scores.new_zeros(len(active), 0, vocab)
                )
            accepted, following = verify_drafts(target, drafted, draft_scores, keys[rows], counters)
            # Row b emits its first accepted[b] drafts, then the token that follows them.
            emitted = torch.cat([drafted, following[:, None]], 1).scatter(
                1, accepted[:, None], following[:, None]
            )
            counts = accepted + 1
            yield from self._emit_round(
                active, emitted, counts, tracker, gen, source_logits, scores, stats, k_round, accepted
            )
            for row, a, kept in zip(active, accepted.tolist(), counts.tolist(), strict=True):
                stats[row].record(k_round, a, kept)
            continuing = [i for i, row in enumerate(active) if not tracker.done(row)]
            keep = torch.tensor(continuing, dtype=torch.long)
            self._keep_all(backends, all_states, keep)
            for backend, state, old in zip(backends, all_states, before, strict=True):
                lengths = (old.to(keep.device)[keep] + 1 + accepted.to(keep.device)[keep]).to(old.device)
                backend.crop(state, lengths)
            pending = following[keep.to(device)]
            active = [active[i] for i in continuing]
            if gen.speculative.k == "auto":
                merged = SpeculativeStats()
                for row_stats in stats.values():
                    merged.merge(row_stats)
                k = next_k(merged.accepted / merged.drafted if merged.drafted else None, k)
        for row_stats in stats.values():
            total.merge(row_stats)
        draft = {"draft": draft_role, "draft_vocab": None if draft_ids is None else len(draft_ids)}
        logger.info("speculative fusion: %s", describe_stats({**draft, **total.to_dict()}))
        yield _Step(
            [],
            [],
            [],
            stats={row: {**draft, **st.to_dict()} for row, st in stats.items()},
        )

    def _draft_choice(
        self, chooser: TokenChooser, logits: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
    ) -> torch.Tensor:
        return chooser(logits.float(), keys, counters, STREAM_DRAFT)

    def _emit_round(
        self,
        active: list[int],
        emitted: torch.Tensor,
        counts: torch.Tensor,
        tracker: StopChecker,
        gen: GenerationConfig,
        source_logits: list[torch.Tensor],
        scores: torch.Tensor,
        stats: dict[int, SpeculativeStats],
        k_round: int,
        accepted: torch.Tensor,
    ) -> Iterator[_Step]:
        """Hand a round's tokens to the host bookkeeping position by position, so that an end-of-sequence,
        a stop string, the token budget or the context inside the accepted run ends the row exactly there."""
        tokens, counts = emitted.tolist(), counts.tolist()
        for position in range(max(counts)):
            rows = [i for i, row in enumerate(active) if position < counts[i] and not tracker.done(row)]
            if not rows:
                break
            picked = [tokens[i][position] for i in rows]
            finish = tracker.record([active[i] for i in rows], picked)
            inspection = None
            if gen.inspect_top_k:
                index = torch.tensor(rows, device=scores.device)
                inspection = self.inspect_step(
                    [x[index, position] for x in source_logits],
                    scores[index, position],
                    torch.tensor(picked, device=scores.device),
                    gen.inspect_top_k,
                )
            yield _Step([active[i] for i in rows], picked, finish, inspection)

    def _eos(self, tracker: StopChecker) -> torch.Tensor:
        return torch.tensor(tracker.eos, dtype=torch.long, device=self.fusion_device)

    @staticmethod
    def _keep_all(backends: list[Any], states: list[Any], rows: torch.Tensor) -> None:
        if (
            rows.numel()
            and rows.numel() == states[0].batch_size
            and bool((rows == torch.arange(rows.numel())).all())
        ):
            return
        for backend, state in zip(backends, states, strict=True):
            backend.keep_rows(state, rows)

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
        ``trimix.inspect``)."""
        vocab = self.vocab_size
        fused_probs = torch.softmax(scores, dim=-1)
        source_probs = [torch.softmax(x[..., :vocab].float(), dim=-1) for x in source_logits]
        if weights is None:
            weights = torch.tensor([self.weight_vector()] * tokens.shape[0], device=scores.device)
        best_two = scores.topk(2, dim=-1).indices  # the runner-up: the best token other than the chosen one
        runner_up = torch.where(best_two[:, 0] == tokens, best_two[:, 1], best_two[:, 0])
        margins = margin_contributions([x[..., :vocab] for x in source_logits], weights, tokens, runner_up)
        result = []
        for i, token in enumerate(tokens.tolist()):

            def top(probs: torch.Tensor, i: int = i) -> list[tuple[str, float]]:
                values, ids = probs[i].topk(min(k, vocab))
                return [(self.token_text(int(t)), float(v)) for v, t in zip(values, ids, strict=True)]

            shares = dict(zip(self.roles, margins[i].tolist(), strict=True))
            result.append(
                TokenInspection(
                    token_id=token,
                    token=self.token_text(token),
                    fused_prob=float(fused_probs[i, token]),
                    fused_top=top(fused_probs),
                    sources={
                        role: SourceCandidates(float(p[i, token]), top(p))
                        for role, p in zip(self.roles, source_probs, strict=True)
                    },
                    contributions=shares,
                    leader=max(shares, key=shares.get) if shares else None,
                )
            )
        return result

    def token_text(self, token_id: int) -> str:
        """A token as readable text; a piece of a multi-byte character is marked ``⟨partial⟩``."""
        return readable_token(self.tokenizer, token_id)

    # ---------------------------------------------------------------- likelihood
    def scorer(self, texts: Sequence[Any], *, roles: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """A :class:`~trimix.search.FusedPerplexityScorer` over ``roles`` (default: this model's sources):
        one forward per source per text, then any number of weight vectors scored from it."""
        from trimix.search.scoring import FusedPerplexityScorer

        sources = self.sources if roles is None else [self.pool.get(r) for r in roles]
        return FusedPerplexityScorer(sources, self.vocab_size, texts, **kwargs)

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, progress: bool = False
    ) -> list[Loglikelihood]:
        """Fused log-probability of each continuation given its context (lm-evaluation-harness semantics).

        The pair is encoded whole and the context alone; the continuation is the whole encoding's tokens
        after the context's (trailing spaces of the context move to the continuation, so the split falls
        on a token boundary); an empty context is replaced by the tokenizer's BOS (else EOS). The
        plausibility constraint is a decoding rule and does not apply here.

        Returns:
            One :class:`Loglikelihood` per request (natural log; ``is_greedy``: every continuation token
            is the fused argmax at its position).
        """
        return self.loglikelihood_by_fusion(requests, [self.fusion], progress=progress)[0]

    def loglikelihood_rolling(
        self, texts: Sequence[str], *, max_length: int | None = None, progress: bool = False
    ) -> list[float]:
        """Whole-text fused log-likelihood, every token predicted (lm-evaluation-harness semantics).

        The text is encoded without special tokens and scored after a prefix token (BOS, else EOS) in
        disjoint windows of at most ``max_length`` predicted tokens (default: the smallest context among
        the sources), each window conditioned on the tokens just before it.
        """
        per_text = self.loglikelihood_rolling_by_fusion(
            texts, [self.fusion], max_length=max_length, progress=progress
        )
        return [r.logprob for r in per_text[0]]

    def loglikelihood_by_fusion(
        self, requests: Sequence[tuple[str, str]], fusions: Sequence[Fusion], *, progress: bool = False
    ) -> list[list[Loglikelihood]]:
        """:meth:`loglikelihood` under several fusions of the loaded sources at once: one forward pass per
        source per request serves them all. Returns one list per fusion."""
        from trimix.search.scoring import ScoringText

        items = []
        for i, (context, continuation) in enumerate(requests):
            context_ids, continuation_ids = split_continuation(self.sources[0], context, continuation)
            if not continuation_ids:
                raise DataError(f"request {i}: the continuation {continuation!r} encodes to no token")
            items.append(
                ScoringText(
                    str(i),
                    context + continuation,
                    tokens=context_ids + continuation_ids,
                    score_last=len(continuation_ids),
                )
            )
        return self._score_items(items, fusions, progress)

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], int]], *, progress: bool = False
    ) -> list[Loglikelihood]:
        """Token-level likelihood: each request is ``(ids, n)``, the fused log-probability of the last ``n``
        ids given the ones before (for callers that tokenise themselves, such as lm-evaluation-harness)."""
        from trimix.search.scoring import ScoringText

        items = []
        for i, (ids, n) in enumerate(requests):
            if not 0 < n < len(ids):
                raise DataError(
                    f"request {i}: scoring the last {n} of {len(ids)} tokens needs 0 < n < len(ids)"
                )
            items.append(ScoringText(str(i), "", tokens=list(ids), score_last=n))
        return self._score_items(items, [self.fusion], progress)[0]

    def loglikelihood_rolling_by_fusion(
        self,
        texts: Sequence[str],
        fusions: Sequence[Fusion],
        *,
        max_length: int | None = None,
        progress: bool = False,
    ) -> list[list[Loglikelihood]]:
        """:meth:`loglikelihood_rolling` under several fusions at once (with each text's token count)."""
        from trimix.search.scoring import ScoringText

        source = self.sources[0]
        limit = max_length or min((s.max_positions or 2048) for s in self.sources)
        prefix = _prefix_token(source.tokenizer)
        items, owner = [], []
        for i, text in enumerate(texts):
            tokens = source.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise DataError(f"text {i} encodes to no token")
            for context, targets in rolling_windows(tokens, prefix, limit):
                items.append(
                    ScoringText(f"{i}:{len(items)}", text, tokens=context + targets, score_last=len(targets))
                )
                owner.append(i)
        results = []
        for per_item in self._score_items(items, fusions, progress):
            totals = [[0.0, True, 0] for _ in texts]
            for i, result in zip(owner, per_item, strict=True):
                totals[i][0] += result.logprob
                totals[i][1] &= result.is_greedy
                totals[i][2] += result.n_tokens
            results.append([Loglikelihood(lp, greedy, n) for lp, greedy, n in totals])
        return results

    def _score_items(
        self, items: list[Any], fusions: Sequence[Fusion], progress: bool
    ) -> list[list[Loglikelihood]]:
        used = {r for fusion in fusions for r in fusion.weights if fusion.weight(r) != 0.0}
        roles = [r for r in self.pool.roles if r in used]
        scorer = self.scorer(items, roles=roles, progress=progress, share_prefix=True)
        # Linear methods: every weight combination from one factorised pass. Others fuse the full logits
        # with their own combination, one fusion at a time (the forwards are still shared).
        results: list[list[Loglikelihood] | None] = [None] * len(fusions)
        linear = [c for c, f in enumerate(fusions) if get_method(f.method).linear]
        batches = [(linear, None)] if linear else []
        batches += [([c], get_method(f.method).combine) for c, f in enumerate(fusions) if c not in linear]
        for members, combine in batches:
            matrix = torch.tensor([fusions[c].vector(roles) for c in members], dtype=torch.float32)
            totals = scorer.score(matrix, greedy=True, combine=combine)
            for j, c in enumerate(members):
                results[c] = [
                    Loglikelihood(
                        -float(totals.per_text[i, j]),
                        bool(totals.per_text_greedy[i, j]),
                        totals.tokens_per_text[i],
                    )
                    for i in range(len(items))
                ]
        return results  # type: ignore[return-value]


def emit_text(shown: str, text: str, finished: bool, stops: Sequence[str]) -> tuple[str, str]:
    """The text a stream may emit now: ``(delta, new shown text)``.

    Emitted text is never taken back, so while a row runs the last ``len(longest stop) - 1`` characters
    are held back (a stop string may be starting there; the output never contains it) and so is an
    incomplete multi-byte character (U+FFFD at the end). When the row ends, the rest is emitted.
    """
    if finished:
        visible = text
    else:
        limit = len(text) - max((len(s) - 1 for s in stops), default=0)
        while limit > len(shown) and text[limit - 1] == "\ufffd":
            limit -= 1
        visible = text[: max(limit, len(shown))]
    if not visible.startswith(shown):  # cannot happen for text that only grows; never repeat what was sent
        return "", shown
    return visible[len(shown) :], visible


def encode_texts(source: Source, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenise texts exactly as given (already rendered for ``source``): left-padded ids and mask.

    Raises:
        DataError: a text that tokenises to nothing.
    """
    enc = source.tokenizer(
        texts,
        padding=True,
        return_tensors="pt",
        padding_side="left",
        add_special_tokens=source.adds_special_tokens,
    )
    for i, n in enumerate(enc["attention_mask"].sum(-1).tolist()):
        if n == 0:
            raise DataError(f"prompt {i} is empty after tokenisation for source {source.role!r}")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def readable_token(tokenizer: Any, token_id: int) -> str:
    """A token as the text it stands for (byte-level symbols decoded); a token that is only part of a
    multi-byte UTF-8 character decodes to U+FFFD and is shown as ``⟨partial⟩``."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text  # SentencePiece decoders drop a word-initial space when a token stands alone
    return text.replace("\ufffd", "⟨partial⟩")


def split_continuation(source: Source, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context join the continuation; the continuation's
    tokens are the whole encoding's after the context's encoding; an empty context becomes a prefix token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    special = source.adds_special_tokens
    tokenizer = source.tokenizer
    whole = tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
    if not context:
        prefix = _prefix_token(tokenizer)
        body = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return [prefix], body
    context_ids = tokenizer(context, add_special_tokens=special)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows ``(context, targets)`` covering every token once, each input at most ``max_length``."""
    windows = []
    for start in range(0, len(tokens), max_length):
        targets = tokens[start : start + max_length]
        history = [prefix, *tokens][: start + 1]  # everything before the first target, prefix included
        context = history[-(max_length - len(targets) + 1) :]
        windows.append((context, targets))
    return windows


def _prefix_token(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return int(token)


def _warp_positions(chooser: TokenChooser, scores: torch.Tensor) -> torch.Tensor:
    """Apply the chooser's warpers to ``(B, J, V)`` scores, position by position."""
    if not chooser.do_sample:
        return scores
    batch, positions, vocab = scores.shape
    return chooser.warp(scores.reshape(batch * positions, vocab)).reshape(batch, positions, vocab)


def _pad_rows(tensor: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    extra = tensor.new_full((rows - tensor.shape[0], tensor.shape[1]), value)
    return torch.cat([tensor, extra])


__all__ = [
    "Engine",
    "FusedLM",
    "Generation",
    "Loglikelihood",
    "SourcePool",
    "StreamEvent",
    "TokenInspection",
]


def _spread(logits: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Scores over ``ids`` ``(B, N)`` placed in a ``(B, vocab)`` row, ``-inf`` at every other token."""
    full = logits.new_full((logits.shape[0], vocab), float("-inf"))
    return full.index_copy_(1, ids, logits)
