"""Loading causal LMs and tokenizers as fusion sources, and checking that their vocabularies agree."""

from trimix.backends.loading import Source, load_source, load_tokenizer, resolve_cache_dir
from trimix.backends.vocab import check_vocabularies

__all__ = ["Source", "check_vocabularies", "load_source", "load_tokenizer", "resolve_cache_dir"]
