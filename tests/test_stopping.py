"""The stop checker and its incremental detokenizer: text grown token by token is always a prefix of the
row's full decode (equal to it once no character is incomplete), stop strings are found on text however
many tokens a character takes, and the conditions apply in their order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimix.decoding.stopping import IncrementalDetokenizer, StopChecker, first_stop
from trimix.testing import build_byte_level_tokenizer, build_tokenizer

TIBETAN = "བོད་ཡིག"  # 7 characters, 21 byte tokens of the byte-level BPE (no Tibetan in its corpus)


@pytest.fixture(scope="module", params=["metaspace", "byte_level"])
def any_tokenizer(request):
    return build_tokenizer() if request.param == "metaspace" else build_byte_level_tokenizer()


@pytest.fixture(scope="module")
def byte_level():
    return build_byte_level_tokenizer()


TEXTS = [
    "Hello world, this is a small test.",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ.",
    f"Tibetan {TIBETAN} and more {TIBETAN}.",
    "  leading spaces\nand lines\n\n",
]


def _grow(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    texts = []
    for token in ids:
        detok.add(token)
        texts.append(detok.text)
    return texts


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_is_the_full_decode(any_tokenizer, text) -> None:
    ids = any_tokenizer(text, add_special_tokens=False)["input_ids"]
    grown = _grow(any_tokenizer, ids)
    for n, partial in enumerate(grown, start=1):
        full = any_tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(partial), (n, partial, full)
        if not full.endswith("\ufffd"):
            assert partial == full
    assert grown[-1] == any_tokenizer.decode(ids, skip_special_tokens=True)


@given(st.lists(st.integers(0, 399), min_size=1, max_size=40))
def test_incremental_text_is_a_prefix_of_the_full_decode_for_any_tokens(ids) -> None:
    tokenizer = _BYTE_LEVEL
    grown = _grow(tokenizer, ids)
    for n, partial in enumerate(grown, start=1):
        assert tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(partial)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if not full.endswith("\ufffd"):
        assert grown[-1] == full


_BYTE_LEVEL = build_byte_level_tokenizer()


def test_a_character_split_into_byte_tokens_adds_text_only_when_complete(byte_level) -> None:
    ids = byte_level(TIBETAN, add_special_tokens=False)["input_ids"]
    assert len(ids) == 21  # three byte tokens per character
    detok = IncrementalDetokenizer(byte_level)
    added = [detok.add(t) for t in ids]
    assert [a for a in added if a] == list(TIBETAN)
    assert [i for i, a in enumerate(added) if a] == [2, 5, 8, 11, 14, 17, 20]


def test_a_stop_string_of_many_byte_tokens_is_found(byte_level) -> None:
    """A 7-character Tibetan stop string is 21 tokens: a check on the last len(stop) + 4 tokens misses it."""
    ids = byte_level(f"abc {TIBETAN} tail", add_special_tokens=False)["input_ids"]
    checker = StopChecker(byte_level)
    checker.add_row(0, stops=[TIBETAN], max_new_tokens=100)
    reason, fed = None, 0
    while reason is None:
        reason = checker.add(0, ids[fed])
        fed += 1
    assert reason == "stop"
    text = byte_level.decode(ids[:fed], skip_special_tokens=True)
    assert text.endswith(TIBETAN) and not byte_level.decode(ids[: fed - 1]).endswith(TIBETAN)
    assert checker.rows[0].text == "abc "
    # The old tail window decoded too few tokens to contain the stop string.
    tail = byte_level.decode(ids[:fed][-(len(TIBETAN) + 4) :], skip_special_tokens=True)
    assert TIBETAN not in tail


def test_finish_reasons_in_order(any_tokenizer) -> None:
    ids = any_tokenizer("Hello world, this is", add_special_tokens=False)["input_ids"]
    eos = any_tokenizer.eos_token_id
    checker = StopChecker(any_tokenizer)
    checker.add_row(0, max_new_tokens=3, eos=[eos])
    checker.add_row(1, max_new_tokens=10, budget=2)
    checker.add_row(2, max_new_tokens=10, budget=0)
    assert checker.rows[2].finish_reason == "context" and checker.done(2)
    assert checker.record([0, 1], ids[:2]) == [None, None]
    assert checker.record([0, 1], [eos, ids[2]]) == ["eos", "context"]
    with pytest.raises(RuntimeError, match="finished"):
        checker.add(0, ids[0])
    # Row 3: the stop string and the length limit arrive with the same token: the stop string wins.
    world = any_tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    checker.add_row(3, stops=["world"], max_new_tokens=len(world), eos=[eos])
    assert [checker.add(3, t) for t in world] == [None] * (len(world) - 1) + ["stop"]
    assert checker.rows[3].text.rstrip() == "Hello"


@given(
    st.text(alphabet="ab\n", max_size=30),
    st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=1),
)
def test_first_stop_is_the_earliest_occurrence(text, stops) -> None:
    found = first_stop(text, stops)
    assert all(s not in text[: found + len(s) - 1] for s in stops)
    assert found == len(text) or any(text.startswith(s, found) for s in stops)
