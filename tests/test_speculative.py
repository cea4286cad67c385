"""Speculative fusion: greedy output identical to plain fused decoding, sampling exact in distribution."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import trio_config
from trimix import FusedLM, GenerationConfig, load_config
from trimix.decoding.sampling import TokenChooser, row_keys
from trimix.decoding.speculative import K_AUTO_MAX, K_AUTO_START, frequent_tokens, next_k, verify_drafts
from trimix.errors import ConfigError
from trimix.fusion import fused_scores
from trimix.testing import CORPUS

PROMPTS = [
    "Hello world, this is",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ. بۈگۈن ھاۋا",
    "The",
    "Translate the sentence into English. Answer: The quick brown fox",
]


def _lm(make_model, arch: str, weights=(0.1, 0.9), **fusion) -> FusedLM:
    trio = {
        "large": make_model(arch, seed=1, extra_rows=8),  # the Qwen2.5 row-count mismatch
        "small_cpt": make_model(arch, seed=2),
        "small_base": make_model(arch, seed=3),
    }
    raw = trio_config(trio, method="trimix", **fusion)
    raw["models"][0]["weight"], raw["models"][1]["weight"] = weights
    return FusedLM.from_config(load_config(raw))


def _expected_greedy_stats(lm: FusedLM, plain: list, k: int | str, max_new_tokens: int) -> list:
    """Each row's (rounds, acceptance rate) of greedy speculative decoding, replayed from the plain fused
    output and the drafter's own greedy choices on it (one teacher-forced forward per prompt).

    Draft j of a round that starts after L committed tokens is accepted while the drafter's argmax after the
    first L + j fused tokens is fused token L + j; in a round each row drafts min(k, room - 1) tokens, room
    being the tokens that row may still emit (a row near its end drafts fewer, the others do not); auto k
    starts at K_AUTO_START and is updated after every round from the acceptance pooled over all rows."""
    drafter = next(s for s in lm.sources if s.role == "small_cpt")
    tokens = [g.token_ids for g in plain]
    guesses = []
    for g in plain:
        prompt = drafter.tokenizer(g.prompt)["input_ids"]
        with torch.no_grad():
            logits = drafter.model(input_ids=torch.tensor([prompt + g.token_ids])).logits[0]
        guesses.append(logits[len(prompt) - 1 :, : lm.vocab_size].argmax(-1).tolist())
    lengths = [1] * len(plain)  # the first token comes from the prefill
    drafted, accepted, rounds = [0] * len(plain), [0] * len(plain), [0] * len(plain)
    current = K_AUTO_START if k == "auto" else k
    active = [r for r in range(len(plain)) if lengths[r] < max_new_tokens]
    while active:
        for r in active:
            k_round = max(0, min(current, max_new_tokens - lengths[r] - 1))
            start, kept = lengths[r], 0
            while kept < k_round and guesses[r][start + kept] == tokens[r][start + kept]:
                kept += 1
            drafted[r], accepted[r], rounds[r] = drafted[r] + k_round, accepted[r] + kept, rounds[r] + 1
            lengths[r] = start + kept + 1
        active = [r for r in active if lengths[r] < max_new_tokens]
        if k == "auto":
            current = next_k(sum(accepted) / sum(drafted) if sum(drafted) else None, current)
    return [(n, a / d if d else None) for n, a, d in zip(rounds, accepted, drafted, strict=True)]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("k", [1, 3, 6, "auto"])
def test_greedy_speculative_equals_plain_fused_decoding(make_model, arch, k) -> None:
    lm = _lm(make_model, arch, weights=(0.3, 0.9))
    gen = GenerationConfig(max_new_tokens=18, ignore_eos=True, batch_size=4)
    plain = lm.generate(PROMPTS, gen)
    fast = lm.generate(PROMPTS, gen, speculative={"k": k})
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    alone = lm.generate(PROMPTS[1:2], gen, speculative={"k": k})  # batch 1
    assert alone[0].token_ids == plain[1].token_ids
    stats = fast[0].stats
    assert stats["draft"] == "small_cpt"  # the largest weight drafts
    expected = _expected_greedy_stats(lm, plain, k, gen.max_new_tokens)
    assert [(g.stats["rounds"], g.stats["acceptance_rate"]) for g in fast] == expected


@pytest.mark.parametrize("case", ["plausibility", "stop", "eos", "three_sources", "outside_drafter"])
def test_greedy_speculative_cases(make_model, case) -> None:
    fusion = {"plausibility": {"role": "small_cpt", "alpha": 0.2}} if case == "plausibility" else {}
    lm = _lm(make_model, "gemma3", weights=(0.3, 0.8) if case == "three_sources" else (0.1, 0.9), **fusion)
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True, batch_size=4)
    free = lm.generate(PROMPTS, gen)
    spec: dict = {"k": 4}
    if case == "stop":
        gen = gen.model_copy(update={"stop": [free[1].text[3:5]]})
    if case == "eos":  # an end-of-sequence token in the middle of an accepted draft
        gen = gen.model_copy(update={"ignore_eos": False, "eos_token_ids": [free[0].token_ids[5]]})
    if case == "outside_drafter":
        spec["draft"] = "small_base"  # not fused at 0.1/0.9: an extra model with the same tokenizer
    plain = lm.generate(PROMPTS, gen)
    fast = lm.generate(PROMPTS, gen, speculative=spec)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]
    assert [g.text for g in fast] == [g.text for g in plain]
    if case in {"stop", "eos"}:
        assert {g.finish_reason for g in plain} & {"stop", "eos"}
    if case == "outside_drafter":
        assert fast[0].stats["draft"] == "small_base" and lm.roles == ("large", "small_cpt")


def test_speculative_stream_emits_the_same_tokens(make_model) -> None:
    lm = _lm(make_model, "qwen2")
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True, batch_size=4, speculative={"k": 3})
    streamed: dict[int, list[int]] = {}
    for event in lm.stream(PROMPTS, gen):
        if event.token_id >= 0:
            streamed.setdefault(event.index, []).append(event.token_id)
    assert [streamed[i] for i in range(len(PROMPTS))] == [g.token_ids for g in lm.generate(PROMPTS, gen)]


def _bernstein_radius(variance: torch.Tensor, delta: float) -> torch.Tensor:
    """A count ``X``, a sum of independent Bernoulli draws with the given total variance, stays within this
    distance of its mean except with probability at most ``delta`` (Bernstein: ``P(|X - E X| >= t) <=
    2 exp(-t^2 / (2 var + 2t/3))``, solved for t). Valid for small and large counts alike, unlike a z-score."""
    log_term = math.log(2 / delta)
    return log_term / 3 + torch.sqrt((log_term / 3) ** 2 + 2 * log_term * variance)


def _random_tables(k: int, vocab: int, generator: torch.Generator) -> tuple[list, list]:
    """Context-dependent fused distributions ``p_j(. | x_1..x_{j-1})`` for j = 1..k+1 and drafter
    distributions ``q_j(. | x_1..x_{j-1})`` for j = 1..k, each of shape ``(V,) * (j - 1) + (V,)``. About one
    token in four gets zero probability (independently in p and q), so both ``p(x) = 0 < q(x)`` (a draft the
    fused model never emits) and ``q(x) = 0 < p(x)`` (a token only the residual can emit) occur."""

    def table(j: int) -> torch.Tensor:
        shape = (vocab,) * j
        weights = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
        weights = weights * (torch.rand(shape, generator=generator) > 0.25)
        weights[..., 0] += (weights.sum(-1) == 0).double()  # never an all-zero row
        return weights / weights.sum(-1, keepdim=True)

    return [table(j) for j in range(1, k + 2)], [table(j) for j in range(1, k + 1)]


def _context_index(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Row-major index of each row's context ``(x_1..x_m)`` in a table reshaped to ``(V^m, V)``."""
    index = torch.zeros(tokens.shape[0], dtype=torch.long)
    for i in range(tokens.shape[1]):
        index = index * vocab + tokens[:, i]
    return index


