"""The decoding core needs nothing beyond the backend protocol's core.

:class:`~trimix.backends.recompute.RecomputeBackend` implements only that core (no hidden states, no
preallocated caches, no cache at all: every row's whole sequence runs again at each step). Fused over
the same models, it must give the transformers backend's tokens exactly — through ``generate``,
speculative fusion and the server — and the same likelihoods through the scorer's full-logits path.
Nothing in it is padded or cached, so it is also the naive ground truth for the cached, batched backend.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import FLOAT32_SUM_REL, trio_config
from trimix import FusedLM, load_config
from trimix.backends.base import SourceBackend, capabilities
from trimix.backends.loading import Source
from trimix.backends.recompute import RecomputeBackend
from trimix.backends.sequences import SequenceBatch
from trimix.decoding.pool import SourcePool
from trimix.errors import ConfigError
from trimix.search import ScoringText
from trimix.server import BackgroundServer, Server

PROMPTS = ["Hello world, this is", "ئۇيغۇر تىلى", "The", "Numbers 1 2 3 and"]


def _recompute(source: Source) -> Source:
    model = source.model

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    backend = RecomputeBackend(
        forward,
        source.tokenizer,
        source.logit_rows,
        eos_token_ids=source.backend.eos_token_ids,
        max_positions=source.max_positions,
    )
    return Source(source.role, backend, source.config)


@pytest.fixture(scope="module")
def pair(trio) -> tuple[FusedLM, FusedLM]:
    """The trio at TriMix weights with plausibility, on transformers' backend and on the recompute one."""
    raw = trio_config(trio, method="trimix", plausibility={"role": "small_cpt", "alpha": 0.2})
    for model, weight in zip(raw["models"], (0.3, 0.9), strict=False):
        model["weight"] = weight
    config = load_config(raw)
    cached = FusedLM.from_config(config, load_all=True)
    plain = FusedLM(SourcePool([_recompute(s) for s in cached.pool.sources.values()], config), cached.fusion)
    return cached, plain


def test_the_recompute_backend_is_the_core_protocol_alone(pair) -> None:
    _, plain = pair
    backend = plain.sources[0].backend
    assert isinstance(backend, SourceBackend)
    assert capabilities(backend) == frozenset()
    assert not hasattr(backend, "head_logits") and not hasattr(backend, "step_in_place")


@pytest.mark.parametrize("speculative", [None, {"k": 3, "draft": "small_cpt"}], ids=["plain", "speculative"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_decoding_on_the_protocol_alone_gives_the_cached_tokens(pair, sampled, speculative) -> None:
    cached, plain = pair
    settings = {
        "max_new_tokens": 10,
        "do_sample": sampled,
        "temperature": 0.9,
        "seed": 3,
        "batch_size": 3,
        "stop": ["ng"],
        "speculative": speculative,
    }
    want = cached.generate(PROMPTS, **settings)
    got = plain.generate(PROMPTS, **settings)
    assert [(g.token_ids, g.text, g.finish_reason) for g in got] == [
        (g.token_ids, g.text, g.finish_reason) for g in want
    ]


def test_the_server_runs_on_the_protocol_alone(pair) -> None:
    cached, plain = pair
    want = cached.generate(PROMPTS[:2], max_new_tokens=5)
    with BackgroundServer(Server(plain, default_max_tokens=5)) as running:
        for prompt, expected in zip(PROMPTS[:2], want, strict=True):
            answer = httpx.post(
                f"{running.url}/v1/completions", json={"prompt": prompt, "max_tokens": 5}, timeout=60
            ).json()
            assert answer["choices"][0]["text"] == expected.text


def test_likelihood_without_hidden_states_uses_full_logits(pair) -> None:
    """The scorer keeps logits per position where a backend gives no hidden states: same numbers."""
    cached, plain = pair
    requests = [("Hello world,", " this is"), ("ئۇيغۇر", " تىلى"), ("", "The end")]
    for want, got in zip(cached.loglikelihood(requests), plain.loglikelihood(requests), strict=True):
        assert got.logprob == pytest.approx(want.logprob, rel=FLOAT32_SUM_REL, abs=1e-5)
        assert (got.is_greedy, got.n_tokens) == (want.is_greedy, want.n_tokens)
    texts = [ScoringText("a", "Hello world, this is a test"), ScoringText("b", "ئۇيغۇر تىلى تۈركىي", 4)]
    weights = torch.tensor([[0.3, 0.9, -0.2], [0.1, 1.0, -0.1]])
    want = cached.scorer(texts).score(weights).nll
    got = plain.scorer(texts).score(weights).nll
    torch.testing.assert_close(got, want, rtol=FLOAT32_SUM_REL, atol=1e-5)


def test_engines_that_need_a_capability_name_what_is_missing(pair) -> None:
    _, plain = pair
    with pytest.raises(ConfigError, match=r"engine 'static' needs preallocated caches.*use engine 'eager'"):
        plain.generate(PROMPTS[:1], max_new_tokens=2, engine="static")
    with pytest.raises(ConfigError, match="draft_vocab needs a drafter whose backend gives hidden states"):
        plain.generate(
            PROMPTS[:1],
            max_new_tokens=2,
            speculative={
                "k": 2,
                "draft": "small_cpt",
                "draft_vocab": 50,
                "draft_vocab_text": ["sib200:eng_Latn:dev"],
            },
        )


@pytest.mark.parametrize("backend_kind", ["transformers", "recompute"])
def test_sequences_are_addressed_by_id(pair, backend_kind) -> None:
    """The runners' view of a source (:class:`SequenceBatch`): sequences started at different times,
    stepped together, rolled back and released by id, each give the logits it would give alone."""
    cached, plain = pair
    lm = cached if backend_kind == "transformers" else plain
    source = lm.sources[1]
    batch = SequenceBatch(source.backend)

    def encode(prompts):
        enc = lm.encode(source, prompts)
        return enc["input_ids"], enc["attention_mask"]

    def alone(prompt: str, fed: list[int]) -> torch.Tensor:
        single = SequenceBatch(source.backend)
        logits = single.start([0], *encode([prompt]))
        return single.step(torch.tensor([fed]))[0, -1] if fed else logits[0]

    batch.start([7, 3], *encode(PROMPTS[:2]))
    batch.start([11], *encode(PROMPTS[2:3]))  # joins while the others decode
    assert batch.ids == [7, 3, 11]
    batch.step(torch.tensor([[5, 6], [8, 9], [10, 12]]))
    batch.roll_back({3: batch.lengths()[3] - 1})  # sequence 3 keeps one of its two tokens
    kept = batch.release([7])
    assert kept == [1, 2] and batch.ids == [3, 11]
    got = batch.step(torch.tensor([[20], [21]]))[:, -1]
    want = torch.stack([alone(PROMPTS[1], [8, 20]), alone(PROMPTS[2], [10, 12, 21])])
    torch.testing.assert_close(got, want, rtol=FLOAT32_SUM_REL, atol=1e-5)
    with pytest.raises(ValueError, match="already decoding"):
        batch.start([11], *encode(PROMPTS[:1]))
    with pytest.raises(ValueError, match="only shorten"):
        batch.roll_back({11: 1000})
    with pytest.raises(ValueError, match="3 rows of tokens for 2 sequences"):
        batch.step(torch.tensor([[1], [2], [3]]))
