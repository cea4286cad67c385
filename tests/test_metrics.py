"""Metrics against hand-computed values and against sacrebleu directly."""

from __future__ import annotations

import pytest
from sacrebleu.metrics import BLEU, CHRF

from trimix.metrics import (
    accuracy,
    bleu,
    chrf,
    chrf_pp,
    last_number,
    mean_rouge_l_f,
    metric_statistics,
    rouge_l_f,
    unicode_tokens,
)

HYP = ["the cat sat on the mat", "ئۇيغۇر تىلى تۈركىي تىللار"]
REF = ["the cat is on the mat", "ئۇيغۇر تىلى تۈركىي تىل"]


def test_chrf_and_chrf_pp_match_sacrebleu_and_differ() -> None:
    expected_chrf = CHRF(word_order=0, lowercase=True).corpus_score(HYP, [REF]).score
    assert chrf(HYP, REF) == pytest.approx(expected_chrf)
    assert chrf_pp(HYP, REF) == pytest.approx(
        CHRF(word_order=2, lowercase=True).corpus_score(HYP, [REF]).score
    )
    assert chrf(HYP, REF) != pytest.approx(chrf_pp(HYP, REF))
    assert chrf_pp(REF, REF) == pytest.approx(100.0)


def test_bleu_uses_chinese_tokenizer_for_chinese_targets() -> None:
    hyp, ref = ["今天天气很好"], ["今天天气非常好"]
    expected = BLEU(tokenize="zh", lowercase=True).corpus_score(hyp, [ref]).score
    assert bleu(hyp, ref, "zho_Hans") == pytest.approx(expected)
    assert bleu(hyp, ref, "zho_Hans") > bleu(hyp, ref, "eng_Latn")  # 13a sees one "word" each


def test_translation_metrics_ignore_case_as_the_papers_evaluation_does() -> None:
    # The TriMix authors' eval.py scores chrF, chrF++ and BLEU lowercased: an English output that differs
    # from its reference only in case is a perfect translation, in the corpus score and in the bootstrap.
    hyp, ref = ["The Cat Sat On The Mat."], ["the cat sat on the mat."]
    for metric in (chrf, chrf_pp, bleu):
        assert metric(hyp, ref) == pytest.approx(100.0)
    assert chrf_pp(hyp, ref) > CHRF(word_order=2).corpus_score(hyp, [ref]).score  # the cased score
    rows = [{"prediction": h, "reference": r} for h, r in zip(hyp * 25, ref * 25, strict=True)]
    for name in ("chrf", "chrf_pp", "bleu"):
        assert metric_statistics(name, rows).score() == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # Uyghur: 3 of 3 predicted tokens in order in a 4-token reference -> P=1, R=3/4, F=6/7.
        ("ئۇيغۇر تىلى تۈركىي", "ئۇيغۇر تىلى تۈركىي تىللار", 100 * 6 / 7),
        # Tibetan syllables split at the tsheg; vowel signs stay attached (ཀྱི, ཡིག are one token each), so the
        # tokens are [བོད ཀྱི ཡིག] and [བོད ཀྱི སྐད ཡིག]: LCS 3 of 3 and 4 -> P=1, R=3/4, F=2PR/(P+R)=6/7.
        ("བོད་ཀྱི་ཡིག", "བོད་ཀྱི་སྐད་ཡིག", 100 * 2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4)),
        # The same syllables out of order, [བོད ཡིག ཀྱི]: the longest common subsequence is 2 (བོད ཀྱི, or
        # བོད ཡིག), not the 3 shared tokens -> P=2/3, R=2/4, F=2PR/(P+R)=4/7.
        ("བོད་ཡིག་ཀྱི", "བོད་ཀྱི་སྐད་ཡིག", 100 * 4 / 7),
        # Kazakh Cyrillic, case-insensitive: identical after lower-casing.
        ("Қазақ Тілі", "қазақ тілі", 100.0),
        ("", "қазақ тілі", 0.0),
    ],
)
def test_rouge_l_keeps_non_latin_scripts(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l_f(prediction, reference) == pytest.approx(expected)


def test_unicode_tokens_never_drop_a_script() -> None:
    assert unicode_tokens("བོད་ཀྱི་སྐད") == ["བོད", "ཀྱི", "སྐད"]
    assert unicode_tokens("ᠮᠣᠩᠭᠣᠯ ᠬᠡᠯᠡ") == ["ᠮᠣᠩᠭᠣᠯ", "ᠬᠡᠯᠡ"]
    assert unicode_tokens("中文 ok") == ["中", "文", "ok"]
    assert mean_rouge_l_f(["བོད་ཀྱི"], ["བོད་ཀྱི"]) == pytest.approx(100.0)


def test_hand_computed_rouge_l_on_english() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 and 6 -> F = 5/6.
    assert rouge_l_f(HYP[0], REF[0]) == pytest.approx(100 * 5 / 6)


def test_accuracy_and_last_number() -> None:
    assert accuracy([True, False, True, True]) == 75.0
    assert last_number("first 3 apples, then 1,250.") == 1250.0
    assert last_number("the answer is -4.5") == -4.5
    assert last_number("no digits") is None