@pytest.mark.parametrize("k", [0, 1, 3])
def test_verify_drafts_emits_exactly_the_fused_distribution(k) -> None:
    """The production rule, run on many rows at once: drafts ``x_j ~ q_j(. | x_<j)``, fused scores
    ``p_j(. | x_<j)`` at every drafted position (as the engine builds them: they depend on the drafts), the
    acceptance and residual noise of the real streams. Every emitted token, given the tokens emitted before
    it in the round, must follow the fused distribution, at every position 1..k+1 including the residual
    after a rejection and the bonus token after k acceptances. Zero-probability tokens must never appear."""
    vocab, rows = 4, 400_000
    generator = torch.Generator().manual_seed(1234 + k)
    p_tables, q_tables = _random_tables(k, vocab, generator)
    drafts = torch.zeros(rows, k, dtype=torch.long)
    for j in range(k):  # x_j ~ q_j(. | x_1..x_{j-1}): the drafter's own (independent) noise
        q_rows = q_tables[j].reshape(-1, vocab)[_context_index(drafts[:, :j], vocab)]
        drafts[:, j] = torch.multinomial(q_rows, 1, generator=generator)[:, 0]
    # float32 scores as the engine passes them; log(0) = -inf is a masked token.
    target = torch.stack(
        [p_tables[j].reshape(-1, vocab)[_context_index(drafts[:, :j], vocab)] for j in range(k + 1)], 1
    )
    draft_q = [q_tables[j].reshape(-1, vocab)[_context_index(drafts[:, :j], vocab)] for j in range(k)]
    draft_scores = torch.stack(draft_q, 1) if k else torch.zeros(rows, 0, vocab, dtype=torch.float64)
    keys = row_keys(7, range(rows))
    counters = torch.randint(0, 1000, (rows,), generator=generator)
    accepted, following = verify_drafts(
        target.log().float(), drafts, draft_scores.log().float(), keys, counters
    )
    emitted = torch.cat([drafts, following[:, None]], 1).scatter(1, accepted[:, None], following[:, None])
    # At most sum_j V^j * V = 340 (context, token) cells are checked (k = 3, V = 4); each cell's bound fails
    # with probability <= 1e-9 under an exact rule, so a false alarm anywhere has probability < 1e-6.
    delta = 1e-9
    for j in range(k + 1):  # emitted position j + 1 (0-based j): rows that kept their first j drafts
        reached = accepted >= j
        context = _context_index(emitted[reached, :j], vocab)
        n_contexts = vocab**j
        counts = torch.bincount(context * vocab + emitted[reached, j], minlength=n_contexts * vocab)
        counts = counts.reshape(n_contexts, vocab).double()
        n = counts.sum(-1, keepdim=True)
        p = p_tables[j].reshape(n_contexts, vocab)
        expected, variance = n * p, n * p * (1 - p)
        # The float32 noise and scores shift each probability by < 1e-6, far below the statistical radius.
        radius = _bernstein_radius(variance, delta) + n * 1e-6
        assert (counts[p == 0] == 0).all(), f"position {j + 1}: a token of fused probability 0 was emitted"
        worst = ((counts - expected).abs() / radius).max()
        assert worst <= 1, f"position {j + 1}: empirical counts off by {float(worst):.1f}x the bound"
        assert int(n.sum()) == int(reached.sum())
    if k:  # the round reaches every position often enough for the checks to have power
        assert int((accepted == k).sum()) > rows // 100


