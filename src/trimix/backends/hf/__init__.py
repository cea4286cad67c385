"""A Hugging Face causal LM behind :class:`~trimix.backends.base.SourceBackend`.

trimix builds every attention mask itself, from what each cache column holds: whether it is a real
token of the row (``valid``) and that token's position in the row (``positions``). A query at
position ``p`` may attend to a valid column at position ``q <= p`` (and, on sliding-window layers,
``p - q < window``). Because the masks speak of token positions and not of column indices:

* a left-padded row attends exactly as it would alone (pads are never counted in a sliding window,
  unlike transformers' own masks, which count padded columns);
* columns can be dropped per row by marking them invalid (speculative decoding's ragged rollback),
  exactly, even past a sliding window: caches keep every column, so nothing has to be recomputed;
* new rows can join a batch with other column layouts (continuous batching).

The masks go to the model as 4-D additive biases (one per attention layer type), which transformers
passes through unchanged; the model's attention must therefore be ``sdpa`` or ``eager``. Every
backend checks once, on a short probe, that its masks and output head reproduce the model's own
forward pass, so a family that computes logits differently fails at load time, not silently.

Two cache storages sit behind the same calls: a growing one (transformers' ``DynamicCache`` with
full layers) and a preallocated one (:class:`SlotLayer`, written at columns a cursor names) whose
tensors keep their addresses, which the CUDA-graph decoder needs.
"""

from trimix.backends.hf.backend import HFBackend, cache_keyword, use_grouped_attention
from trimix.backends.hf.state import ColumnCursor, HFState, SlotLayer, attention_bias

__all__ = [
    "ColumnCursor",
    "HFBackend",
    "HFState",
    "SlotLayer",
    "attention_bias",
    "cache_keyword",
    "use_grouped_attention",
]
