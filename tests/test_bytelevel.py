"""Byte-level fusion (trimix.bytelevel): exact next-byte distributions, sampling, bits per byte, and
sources with different tokenizers through generate, eval and serve.

The definition under test (trimix.bytelevel.marginal): the byte source is the distribution the token
source induces over spelled bytes, summed over **every** covering tokenization, special tokens
excluded and renormalised, end-of-sequence a symbol of its own.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest
import torch
import yaml

from conftest import run_cli
from trimix import FusedLM, load_config
from trimix.backends.hf import HFBackend
from trimix.backends.loading import Source
from trimix.backends.recompute import RecomputeBackend
from trimix.bytelevel import END, START, ByteLevelBackend
from trimix.bytelevel.spelling import token_spellings
from trimix.config import SourceConfig
from trimix.errors import ConfigError, VocabularyMismatchError
from trimix.testing import (
    CORPUS,
    build_byte_fallback_tokenizer,
    build_byte_level_tokenizer,
    build_model,
    save_tiny_model,
)

TOKENIZERS = {
    "byte_level_bpe": lambda: build_byte_level_tokenizer(vocab_size=300),
    "sentencepiece_byte_fallback": lambda: build_byte_fallback_tokenizer(vocab_size=40),
}
# Texts read before the next byte is asked for: empty, ASCII with a space, two bytes of a Uyghur letter
# pair (a character cut in half), and two of the three bytes of a Tibetan letter (no piece covers it:
# byte tokens / byte fallback).
TEXTS = [b"", b" t", "ئۇ".encode()[:3], "ཀ".encode()[:2], b"ab c"]


def _recompute(model, tokenizer) -> RecomputeBackend:
    """The model run whole at every step: the same float32 forward as the brute force below."""

    @torch.no_grad()
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(ids).logits

    return RecomputeBackend(forward, tokenizer, len(tokenizer), eos_token_ids=[tokenizer.eos_token_id])


class BruteForce:
    """Probabilities of byte strings by enumerating token sequences (no tree, no cache)."""

    def __init__(self, model, tokenizer, prompt_ids: list[int]) -> None:
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt_ids
        self.spell = token_spellings(tokenizer, [tokenizer.eos_token_id])
        self.cache: dict[tuple[int, ...], list[float]] = {}

    def dist(self, seq: list[int]) -> list[float]:
        key = tuple(seq)
        if key not in self.cache:
            with torch.no_grad():
                logits = self.model(torch.tensor([self.prompt + seq])).logits[0, -1, : len(self.tokenizer)]
            p = torch.softmax(logits.double(), -1) * torch.tensor([s is not None for s in self.spell])
            self.cache[key] = (p / p.sum()).tolist()
        return self.cache[key]

    def prefix(self, x: bytes, seq: list[int] | None = None, done: int = 0) -> float:
        """P(the text starts with x): token sequences whose last token is the first to reach x's end."""
        if not x:
            return 1.0
        seq, rest, total = seq or [], x[done:], 0.0
        p = self.dist(seq)
        for t, s in enumerate(self.spell):
            if s and s.startswith(rest):
                total += p[t]
            elif s and rest.startswith(s):
                total += p[t] * self.prefix(x, [*seq, t], done + len(s))
        return total

    def exactly(self, x: bytes, seq: list[int] | None = None, done: int = 0) -> float:
        """P(the text is x and then ends)."""
        seq, rest = seq or [], x[done:]
        p = self.dist(seq)
        total = p[self.tokenizer.eos_token_id] if not rest else 0.0
        for t, s in enumerate(self.spell):
            if s and rest and rest.startswith(s):
                total += p[t] * self.exactly(x, [*seq, t], done + len(s))
        return total

    def next_byte(self, x: bytes) -> torch.Tensor:
        base = self.prefix(x)
        q = [self.prefix(x + bytes([b])) / base for b in range(256)] + [self.exactly(x) / base]
        return torch.tensor(q, dtype=torch.float64)