def test_greedy_verify_drafts_keeps_the_matching_prefix_and_emits_the_argmax_after_it() -> None:
    k, vocab = 3, 6
    argmax = torch.tensor([4, 1, 5, 2])  # the fused argmax after t, x_1, x_2, x_3
    scores = torch.full((k + 1, vocab), -1.0).scatter(1, argmax[:, None], 1.0)
    zero = torch.zeros(1, dtype=torch.long)  # greedy: keys and counters are unused
    for matching in range(k + 1):  # drafts equal to the argmax up to position `matching`
        draft = argmax[:k].clone()
        if matching < k:
            draft[matching] = (draft[matching] + 1) % vocab  # later drafts still match: they must not count
        accepted, following = verify_drafts(scores[None], draft[None], None, zero, zero)
        assert (int(accepted), int(following)) == (matching, int(argmax[matching]))


def _second_token_tv(lm: FusedLM, samples: int, **spec) -> tuple[float, float]:
    """Total-variation distance between the empirical second token (given the most common first one) under
    speculative sampling and the exact fused distribution computed from one forward pass, and the largest
    distance an exact sampler reaches with probability above 1e-6 for that many samples."""
    prompt = PROMPTS[0]
    gen = GenerationConfig(
        max_new_tokens=3, do_sample=True, temperature=1.0, top_k=6, seed=11, ignore_eos=True, batch_size=512
    )
    out = lm.generate([prompt] * samples, gen, speculative={"k": 1, **spec})
    firsts = torch.tensor([g.token_ids[0] for g in out])
    mode = int(firsts.mode().values)
    seconds = torch.tensor([g.token_ids[1] for g in out if g.token_ids[0] == mode])
    ids = lm.sources[0].tokenizer(prompt)["input_ids"] + [mode]
    logits = [s.model(input_ids=torch.tensor([ids])).logits[:, -1] for s in lm.sources]
    scores = fused_scores(logits, torch.tensor([lm.weight_vector()]), lm.vocab_size)
    exact = torch.softmax(TokenChooser(gen).warp(scores), -1)[0].double()
    n = seconds.numel()
    empirical = torch.bincount(seconds, minlength=exact.numel()).double() / n
    tv = 0.5 * float((empirical - exact).abs().sum())
    # For n independent draws from `exact`: E|f_i - p_i| <= sqrt(p_i (1 - p_i) / n) (Jensen), so
    # E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n); one draw moves TV by at most 1/n, so McDiarmid gives
    # P(TV >= E[TV] + t) <= exp(-2 n t^2), i.e. t = sqrt(ln(1e6) / (2 n)) for a false alarm below 1e-6.
    expected = 0.5 * float((exact * (1 - exact) / n).sqrt().sum())
    return tv, expected + math.sqrt(math.log(1e6) / (2 * n))


