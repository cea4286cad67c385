"""Continual pretraining of the small model: corpus packing, Trainer + PEFT LoRA, before/after perplexity."""

from trimix.training.corpus import pack_blocks, read_documents, split_corpus
from trimix.training.cpt import CptInterrupted, CptReport, held_out_perplexity, run_cpt

__all__ = [
    "CptInterrupted",
    "CptReport",
    "held_out_perplexity",
    "pack_blocks",
    "read_documents",
    "run_cpt",
    "split_corpus",
]
