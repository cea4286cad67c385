"""The per-token ``entropy`` fusion method: one class in the registry, and it decodes (every engine, equal
to the naive recompute-everything decoder), streams, serves, scores (by the full-logits path, equal to a
direct computation) and evaluates, with no method-specific code in the decoders, the server or the
scorer."""

from __future__ import annotations

import httpx
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import FLOAT32_SUM_REL, trio_config
from trimix import FusedLM, load_config
from trimix.cli.main import main
from trimix.decoding.reference import generate_without_cache
from trimix.errors import ConfigError
from trimix.evaluation import read_predictions
from trimix.fusion.methods import get_method
from trimix.server import BackgroundServer, Server

METHOD = get_method("entropy")
PROMPTS = ["Hello world, this is", "ئۇيغۇر تىلى تۈركىي", "The quick brown"]


def _direct(logits: list[torch.Tensor], priors: list[float]) -> torch.Tensor:
    """The documented formula in float64, one position at a time."""
    rows = []
    for b in range(logits[0].shape[0]):
        values = [x[b].double() for x in logits]
        entropy = torch.stack([-(v.softmax(-1) * v.log_softmax(-1)).sum() for v in values])
        share = torch.tensor(priors, dtype=torch.float64) * torch.exp(-entropy)
        share = share / share.sum()
        rows.append(sum(s * v for s, v in zip(share, values, strict=True)))
    return torch.stack(rows)


@given(seed=st.integers(0, 10_000), prior=st.floats(0.0, 3.0), sharp=st.floats(0.5, 20.0))
def test_combine_is_the_documented_formula(seed, prior, sharp) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(4, 37, generator=generator) * s for s in (1.0, sharp, 2.0)]
    priors = [1.0, prior, 0.5]
    got = METHOD.combine(logits, torch.tensor([priors] * 4), 37)
    torch.testing.assert_close(got.double(), _direct(logits, priors), rtol=1e-5, atol=1e-5)


def test_a_confident_source_takes_the_larger_share() -> None:
    flat = torch.zeros(1, 10)
    sure = torch.full((1, 10), -20.0)
    sure[0, 3] = 20.0
    fused = METHOD.combine([flat, sure], torch.tensor([[1.0, 1.0]]), 10)
    # Entropies: log(10) ~ 2.30 nats vs ~0: the sure source's share is 1 / (1 + exp(-2.30)) ~ 0.909.
    share = 1 / (1 + torch.exp(-torch.log(torch.tensor(10.0))))
    torch.testing.assert_close(fused[0, 3], share * 20.0)


def test_priors_must_be_non_negative_and_the_search_does_not_apply(trio, tmp_path) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        METHOD.resolve({"a": -0.5, "b": 1.0})
    raw = trio_config(trio, method="entropy")
    raw["eval"] = {
        "methods": [{"name": "e", "method": "entropy", "select": True}],
        "tasks": [{"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 2}],
    }
    with pytest.raises(ConfigError, match="recomputes its weights at every token"):
        load_config(raw)


@pytest.fixture(scope="module")
def entropy_lm(trio) -> FusedLM:
    return FusedLM.from_config(load_config(trio_config(trio, method="entropy")))


@pytest.mark.parametrize("engine", ["eager", "static", "speculative"])
@pytest.mark.parametrize("sampled", [False, True])
def test_decodes_as_the_naive_decoder(entropy_lm, engine, sampled) -> None:
    settings = {"max_new_tokens": 6, "do_sample": sampled, "seed": 3, "ignore_eos": True}
    naive = generate_without_cache(entropy_lm, PROMPTS, entropy_lm.generation.model_copy(update=settings))
    extra = {"speculative": {"k": 3}} if engine == "speculative" else {"engine": engine}
    got = entropy_lm.generate(PROMPTS, **settings, **extra)
    if engine == "speculative" and sampled:  # exact in distribution, not draw for draw
        assert all(len(g.token_ids) == 6 for g in got)
        return
    assert [g.token_ids for g in got] == naive
    streamed = [e for e in entropy_lm.stream(PROMPTS, **settings, **extra) if e.finished]
    assert sorted((e.index, e.generation.token_ids) for e in streamed) == list(enumerate(naive))


def test_loglikelihood_fuses_the_full_logits(entropy_lm) -> None:
    context, continuation = "Hello world, this is", " a small test"
    (result,) = entropy_lm.loglikelihood([(context, continuation)])
    source = entropy_lm.sources[0]
    ids = source.tokenizer(context + continuation)["input_ids"]
    n_context = len(source.tokenizer(context)["input_ids"])
    with torch.no_grad():
        vocab = entropy_lm.vocab_size  # large has padded rows beyond the tokenizer: cut, as trimix does
        logits = [s.model(torch.tensor([ids])).logits[0, :-1, :vocab] for s in entropy_lm.sources]
    fused = _direct(logits, entropy_lm.weight_vector()).log_softmax(-1)
    expected = sum(float(fused[p - 1, ids[p]]) for p in range(n_context, len(ids)))
    assert result.logprob == pytest.approx(expected, rel=FLOAT32_SUM_REL)
    assert result.n_tokens == len(ids) - n_context


def test_serves_what_it_generates(entropy_lm) -> None:
    expected = entropy_lm.generate(PROMPTS[:1], max_new_tokens=5)[0]
    with BackgroundServer(Server(entropy_lm)) as running:
        body = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
        answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["text"] == expected.text


def test_evaluates(trio, tmp_path) -> None:
    text = tmp_path / "heldout.txt"
    text.write_text("ئۇيغۇر تىلى تۈركىي تىللار.\nبۈگۈن ھاۋا ناھايىتى ياخشى.\n", encoding="utf-8")
    raw = trio_config(trio, method="entropy")
    raw["eval"] = {
        "methods": [{"name": "entropy", "method": "entropy"}],
        "tasks": [
            {"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 2, "shots": 0},
            {
                "task": "sib200_topic",
                "langs": ["uig_Arab"],
                "limit": 2,
                "shots": 0,
                "scoring": "loglikelihood",
            },
            {"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(text)}},
        ],
        "batch_size": 2,
    }
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert main(["-q", "eval", "-c", str(config), "-o", str(tmp_path / "out")]) == 0
    rows = read_predictions(tmp_path / "out" / "predictions.jsonl")
    assert len(rows) == 2 + 2 + 2 and {r["method"] for r in rows} == {"entropy"}
