"""The per-source backend seam: advance(k), ragged crop, row selection and insertion are exact.

Each test compares an operation with the plain way of getting the same thing (single steps, a fresh
prefill of the kept tokens, decoding rows alone) on tiny Qwen2, Llama and Gemma3 models; the Gemma3
model has a 6-token sliding window, so every prompt here runs past it. Both cache storages are
checked: the growing one and the preallocated one the CUDA-graph decoder uses.
"""

from __future__ import annotations

import pytest
import torch

from trimix.backends.hf import HFBackend, attention_bias
from trimix.testing import build_model

PROMPTS = [
    "Hello world, this is a small test of fused",
    "ئۇيغۇر تىلى",
    "The quick brown fox jumps over the lazy dog and more words here",
]
ARCHS = ["qwen2", "llama", "gemma3"]
STORAGES = [None, 96]  # growing cache, preallocated cache of 96 columns


@pytest.fixture(scope="module", params=ARCHS)
def backend(request, tokenizer) -> HFBackend:
    return HFBackend(build_model(request.param, len(tokenizer), seed=3), tokenizer)


def _prefill(backend: HFBackend, prompts: list[str], capacity: int | None):
    enc = backend.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return backend.prefill(enc["input_ids"], enc["attention_mask"], capacity)


def _alone(backend: HFBackend, prompt: str, tokens: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Logits after feeding ``tokens`` to ``prompt`` decoded by itself, all at once."""
    _, state = _prefill(backend, [prompt], capacity)
    return backend.advance(state, tokens[None])[0]


def _draft(tokenizer, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, len(tokenizer), (rows, k), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("capacity", STORAGES)
def test_advance_k_equals_k_single_steps(backend, tokenizer, capacity) -> None:
    draft = _draft(tokenizer, 3, 5)
    _, together = _prefill(backend, PROMPTS, capacity)
    at_once = backend.advance(together, draft)
    _, stepwise = _prefill(backend, PROMPTS, capacity)
    singles = torch.stack([backend.advance(stepwise, draft[:, i : i + 1])[:, 0] for i in range(5)], 1)
    torch.testing.assert_close(at_once, singles, atol=1e-5, rtol=1e-5)
    assert torch.equal(at_once.argmax(-1), singles.argmax(-1))
    assert torch.equal(together.next_position, stepwise.next_position)


@pytest.mark.parametrize("capacity", STORAGES)
def test_ragged_crop_then_advance_equals_never_having_advanced(backend, tokenizer, capacity) -> None:
    draft, more = _draft(tokenizer, 3, 5), _draft(tokenizer, 3, 4, seed=1)
    _, state = _prefill(backend, PROMPTS, capacity)
    backend.advance(state, draft)
    kept = torch.tensor([1, 4, 0])  # rows accept different numbers of drafted tokens
    backend.crop(state, state.next_position - 5 + kept)
    after = backend.advance(state, more)
    for row, prompt in enumerate(PROMPTS):
        expected = _alone(backend, prompt, torch.cat([draft[row, : kept[row]], more[row]]), capacity)[-4:]
        torch.testing.assert_close(after[row], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(after[row].argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("capacity", STORAGES)
def test_inserted_rows_decode_as_if_batched_from_the_start(backend, tokenizer, capacity) -> None:
    tokens = _draft(tokenizer, 3, 6)
    _, running = _prefill(backend, PROMPTS[:1], capacity)
    backend.advance(running, tokens[:1, :4])  # the first request is 4 tokens in when the others arrive
    _, arriving = _prefill(backend, PROMPTS[1:], capacity)
    backend.insert_rows(running, arriving)
    after = backend.advance(running, tokens[:, 4:])
    reference = [
        _alone(backend, PROMPTS[0], tokens[0], capacity)[-2:],
        _alone(backend, PROMPTS[1], tokens[1, 4:], capacity),
        _alone(backend, PROMPTS[2], tokens[2, 4:], capacity),
    ]
    for row in range(3):
        torch.testing.assert_close(after[row], reference[row], atol=1e-5, rtol=1e-5)


def test_kept_rows_continue_unchanged(backend, tokenizer) -> None:
    tokens = _draft(tokenizer, 3, 3)
    _, state = _prefill(backend, PROMPTS, None)
    backend.keep_rows(state, torch.tensor([2, 0]))
    after = backend.advance(state, tokens[[2, 0]])
    torch.testing.assert_close(after[0], _alone(backend, PROMPTS[2], tokens[2], None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], _alone(backend, PROMPTS[0], tokens[0], None), atol=1e-5, rtol=1e-5)


def test_compacting_after_the_longest_row_leaves_drops_its_columns_only(backend, tokenizer) -> None:
    tokens = _draft(tokenizer, 3, 4)
    _, state = _prefill(backend, PROMPTS, None)  # PROMPTS[2] is the longest: the others are left-padded
    backend.advance(state, tokens[:, :2])
    backend.keep_rows(state, torch.tensor([0, 1]))
    before = state.length
    backend.compact(state)
    assert state.length < before and bool(state.valid[:, 0].any())  # no leading column left unused
    after = backend.advance(state, tokens[:2, 2:])
    for row in range(2):
        expected = _alone(backend, PROMPTS[row], tokens[row], None)[-2:]
        torch.testing.assert_close(after[row], expected, atol=1e-5, rtol=1e-5)


def test_a_padded_row_attends_as_it_would_alone(backend) -> None:
    last, _ = _prefill(backend, PROMPTS, None)
    for row, prompt in enumerate(PROMPTS):
        alone, _ = _prefill(backend, [prompt], None)
        torch.testing.assert_close(last[row], alone[0], atol=1e-5, rtol=1e-5)


def test_preallocated_cache_refuses_to_overflow(backend) -> None:
    enc = backend.tokenizer(PROMPTS[:1], return_tensors="pt")
    _, state = backend.prefill(enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1] + 1)
    backend.advance(state, torch.tensor([[7]]))
    with pytest.raises(ValueError, match=r"holds .* columns"):
        backend.advance(state, torch.tensor([[7]]))


def test_sliding_window_counts_tokens_not_columns() -> None:
    valid = torch.tensor([[False, True, True, False, True]])  # a pad, two tokens, a hole, a token
    positions = torch.tensor([[0, 0, 1, 0, 2]])
    bias = attention_bias(valid, positions, torch.tensor([[2]]), window=2, dtype=torch.float32)[0, 0, 0]
    # Position 2 sees positions 1 and 2 (window 2), never the pad or the hole.
    assert (bias == 0).tolist() == [False, False, True, False, True]


@pytest.mark.parametrize("length", [1, 5])
def test_grouped_attention_equals_transformers_sdpa(length: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from trimix.backends.attention import grouped_sdpa

    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 8, length, 16, generator=g)
    key, value = torch.randn(2, 2, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    valid = torch.rand(2, 11, generator=g) > 0.3
    valid[:, -length:] = True
    positions = valid.long().cumsum(-1) - 1
    mask = attention_bias(valid, positions, positions[:, -length:], None, torch.float32)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    mine, _ = grouped_sdpa(module.eval(), query, key, value, mask, scaling=0.25)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    # No mask: transformers' causal fast path for an unpadded batch.
    mine, _ = grouped_sdpa(module, query, key, value, None, scaling=0.25)
    reference, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_switching_a_model_to_grouped_attention_keeps_its_outputs(tokenizer) -> None:
    """CUDA models are switched to trimix_sdpa; transformers' own padded forward must not change."""
    from trimix.backends.hf import use_grouped_attention

    model = build_model("qwen2", len(tokenizer), seed=7)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        before = model(**enc).logits
        use_grouped_attention(model)
        after = model(**enc).logits
    assert model.config._attn_implementation == "trimix_sdpa"
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_restricted_head_equals_the_full_head_at_those_rows(backend, tokenizer, monkeypatch, softcap) -> None:
    monkeypatch.setattr(backend, "softcap", softcap)  # Gemma 2's final_logit_softcapping
    _, state = _prefill(backend, ["Hello world", "The"], None)
    hidden = backend.advance(state, _draft(tokenizer, 2, 3), hidden=True)
    ids = torch.tensor([0, 3, 17, 42, len(tokenizer) - 1])
    with torch.inference_mode():
        restricted, full = backend.restricted_head(ids)(hidden), backend.head_logits(hidden)
    torch.testing.assert_close(restricted, full[..., ids])