def test_speculative_sampling_matches_the_fused_distribution(make_model) -> None:
    """End to end through the engine (the acceptance rule itself is checked exactly on verify_drafts above):
    the engine hands verify_drafts the drafter's proposal and the fused distribution it really samples."""
    lm = _lm(make_model, "qwen2", weights=(0.6, 0.6))  # p differs from the drafter's q
    tv, bound = _second_token_tv(lm, 3000)
    assert tv < bound


def _draft_text(tmp_path: Path) -> str:
    path = tmp_path / "draft_vocab.txt"
    path.write_text("\n".join(CORPUS), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("arch", "drafter", "size"), [("qwen2", None, 12), ("gemma3", None, 40), ("llama", "small_base", 25)]
)
def test_greedy_speculative_with_a_small_draft_vocabulary_equals_plain(
    make_model, tmp_path, arch, drafter, size
) -> None:
    """A drafter restricted to a few frequent tokens proposes worse drafts, never a different output."""
    lm = _lm(make_model, arch, weights=(0.3, 0.9))
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True, batch_size=4)
    plain = lm.generate(PROMPTS, gen)
    spec = {
        "k": 3,
        "draft": drafter,
        "draft_vocab": size,
        "draft_vocab_text": [_draft_text(tmp_path), "sib200:eng_Latn:dev"],
    }
    fast = lm.generate(PROMPTS, gen, speculative=spec)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert size < fast[0].stats["draft_vocab"] < lm.vocab_size // 2  # + the prompts' tokens and EOS
    full = lm.generate(PROMPTS, gen, speculative={"k": 3, "draft": drafter})
    assert sum(g.stats["accepted"] for g in fast) <= sum(g.stats["accepted"] for g in full)


def test_speculative_sampling_with_a_small_draft_vocabulary_matches_the_fused_distribution(
    make_model, tmp_path
) -> None:
    """Tokens the drafter cannot propose must still come out at their fused probability (the residual)."""
    lm = _lm(make_model, "qwen2", weights=(0.6, 0.6))
    tv, bound = _second_token_tv(lm, 3000, draft_vocab=8, draft_vocab_text=[_draft_text(tmp_path)])
    assert tv < bound