def _byte_state(backend: ByteLevelBackend, prompt: str, text: bytes):
    ids = [START, *prompt.encode()]
    _logp, state = backend.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    if text:
        backend.advance(state, torch.tensor([list(text)]))
    return state


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_next_byte_distribution_equals_brute_force_enumeration(kind) -> None:
    tokenizer = TOKENIZERS[kind]()
    model = build_model("qwen2", len(tokenizer), seed=3, init_std=0.15)
    backend = ByteLevelBackend(_recompute(model, tokenizer))
    brute = BruteForce(model, tokenizer, tokenizer("ab")["input_ids"])
    for text in TEXTS:
        tree = _byte_state(backend, "ab", text).trees[0]
        mine = tree.next_byte_logprobs().exp()
        expected = brute.next_byte(text)
        assert mine[START] == 0
        # float64 sums of the same float32 logits in another order: far below 1e-6 relative.
        torch.testing.assert_close(mine[: END + 1], expected, rtol=1e-6, atol=1e-12, msg=f"{kind} {text!r}")
        assert tree.log_prob == pytest.approx(math.log(brute.prefix(text)), rel=1e-9, abs=1e-12)


def test_cached_inner_backend_equals_recompute() -> None:
    """The byte source over transformers' KV cache (rows copied per tokenization) reads as over a
    model rerun whole; float32 caching moves log-probabilities by ~1e-6 nats."""
    tokenizer = TOKENIZERS["sentencepiece_byte_fallback"]()
    model = build_model("gemma3", len(tokenizer), seed=4, init_std=0.15)
    # Pruned alike (exact marginalisation over 20 bytes of byte-fallback pieces is 2^19 tokenizations).
    cached = ByteLevelBackend(HFBackend(model, tokenizer), prune=1e-6, max_nodes=6)
    whole = ByteLevelBackend(_recompute(model, tokenizer), prune=1e-6, max_nodes=6)
    text = "ئۇيغۇر tili ཀ".encode()
    prompts = [[START, *b"ab"], [START, *"بۈگۈن ".encode()]]
    width = max(map(len, prompts))
    ids = torch.tensor([[END] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    a0, sa = cached.prefill(ids, mask)
    b0, sb = whole.prefill(ids, mask)
    feed = torch.tensor([list(text), list(text)])
    a, b = cached.advance(sa, feed), whole.advance(sb, feed)
    torch.testing.assert_close(a0, b0, rtol=0, atol=1e-4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def _chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of homogeneity (categories with fewer than 10 draws pooled)."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rows = [(a[k], b[k]) for k in keys]
    rest = (sum(a.values()) - sum(r[0] for r in rows), sum(b.values()) - sum(r[1] for r in rows))
    if sum(rest):
        rows.append(rest)
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for x, y in rows:
        expected = (x + y) / (na + nb)
        stat += (x - na * expected) ** 2 / (na * expected) + (y - nb * expected) ** 2 / (nb * expected)
    dof = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def _sample_bytes(backend: ByteLevelBackend, n: int, length: int, seed: int) -> Counter:
    """n texts of up to ``length`` bytes, drawn byte by byte from the byte source."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[START, *b"ab"]] * n)
    logp, state = backend.prefill(ids, torch.ones_like(ids))
    texts = [bytearray() for _ in range(n)]
    for _ in range(length):
        chosen = torch.multinomial(logp.double().exp(), 1, generator=gen)
        for row, c in enumerate(chosen[:, 0].tolist()):
            if not state.trees[row].ended and c != END:
                texts[row].append(c)
        logp = backend.advance(state, chosen)[:, 0].clone()
        logp[[t.ended for t in state.trees]] = torch.tensor([0.0] * 256 + [0.0, float("-inf")]).float()
    return Counter(bytes(t) for t in texts)


def _sample_tokens(model, tokenizer, n: int, length: int, seed: int) -> Counter:
    """n texts: the model's own tokens sampled (special tokens suppressed), spelled, cut at ``length`` bytes."""
    spell = token_spellings(tokenizer, [tokenizer.eos_token_id])
    suppressed = [i for i, s in enumerate(spell) if s is None]
    torch.manual_seed(seed)
    out = model.generate(
        torch.tensor([tokenizer("ab")["input_ids"]] * n),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=length,
        suppress_tokens=suppressed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[:, 3:]
    texts = Counter()
    for row in out.tolist():
        text = b""
        for t in row:
            if t == tokenizer.eos_token_id:
                break
            text += spell[t]
        texts[text[:length]] += 1
    return texts


def _sample_bytes_naively(model, tokenizer, n: int, seed: int) -> Counter:
    """A deliberately wrong marginalisation, the common one: each token's probability goes to its first
    byte, and after a byte the model is conditioned on that byte's own token (the text's tokenization),
    as if a token boundary always followed. Two-byte texts only."""
    spell = token_spellings(tokenizer, [tokenizer.eos_token_id])
    prompt = tokenizer("ab")["input_ids"]

    def first_bytes(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([ids])).logits[0, -1, : len(tokenizer)].double(), -1)
        mass = torch.zeros(END + 1, dtype=torch.float64)
        for t, s in enumerate(spell):
            if s is not None:
                mass[s[0] if s else END] += p[t]
        return mass / mass.sum()

    gen = torch.Generator().manual_seed(seed)
    out: Counter = Counter()
    for b, count in Counter(torch.multinomial(first_bytes(prompt), n, True, generator=gen).tolist()).items():
        if b == END:
            out[b""] += count
            continue
        own = next(t for t, s in enumerate(spell) if s == bytes([b]))
        for c in torch.multinomial(first_bytes([*prompt, own]), count, True, generator=gen).tolist():
            out[bytes([b]) + (bytes([c]) if c < 256 else b"")] += 1
    return out


def test_sampling_bytes_is_sampling_tokens() -> None:
    """The distribution over 2-byte texts sampled byte by byte equals the one from sampling the
    model's tokens (chi-square homogeneity, 2,000 draws each); the same test rejects the naive
    first-byte marginalisation by a wide margin, so it has the power to see a wrong one."""
    tokenizer = build_byte_level_tokenizer(vocab_size=400)
    model = build_model("llama", len(tokenizer), seed=5, init_std=0.1)
    from_tokens = _sample_tokens(model, tokenizer, 2000, 2, seed=0)
    exact = ByteLevelBackend(_recompute(model, tokenizer))
    assert _chi_square_p(_sample_bytes(exact, 2000, 2, seed=1), from_tokens) > 1e-3  # measured: 0.93
    assert _chi_square_p(_sample_bytes_naively(model, tokenizer, 2000, seed=1), from_tokens) < 1e-6  # 1e-32


def test_bits_per_byte_of_one_source_is_its_marginal_nll() -> None:
    """A single source's bits per byte on a text (byte-level fusion, loglikelihood) equals the token
    model's -log2 P(continuation | context) / bytes, each P summed over every tokenization by brute
    force. Scoring reads the whole text byte by byte after BOS, so the context's tokenization is
    marginalised too (generation instead starts from the prompt's own tokenization)."""
    tokenizer = TOKENIZERS["sentencepiece_byte_fallback"]()
    model = build_model("llama", len(tokenizer), seed=6, init_std=0.15)
    backend = ByteLevelBackend(_recompute(model, tokenizer))
    lm = FusedLM([Source("small_cpt", backend, SourceConfig(model="m", role="small_cpt"))])
    context, continuation = "ab", " tཀ"
    result = lm.loglikelihood([(context, continuation)])[0]
    brute = BruteForce(model, tokenizer, [tokenizer.bos_token_id])
    n_bytes = len(continuation.encode())
    assert result.n_tokens == n_bytes
    nll = math.log(brute.prefix(context.encode())) - math.log(brute.prefix((context + continuation).encode()))
    assert -result.logprob / math.log(2) / n_bytes == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


def test_pruned_sources_resynchronise_instead_of_failing() -> None:
    """With one tokenization kept per row, a byte only a dropped tokenization spells is still read: the
    floor gave it probability, and the row restarts from its text's own tokenization."""
    tokenizer = build_byte_fallback_tokenizer()
    model = build_model("llama", len(tokenizer), seed=5, init_std=0.3)
    config = SourceConfig(model="m", role="s")
    pruned = ByteLevelBackend(HFBackend(model, tokenizer), prune=0.05, max_nodes=1)
    exact = ByteLevelBackend(HFBackend(model, tokenizer), prune=1e-6, max_nodes=64)
    texts = CORPUS[:6]
    a = FusedLM([Source("s", pruned, config)]).loglikelihood_rolling(texts)
    b = FusedLM([Source("s", exact, config)]).loglikelihood_rolling(texts)
    assert pruned.resyncs > 0 and all(math.isfinite(x) for x in a)
    assert all(x <= y + 1e-3 for x, y in zip(a, b, strict=True))  # dropping tokenizations loses probability


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """large: a Qwen2-style byte-level BPE; small_cpt / small_base: a SentencePiece byte-fallback pair."""
    root = tmp_path_factory.mktemp("mixed")
    bpe, spm = build_byte_level_tokenizer(), build_byte_fallback_tokenizer()
    return {
        "large": save_tiny_model(root / "large", "qwen2", bpe, seed=1, init_std=0.1),
        "small_cpt": save_tiny_model(root / "small_cpt", "llama", spm, seed=2, init_std=0.1),
        "small_base": save_tiny_model(root / "small_base", "llama", spm, seed=3, init_std=0.1),
    }


def _mixed_config(mixed, **fusion) -> dict:
    return {
        "models": [
            {"model": str(mixed["large"]), "role": "large", "weight": 0.3},
            {"model": str(mixed["small_cpt"]), "role": "small_cpt", "weight": 0.9},
            {"model": str(mixed["small_base"]), "role": "small_base"},
        ],
        "fusion": {"method": "trimix", **fusion},
        "generation": {"max_new_tokens": 12},
    }


def test_different_tokenizers_fuse_at_the_byte_level(mixed, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trimix.decoding.pool")
    lm = FusedLM.from_config(load_config(_mixed_config(mixed)))
    assert lm.pool.space == "bytes" and "fusing at the byte level" in caplog.text
    greedy = lm.generate(["ئۇيغۇر تىلى", "Hello"], max_new_tokens=12)
    assert [len(g.token_ids) for g in greedy] == [12, 12]  # max_new_tokens counts bytes
    assert greedy[0].text == bytes(greedy[0].token_ids).decode("utf-8", errors="replace")
    alone = lm.generate(["Hello"], max_new_tokens=12)
    assert alone[0].token_ids == greedy[1].token_ids  # a row decodes as it would alone
    sampled = lm.generate(["Hello"] * 2, max_new_tokens=8, do_sample=True, seed=3)
    again = lm.generate(["Hello"] * 2, max_new_tokens=8, do_sample=True, seed=3)
    assert [s.token_ids for s in sampled] == [s.token_ids for s in again]
    with pytest.raises(ConfigError, match="speculative fusion works on shared tokens"):
        lm.generate(["Hello"], max_new_tokens=4, speculative={"k": 2})
    # Tokens asked for on sources that cannot share them: a clear refusal naming the way out.
    with pytest.raises(VocabularyMismatchError, match=r"fusion\.space: bytes"):
        FusedLM.from_config(load_config(_mixed_config(mixed, space="tokens")))


def test_stops_streaming_and_inspection_at_the_byte_level(mixed) -> None:
    lm = FusedLM.from_config(load_config(_mixed_config(mixed)))
    prompt = "ئۇيغۇر تىلى"
    whole = lm.generate([prompt], max_new_tokens=16)[0]
    streamed = list(lm.stream([prompt], max_new_tokens=16))
    assert "".join(e.text for e in streamed) == streamed[-1].generation.text == whole.text
    # A stop string in the middle of the greedy text, ending inside a multi-byte character's bytes.
    stop = whole.text[3:6]
    stopped = lm.generate([prompt], max_new_tokens=16, stop=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.text == whole.text[: whole.text.index(stop)]
    inspected = lm.generate([prompt], max_new_tokens=4, inspect_top_k=3)[0]
    assert inspected.token_ids == whole.token_ids[:4] and len(inspected.inspection) == 4
    step = inspected.inspection[0]
    assert step.token_id == whole.token_ids[0] and set(step.sources) == {"large", "small_cpt", "small_base"}
    assert step.leader in step.sources and len(step.fused_top) == 3


def test_shared_tokenizer_stays_token_level_unless_asked(trio) -> None:
    raw = {
        "models": [{"model": str(p), "role": r} for r, p in trio.items()],
        "fusion": {"method": "proxy_tuning"},
    }
    assert FusedLM.from_config(load_config(raw)).pool.space == "tokens"
    raw["fusion"]["space"] = "bytes"
    as_bytes = FusedLM.from_config(load_config(raw))
    assert as_bytes.pool.space == "bytes" and len(as_bytes.tokenizer) == 258


def test_byte_level_likelihood_adds_the_other_tokenizations() -> None:
    """One source, one text: at the byte level log P(text) sums every tokenization, so it is at least
    the log-probability of the tokenizer's own tokens (a byte-level BPE: no prefix space is added)."""
    tokenizer = build_byte_level_tokenizer()
    model = build_model("qwen2", len(tokenizer), seed=7, init_std=0.1)
    config = SourceConfig(model="m", role="small_cpt")
    tokens = FusedLM([Source("small_cpt", HFBackend(model, tokenizer), config)])
    exact = FusedLM([Source("small_cpt", ByteLevelBackend(HFBackend(model, tokenizer)), config)])
    text = "ئۇيغۇر تىلى"
    by_tokens, by_bytes = tokens.loglikelihood([("", text)])[0], exact.loglikelihood([("", text)])[0]
    assert by_bytes.n_tokens == len(text.encode()) > by_tokens.n_tokens
    # every excluded special token's probability is renormalised away too, which also raises it
    assert by_bytes.logprob >= by_tokens.logprob - 1e-4


def test_cli_generate_and_eval_across_tokenizers(mixed, tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_mixed_config(mixed)))
    out = tmp_path / "gen"
    code, err = run_cli(capsys, ["generate", "-c", config, "-p", "ئۇيغۇر", "-p", "Hello", "-o", out])
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    lm = FusedLM.from_config(load_config(_mixed_config(mixed)))
    assert [r["text"] for r in rows] == [g.text for g in lm.generate(["ئۇيغۇر", "Hello"], max_new_tokens=12)]

    text = tmp_path / "heldout.txt"
    text.write_text("ئۇيغۇر تىلى\nHello world\n", encoding="utf-8")
    evaluation = _mixed_config(mixed)
    evaluation["eval"] = {
        "methods": [
            {"name": "large", "method": "single", "role": "large"},
            {"name": "trimix", "method": "trimix", "weights": {"large": 0.3, "small_cpt": 0.9}},
        ],
        "tasks": [{"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(text)}}],
    }
    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text(yaml.safe_dump(evaluation))
    code, err = run_cli(capsys, ["eval", "-c", eval_file, "-o", tmp_path / "run"])
    assert code == 0, err
    cells = json.loads((tmp_path / "run" / "report.json").read_text())["cells"]
    for cell in cells:
        scores = cell["scores"]
        # per-byte perplexity and bits per byte are one number in two units here
        assert scores["bits_per_byte"] == pytest.approx(math.log2(scores["perplexity"]), rel=1e-6)
    assert {c["method"] for c in cells} == {"large", "trimix"}


def test_serve_across_tokenizers(mixed) -> None:
    """The OpenAI-compatible server on a byte-level fusion: completions (whole and streamed) equal the
    fused model's own."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from trimix.decoding.batcher import ContinuousBatcher
    from trimix.server import BackgroundServer, Server

    lm = FusedLM.from_config(load_config(_mixed_config(mixed)))
    server = Server(lm, default_max_tokens=8, batcher=ContinuousBatcher(lm, max_batch=4, max_queue=8))
    running = BackgroundServer(server).start()
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        expected = lm.generate(["ئۇيغۇر تىلى"], max_new_tokens=10)[0]
        whole = client.completions.create(model="trimix", prompt="ئۇيغۇر تىلى", max_tokens=10, temperature=0)
        assert whole.choices[0].text == expected.text
        assert whole.usage.completion_tokens == 10  # bytes
        stream = client.completions.create(
            model="trimix", prompt="ئۇيغۇر تىلى", max_tokens=10, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == expected.text
    finally:
        running.stop()
