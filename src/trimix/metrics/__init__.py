"""Metrics by name, all on a 0-100 scale (perplexity excepted): accuracy, chrf, chrf_pp, bleu, rouge_l_f.

Corpus-level metrics (chrF, chrF++, BLEU) are computed by sacrebleu over all items of a cell, lowercased
as the paper's evaluation computes them;
ROUGE-L F1 is averaged over items with a tokenizer that keeps non-Latin scripts (the stock
``rouge-score`` tokenizer keeps only ``[a-z0-9]`` and scores Uyghur or Tibetan titles 0).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

from sacrebleu.metrics import BLEU, CHRF

from trimix.errors import ConfigError


def accuracy(correct: Sequence[bool]) -> float:
    """Percentage of correct items (0-100)."""
    return 100.0 * sum(bool(c) for c in correct) / len(correct) if correct else 0.0


def sacrebleu_metric(name: str, target_lang: str | None = None) -> CHRF | BLEU:
    """The sacrebleu scorer behind ``chrf``, ``chrf_pp`` or ``bleu``, configured as the paper's evaluation
    (the TriMix authors' eval.py) configures it: lowercased, chrF++ with word order 2, BLEU with the
    Chinese tokenizer when the target is Chinese (else sacrebleu's default 13a)."""
    if name in {"chrf", "chrf_pp"}:
        return CHRF(word_order=2 if name == "chrf_pp" else 0, lowercase=True)
    if name == "bleu":
        tokenize = "zh" if target_lang in {"zh", "zho_Hans", "zho_Hant"} else "13a"
        return BLEU(tokenize=tokenize, lowercase=True)
    raise ConfigError(f"{name!r} is not a sacrebleu metric; use chrf, chrf_pp or bleu")


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character n-grams up to 6, no word n-grams, lowercased), 0-100, via sacrebleu."""
    return sacrebleu_metric("chrf").corpus_score(list(predictions), [list(references)]).score


def chrf_pp(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF++ (character order 6, word order 2, lowercased), 0-100, via sacrebleu; the paper's MT
    metric."""
    return sacrebleu_metric("chrf_pp").corpus_score(list(predictions), [list(references)]).score


def bleu(predictions: Sequence[str], references: Sequence[str], target_lang: str | None = None) -> float:
    """Corpus BLEU (lowercased), 0-100, via sacrebleu; the Chinese tokenizer when the target is Chinese."""
    return sacrebleu_metric("bleu", target_lang).corpus_score(list(predictions), [list(references)]).score


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")


def unicode_tokens(text: str) -> list[str]:
    """Lower-cased tokens split at whitespace, punctuation and symbols, whatever the script.

    Combining marks stay with their letters (Tibetan vowel signs, Arabic harakat), the Tibetan tsheg
    and Arabic punctuation separate tokens, and CJK characters are one token each.
    """
    tokens: list[str] = []
    current: list[str] = []
    for char in unicodedata.normalize("NFC", text.lower()):
        category = unicodedata.category(char)
        if _CJK.match(char):
            if current:
                tokens.append("".join(current))
                current = []
            tokens.append(char)
        elif category[0] in "LMN" or char == "_":
            current.append(char)
        elif current:
            tokens.append("".join(current))
            current = []
    if current:
        tokens.append("".join(current))
    return tokens


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b, start=1):
            row.append(previous[j - 1] + 1 if x == y else max(previous[j], row[j - 1]))
        previous = row
    return previous[-1]


def rouge_l_f(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (0-100) of one pair, on :func:`unicode_tokens`."""
    pred, ref = unicode_tokens(prediction), unicode_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def mean_rouge_l_f(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (0-100) over pairs."""
    scores = [rouge_l_f(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number in a text (thousands separators and a trailing period removed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    try:
        return float(value)
    except ValueError:
        return None


CorpusMetric = Callable[..., float]
CORPUS_METRICS: dict[str, CorpusMetric] = {
    "chrf": chrf,
    "chrf_pp": chrf_pp,
    "bleu": bleu,
    "rouge_l_f": mean_rouge_l_f,
}
HIGHER_IS_BETTER = {
    "accuracy": True,
    "chrf": True,
    "chrf_pp": True,
    "bleu": True,
    "rouge_l_f": True,
    "perplexity": False,
    "bits_per_byte": False,
}


def metric_statistics(name: str, rows: Sequence[dict], target_lang: str | None = None):
    """Per-item sufficient statistics of a metric over prediction rows (see :mod:`trimix.metrics.bootstrap`):
    the score of their sum is the metric, and resampling the rows gives its uncertainty."""
    from trimix.metrics import bootstrap as b

    predictions = [r.get("prediction", "") for r in rows]
    references = [r.get("reference", "") for r in rows]
    if name == "accuracy":
        return b.accuracy_stats([r["correct"] for r in rows])
    if name == "perplexity":
        return b.perplexity_stats([r["nll"] for r in rows], [r["n_tokens"] for r in rows])
    if name == "bits_per_byte":
        return b.bits_per_byte_stats([r["nll"] for r in rows], [r["n_bytes"] for r in rows])
    if name == "rouge_l_f":
        return b.mean_stats([rouge_l_f(p, ref) for p, ref in zip(predictions, references, strict=True)])
    if name in {"chrf", "chrf_pp", "bleu"}:
        return b.sacrebleu_stats(sacrebleu_metric(name, target_lang), predictions, references)
    raise ConfigError(
        f"unknown metric {name!r}; available: accuracy, perplexity, bits_per_byte, {', '.join(sorted(CORPUS_METRICS))}"
    )


def corpus_metric(name: str) -> CorpusMetric:
    """Look a corpus-level metric up by name."""
    if name not in CORPUS_METRICS:
        raise ConfigError(
            f"unknown metric {name!r}; available: {', '.join(sorted(CORPUS_METRICS))}, accuracy"
        )
    return CORPUS_METRICS[name]
