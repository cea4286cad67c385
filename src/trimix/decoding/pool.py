"""The loaded sources a fused model draws on, shared by every fusion of them (``FusedLM.with_weights``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from trimix.backends.loading import Source, load_source
from trimix.backends.vocab import check_vocabularies
from trimix.config import TrimixConfig
from trimix.data import read_text_spec
from trimix.decoding.static import SessionPool
from trimix.errors import ConfigError

logger = logging.getLogger(__name__)


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
