"""The loaded sources a fused model draws on, shared by every fusion of them (``FusedLM.with_weights``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from trimix.backends.loading import Source, load_source
from trimix.backends.vocab import check_vocabularies
from trimix.bytelevel import END, ByteLevelBackend
from trimix.config import FusionConfig, TrimixConfig
from trimix.data import read_text_spec
from trimix.decoding.static import SessionPool
from trimix.errors import ConfigError, VocabularyMismatchError

logger = logging.getLogger(__name__)


class SourcePool:
    """The loaded sources that a family of fused models shares, loading a config's others on demand.

    Args:
        sources: loaded sources (unique roles).
        config: the run config they came from; roles it names but that are not loaded yet are loaded
            when a fusion first weights them.
        vocab_mode: ``exact`` or ``shared_prefix`` (see :func:`trimix.backends.check_vocabularies`).
        space: ``tokens`` fuses next-token logits (the sources must share a tokenizer); ``bytes``
            fuses next-byte log-probabilities (:mod:`trimix.bytelevel`), whatever the tokenizers;
            ``auto`` (default) fuses tokens where the tokenizers agree and bytes where they differ.
            None: the config's ``fusion.space`` (``auto`` without a config).
        byte_prune, byte_max_nodes: byte-level pruning (:class:`~trimix.bytelevel.ByteLevelBackend`);
            None: the config's (or :class:`~trimix.config.FusionConfig`'s defaults).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        config: TrimixConfig | None = None,
        vocab_mode: str = "exact",
        space: str | None = None,
        byte_prune: float | None = None,
        byte_max_nodes: int | None = None,
    ) -> None:
        roles = [s.role for s in sources]
        if len(set(roles)) != len(roles):
            raise ConfigError(f"source roles must be unique; got {roles}")
        self.token_sources: dict[str, Source] = {s.role: s for s in sources}
        self.sources: dict[str, Source] = dict(self.token_sources)
        self.config = config
        self.vocab_mode = vocab_mode
        fusion = config.fusion if config is not None else None
        self.space_setting = space or (fusion.space if fusion is not None else "auto")
        defaults = fusion or FusionConfig()
        self.byte_prune = defaults.byte_prune if byte_prune is None else byte_prune
        self.byte_max_nodes = defaults.byte_max_nodes if byte_max_nodes is None else byte_max_nodes
        self.space = "tokens"
        self.sessions = SessionPool()
        self.vocab_size = self._check() if self.sources else 0
        self._token_counts: dict[tuple[str, tuple[str, ...]], Counter[int]] = {}
        self.described: set[str] = set()  # fusions already logged

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
        self.token_sources[role] = source
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
        """Check the vocabularies and choose the fusion space; wrap the sources for bytes."""
        sources = list(self.token_sources.values())
        space = self.space_setting
        if space in ("auto", "tokens"):
            try:
                vocab = check_vocabularies(
                    {s.role: s.tokenizer for s in sources},
                    {s.role: s.logit_rows for s in sources},
                    self.vocab_mode,
                )
            except VocabularyMismatchError as exc:
                if space == "tokens":
                    raise VocabularyMismatchError(
                        f"{exc} (or set `fusion.space: bytes` to fuse at the byte level)"
                    ) from exc
                logger.info(
                    "the sources' tokenizers differ (%s); fusing at the byte level (`fusion.space: bytes`): each "
                    "source is read one byte at a time, with a forward only where a token boundary is crossed. "
                    "This costs about one fused step per byte instead of per token",
                    exc,
                )
                space = "bytes"
        if space == "bytes":
            self.sources = {s.role: self._byte_level(s) for s in sources}
            sources = list(self.sources.values())
            vocab = END + 1  # bytes and END; the start marker is input only, like a padded row

        else:
            self.sources = dict(self.token_sources)
        self.space = space if space == "bytes" else "tokens"
        for source in sources:
            if source.tokenizer.pad_token_id is None:
                # Pads are masked out; any id works, and EOS is the conventional choice.
                source.tokenizer.pad_token = source.tokenizer.eos_token
        return vocab

    def _byte_level(self, source: Source) -> Source:
        """``source`` read one byte at a time (already byte-level sources are kept)."""
        current = self.sources.get(source.role)
        if current is not None and isinstance(current.backend, ByteLevelBackend):
            return current
        if isinstance(source.backend, ByteLevelBackend):
            return source
        backend = ByteLevelBackend(source.backend, prune=self.byte_prune, max_nodes=self.byte_max_nodes)
        return Source(source.role, backend, source.config)