def test_draft_vocabulary_keeps_the_most_frequent_and_the_required_tokens() -> None:
    counts = Counter({5: 10, 7: 10, 3: 4, 9: 1, 250: 99})
    chosen = frequent_tokens(counts, 2, always=[1, 9, 300], vocab_size=200)
    assert chosen.tolist() == [1, 5, 7, 9]  # 250 and 300 lie past the vocabulary; ties by lower id


def test_draft_vocabulary_needs_text() -> None:
    with pytest.raises(ConfigError, match="draft_vocab_text"):
        load_config(
            {
                "models": [{"model": "x", "role": "small_cpt"}],
                "generation": {"speculative": {"draft_vocab": 100}},
            }
        )


def test_speculative_sampling_is_reproducible(make_model) -> None:
    lm = _lm(make_model, "gemma3")
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, top_p=0.9, seed=2, ignore_eos=True)
    a = lm.generate(PROMPTS, gen, speculative={"k": 3})
    b = lm.generate(PROMPTS, gen, speculative={"k": 3})
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


@settings(max_examples=300, deadline=None)
@given(
    acceptance=st.floats(0.0, 1.0),
    other=st.floats(0.0, 1.0),
    current=st.integers(1, 16),
)
def test_auto_k_is_the_number_of_positions_reached_with_probability_a_quarter(
    acceptance: float, other: float, current: int
) -> None:
    """With per-position acceptance ``a``, draft position j is reached with probability ``a^(j-1)``; auto k
    drafts every position reached with probability >= 1/4 (at least one, at most K_AUTO_MAX)."""
    assert next_k(None, current) == current  # no acceptance measured yet: keep the current k
    k = next_k(acceptance, current)
    assert 1 <= k <= K_AUTO_MAX
    assert next_k(acceptance, 1) == k  # with a measured rate the current k does not matter
    low, high = sorted((acceptance, other))
    assert next_k(low, current) <= next_k(high, current)  # more acceptance never drafts less
    # next_k compares through floor(log(1/4) / log(a)): a ratio within a few float64 ulps of an integer may
    # land on either side, moving a^(k-1) against 1/4 by a relative k * O(1e-16); 1e-12 covers that.
    slack = 1e-12
    assert acceptance ** (k - 1) >= 0.25 * (1 - slack)  # position k is still worth drafting ...
    if k < K_AUTO_MAX:  # ... and position k + 1 is not (unless capped)
        assert acceptance**k < 0.25 * (1 + slack)


def test_a_row_near_its_budget_does_not_shorten_the_others_drafts(make_model) -> None:
    """A served batch mixes token budgets: each row drafts what its own room allows (the 2-token request
    drafts nothing more, the 14-token one keeps drafting k), and both equal plain greedy decoding."""
    from trimix.decoding.sampling import row_keys
    from trimix.decoding.scheduler import RowRequest, Scheduler

    lm = _lm(make_model, "qwen2", weights=(0.3, 0.9))
    engine = GenerationConfig(max_new_tokens=14, ignore_eos=True, speculative={"k": 4, "draft": "small_cpt"})
    scheduler = Scheduler(lm, engine, max_batch=2)
    budgets = {
        scheduler.submit(
            RowRequest(p, engine.model_copy(update={"max_new_tokens": n}), int(row_keys(0, [i])[0]))
        ): (p, n)
        for i, (p, n) in enumerate(zip(PROMPTS[:2], (2, 14), strict=True))
    }
    tokens = {s: [] for s in budgets}
    stats = {}
    while scheduler.busy():
        for step in scheduler.step():
            for s, t in zip(step.rows, step.tokens, strict=True):
                tokens[s].append(t)
            stats.update(step.stats or {})
    for s, (prompt, n) in budgets.items():
        assert tokens[s] == lm.generate([prompt], max_new_tokens=n, ignore_eos=True)[0].token_ids
    long = next(s for s, (_, n) in budgets.items() if n == 14)
    (alone,) = lm.generate([budgets[long][0]], engine, row_ids=[0])
    # Its drafting does not depend on its neighbour: the same rounds and drafts as alone (with the old
    # batch-wide k, the 2-token row held it to no draft in the first round).
    assert (stats[long]["rounds"], stats[long]["drafted"]) == (alone.stats["rounds"], alone.stats["drafted"])
