"""The llama.cpp backend (``backend: llama_cpp``) against transformers on the same GGUF file.

A tiny random Llama is written as a float32 GGUF (``trimix.testing.save_tiny_gguf``); transformers reads
it exactly (its dequantised weights are the float32 ones), llama.cpp runs it with its own kernels. The
two backends' logits agree to float32 rounding, so greedy decoding, speculation, serving, likelihood and
a fusion that mixes the two backends give the same tokens. Skipped where llama-cpp-python is not
installed (``pip install 'trimix[llama-cpp]'``).
"""

from __future__ import annotations

import re
import sys

import httpx
import pytest
import torch

from conftest import run_cli
from trimix import FusedLM, load_config
from trimix.backends.base import advance_selected
from trimix.decoding import likelihood
from trimix.decoding.likelihood import continuation_items, logit_chunks
from trimix.errors import ConfigError, SourceLoadError
from trimix.testing import build_byte_level_tokenizer, build_model, save_tiny_gguf

pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs pip install 'trimix[llama-cpp]'")

from trimix.server import BackgroundServer, Server

PROMPTS = ["Hello world, this is", " ئۇيغۇر تىلى", "The", "Numbers 1 2 3 and"]
# float32 logits of two implementations (other kernels, other summation orders) over a 64-wide model:
# each logit is a sum of ~64 products of O(1) terms; measured differences are ~1e-6, 1e-4 leaves room.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = build_byte_level_tokenizer(eos="<|endoftext|>")
    root = tmp_path_factory.mktemp("gguf")
    paths = {}
    for role, seed in (("large", 31), ("small_cpt", 32), ("small_base", 33)):
        paths[role] = save_tiny_gguf(
            root / f"{role}.gguf", build_model("llama", len(tokenizer), seed=seed, hidden_size=64), tokenizer
        )
    return paths, root


def _config(paths: dict, backends: dict, method: str = "trimix", **generation) -> dict:
    models = [
        {
            "model": str(paths[role]),
            "role": role,
            "backend": backends.get(role, "hf"),
            "backend_options": {"n_threads": 2, "kv_type": "f32"},
        }
        if backends.get(role) == "llama_cpp"
        else {"model": str(paths[role]), "role": role, "backend": "hf"}
        for role in paths
    ]
    models[0]["weight"], models[1]["weight"] = 0.3, 0.9
    return {
        "models": models,
        "fusion": {"method": method},
        "generation": {"max_new_tokens": 8, **generation},
        "cache_dir": None,
    }


def _lm(tiny, backends: dict, **generation) -> FusedLM:
    paths, root = tiny
    raw = _config(paths, backends, **generation)
    raw["cache_dir"] = str(root / "cache")
    return FusedLM.from_config(load_config(raw))


@pytest.fixture(scope="module")
def pair(tiny):
    every = dict.fromkeys(("large", "small_cpt", "small_base"), "llama_cpp")
    return _lm(tiny, {}), _lm(tiny, every)


def test_logits_agree_with_transformers_on_the_same_file(pair) -> None:
    hf, cpp = pair
    for a, b in zip(hf.sources, cpp.sources, strict=True):
        assert b.backend.logit_rows == a.backend.logit_rows
        enc = hf.encode(a, PROMPTS)
        la, sa = a.backend.prefill(enc["input_ids"], enc["attention_mask"])
        lb, sb = b.backend.prefill(enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(lb, la, atol=LOGIT_ATOL, rtol=0)
        step = torch.tensor([[5, 6, 7]] * len(PROMPTS))
        torch.testing.assert_close(
            b.backend.advance(sb, step), a.backend.advance(sa, step), atol=LOGIT_ATOL, rtol=0
        )
        b.backend.crop(sb, sb.next_position - 2)  # roll every row back two tokens, then go on
        a.backend.crop(sa, sa.next_position - 2)
        again = torch.tensor([[9]] * len(PROMPTS))
        torch.testing.assert_close(
            b.backend.advance(sb, again), a.backend.advance(sa, again), atol=LOGIT_ATOL, rtol=0
        )
        b.backend.keep_rows(sb, torch.tensor([2, 0]))
        a.backend.keep_rows(sa, torch.tensor([2, 0]))
        torch.testing.assert_close(
            b.backend.advance(sb, again[:2]), a.backend.advance(sa, again[:2]), atol=LOGIT_ATOL, rtol=0
        )


@pytest.mark.parametrize("speculative", [None, {"k": 3, "draft": "small_cpt"}], ids=["plain", "speculative"])
def test_fused_decoding_gives_the_same_tokens(pair, speculative) -> None:
    hf, cpp = pair
    settings = {"max_new_tokens": 10, "batch_size": 3, "speculative": speculative}
    want = [g.token_ids for g in hf.generate(PROMPTS, **settings)]
    assert [g.token_ids for g in cpp.generate(PROMPTS, **settings)] == want


def test_one_source_decodes_what_llama_cpp_python_decodes(tiny) -> None:
    """A single llama.cpp source, greedy: token for token what llama-cpp-python's own ``Llama.generate``
    gives on the same file (same KV precision, flash attention off)."""
    import llama_cpp

    paths, root = tiny
    raw = {
        "models": [
            {
                "model": str(paths["large"]),
                "role": "large",
                "backend": "llama_cpp",
                "backend_options": {"n_threads": 2, "kv_type": "f32"},
            }
        ],
        "fusion": {"method": "single", "role": "large"},
        "cache_dir": str(root / "cache"),
    }
    lm = FusedLM.from_config(load_config(raw))
    theirs = llama_cpp.Llama(
        str(paths["large"]), n_ctx=256, n_threads=2, type_k=0, type_v=0, flash_attn=False, verbose=False
    )
    for prompt in PROMPTS:
        ours = lm.generate([prompt], max_new_tokens=12, ignore_eos=True)[0].token_ids
        ids = lm.sources[0].tokenizer(prompt)["input_ids"]
        stream = theirs.generate(ids, top_k=1, temp=0.0, min_p=0.0, top_p=1.0)
        assert [next(stream) for _ in range(12)] == ours


def test_fusion_equals_recomputing_every_sequence_from_scratch(pair) -> None:
    """Cached, batched fused decoding on llama.cpp equals a naive decoder that prefills every source's
    whole sequence afresh at each step and fuses those logits (the same backend's)."""
    _, cpp = pair
    weights = torch.tensor([cpp.weight_vector()])
    want = []
    for prompt in PROMPTS:
        ids = cpp.sources[0].tokenizer(prompt)["input_ids"]
        generated: list[int] = []
        for _ in range(8):
            row = torch.tensor([ids + generated])
            logits = [s.backend.prefill(row, torch.ones_like(row))[0] for s in cpp.sources]
            generated.append(int(cpp.fuse(logits, weights).argmax(-1)))
        want.append(generated)
    got = cpp.generate(PROMPTS, max_new_tokens=8, ignore_eos=True, batch_size=4)
    assert [g.token_ids for g in got] == want


def test_rolling_back_equals_never_having_advanced(pair) -> None:
    _, cpp = pair
    backend = cpp.sources[1].backend
    ids = torch.tensor([[5, 17, 29, 41]])
    _, state = backend.prefill(ids, torch.ones_like(ids))
    backend.advance(state, torch.tensor([[60, 61, 62]]))
    backend.crop(state, torch.tensor([4]))
    assert state.lengths == [4]
    _, fresh = backend.prefill(ids, torch.ones_like(ids))
    step = torch.tensor([[70, 71]])
    torch.testing.assert_close(
        backend.advance(state, step), backend.advance(fresh, step), atol=LOGIT_ATOL, rtol=0
    )


def test_a_damaged_file_or_a_missing_extra_is_one_line(tiny, tmp_path, monkeypatch, capsys) -> None:
    paths, root = tiny
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(paths["large"].read_bytes()[:5000])
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    for path in (damaged, text):
        config = tmp_path / "run.yaml"
        config.write_text(
            f"models:\n- {{model: {path}, role: a, backend: llama_cpp}}\nfusion: {{method: single, role: a}}\n"
            f"cache_dir: {root / 'cache'}\n"
        )
        code, err = run_cli(capsys, ["generate", "-c", config, "-p", "Hello"])
        assert code == 2 and path.name in err, err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    config.write_text(
        f"models:\n- {{model: {paths['large']}, role: a, backend: llama_cpp}}\nfusion: {{method: single, role: a}}\n"
        f"cache_dir: {root / 'cache'}\n"
    )
    code, err = run_cli(capsys, ["generate", "-c", config, "-p", "Hello"])
    assert code == 2 and "pip install 'trimix[llama-cpp]'" in err, err


def test_a_prompt_prefilled_again_reuses_its_cells(tiny) -> None:
    """The prompt cache: the same prompt again decodes only its last token, a longer prompt only its new
    tokens, with the logits of a fresh prefill; when the cache holds the cells a decode needs, it is
    emptied and the decode goes on."""
    from trimix.backends.llama_cpp import LlamaCppBackend

    paths, _ = tiny
    tokenizer = build_byte_level_tokenizer(eos="<|endoftext|>")
    options = {"n_ctx": 256, "n_threads": 2, "kv_type": "f32", "prompt_cache": 4}
    backend = LlamaCppBackend(paths["large"], tokenizer, options)
    fresh = LlamaCppBackend(paths["large"], tokenizer, {**options, "prompt_cache": 0})
    fed: list[int] = []
    decode = backend._decode
    backend._decode = lambda state, rows, wanted: (
        fed.append(sum(map(len, rows))) or decode(state, rows, wanted)
    )

    def prefill(on, ids):
        return on.prefill(ids, torch.ones_like(ids))[0]

    ids = torch.randint(5, 200, (1, 100), generator=torch.Generator().manual_seed(0))
    longer = torch.cat([ids, torch.tensor([[7, 8, 9]])], dim=1)
    prefill(backend, ids)
    torch.testing.assert_close(prefill(backend, ids), prefill(fresh, ids), atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(prefill(backend, longer), prefill(fresh, longer), atol=LOGIT_ATOL, rtol=0)
    assert fed == [100, 1, 3] and len(backend.prompts) == 2
    for seed in range(1, 4):  # 120-token prompts: two fit next to the cached ones, then the cache empties
        other = torch.randint(5, 200, (1, 120), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(prefill(backend, other), prefill(fresh, other), atol=LOGIT_ATOL, rtol=0)
    assert fed[3:] == [120, 120, 120] and len(backend.prompts) < 4


def test_one_file_through_both_backends_at_half_weight_each(tiny) -> None:
    """The same GGUF read by transformers and by llama.cpp, fused 0.5 / 0.5: the tokenizer check passes
    and the fusion decodes what the model alone decodes (two copies of the same logits)."""
    paths, root = tiny
    path = str(paths["large"])
    options = {"n_threads": 2, "kv_type": "f32"}
    raw = {
        "models": [
            {"model": path, "role": "hf", "backend": "hf", "weight": 0.5},
            {"model": path, "role": "cpp", "backend": "llama_cpp", "backend_options": options, "weight": 0.5},
        ],
        "fusion": {"method": "weighted"},
        "cache_dir": str(root / "cache"),
    }
    both = FusedLM.from_config(load_config(raw))
    alone = FusedLM.from_config(
        load_config(
            {**raw, "models": [{"model": path, "role": "hf"}], "fusion": {"method": "single", "role": "hf"}}
        )
    )
    want = [g.token_ids for g in alone.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)]
    assert [g.token_ids for g in both.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)] == want


def test_a_decode_that_fails_midway_leaves_the_state_as_it_was(tiny) -> None:
    """The KV cache fills during the third of several decode calls: a configuration message, and the cells
    the first two calls added are gone, so the state goes on as if the call had never been made."""
    from trimix.backends.llama_cpp import LlamaCppBackend

    paths, _ = tiny
    tokenizer = build_byte_level_tokenizer(eos="<|endoftext|>")
    options = {"n_ctx": 256, "n_batch": 64, "n_threads": 2, "kv_type": "f32", "prompt_cache": 0}
    backend = LlamaCppBackend(paths["large"], tokenizer, options)
    ids = torch.randint(5, 200, (1, 100), generator=torch.Generator().manual_seed(0))
    _, state = backend.prefill(ids, torch.ones_like(ids))
    with pytest.raises(ConfigError, match=r"KV cache of 256 cells is full; raise backend_options\.n_ctx"):
        backend.advance(state, torch.randint(5, 200, (1, 200)))
    assert state.lengths == [100]
    _, fresh = backend.prefill(ids, torch.ones_like(ids))
    step = torch.tensor([[7, 8]])
    torch.testing.assert_close(
        backend.advance(state, step), backend.advance(fresh, step), atol=LOGIT_ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="padded position"):
        advance_selected(backend, fresh, step, torch.tensor([[True, False]]), torch.tensor([[False, True]]))


def test_a_fusion_may_mix_backends(tiny, pair) -> None:
    """large through transformers, small_cpt through llama.cpp: the same tokens as all-transformers."""
    hf, _ = pair
    mixed = _lm(tiny, {"small_cpt": "llama_cpp"})
    assert type(mixed.sources[1].backend).__name__ == "LlamaCppBackend"
    want = [g.token_ids for g in hf.generate(PROMPTS, max_new_tokens=8)]
    assert [g.token_ids for g in mixed.generate(PROMPTS, max_new_tokens=8)] == want


def test_likelihood_through_full_logits(pair) -> None:
    hf, cpp = pair
    requests = [("Hello world,", " this is"), ("ئۇيغۇر", " تىلى")]
    for want, got in zip(hf.loglikelihood(requests), cpp.loglikelihood(requests), strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3) and got.is_greedy == want.is_greedy


def test_forked_rows_and_selected_positions_give_the_same_logits(pair) -> None:
    """``fork`` (rows sharing their source's cache cells) and ``advance_selected`` (the head at chosen
    positions only) give the logits of running every row whole and reading every position."""
    _, cpp = pair
    backend = cpp.sources[0].backend
    ids = torch.tensor([[5, 17, 29, 41, 8]])
    _, state = backend.prefill(ids, torch.ones_like(ids))
    forked = backend.fork(state, 3)
    assert forked.batch_size == 3 and forked.lengths == [5, 5, 5]
    rest = torch.tensor([[3, 4, 0], [6, 0, 0], [7, 8, 9]])
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    outputs = torch.tensor([[0, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    got = backend.advance_selected(forked, rest, valid, outputs)
    for row, cols in enumerate(([1], [0], [0, 2])):
        whole = torch.cat([ids, rest[row : row + 1, : int(valid[row].sum())]], dim=1)
        _, alone = backend.prefill(whole[:, :1], torch.ones_like(whole[:, :1]))
        every = backend.advance(alone, whole[:, 1:])[0, ids.shape[1] - 1 :]
        torch.testing.assert_close(
            got[outputs[:row].sum() : outputs[: row + 1].sum()], every[cols], atol=LOGIT_ATOL, rtol=0
        )
        if row == 0:
            first_row = every
    # the forked-from row is untouched: it goes on as if nothing had been forked
    torch.testing.assert_close(
        backend.advance(state, rest[:1, :1])[0, 0], first_row[0], atol=LOGIT_ATOL, rtol=0
    )


def test_choices_sharing_a_context_run_it_once(pair, monkeypatch) -> None:
    """Log-likelihood requests come as one context under several continuations: the scorer runs each
    context once per source and continues every choice from a fork of its cache, computing the logits of
    the scored positions only; the numbers are those of scoring every request whole (and transformers')."""
    hf, cpp = pair
    contexts = [
        "Topic of the text: the quick brown fox jumps over the lazy dog. Answer:",
        "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە تەۋە. جاۋاب:",
    ]
    requests = [(c, f" {o}") for c in contexts for o in ("science", "travel", "sports and games")]
    roles = [s.role for s in cpp.sources]
    items = continuation_items(cpp.sources[0], requests)
    weights = torch.tensor([[0.3, 0.9, -0.2], [0.1, 1.0, -0.1]])
    shared = cpp.scorer(items, roles=roles, progress=False, share_prefix=True)
    whole = cpp.scorer(items, roles=roles, progress=False, share_prefix=False)
    assert shared.prefix_groups == 2 and whole.prefix_groups == 0
    torch.testing.assert_close(
        shared.score(weights).per_text, whole.score(weights).per_text, rtol=1e-5, atol=1e-4
    )
    for want, got in zip(hf.loglikelihood(requests), cpp.loglikelihood(requests), strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3) and got.is_greedy == want.is_greedy
    # logits kept at once are bounded: in runs of items that fit the budget, with the same numbers
    width = 4 * cpp.sources[0].backend.logit_rows * len(cpp.sources)
    budget = width * max(item.score_last for item in items)
    chunks = logit_chunks(cpp.sources, items, budget=budget)
    assert len(chunks) > 1 and [item for chunk in chunks for item in chunk] == items
    assert all(width * sum(item.score_last for item in chunk) <= budget for chunk in chunks)
    whole = cpp.loglikelihood(requests)
    monkeypatch.setattr(likelihood, "LOGIT_BYTES", budget)
    assert [r.logprob for r in cpp.loglikelihood(requests)] == pytest.approx(
        [r.logprob for r in whole], abs=1e-4
    )


def test_the_server_runs_rows_that_join_and_leave(pair) -> None:
    """Continuous batching on llama.cpp sequences: concurrent requests equal each prompt alone."""
    import concurrent.futures

    hf, cpp = pair
    want = {p: g.text for p, g in zip(PROMPTS, hf.generate(PROMPTS, max_new_tokens=6), strict=True)}
    with (
        BackgroundServer(Server(cpp, default_max_tokens=6)) as running,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        answers = pool.map(
            lambda p: httpx.post(f"{running.url}/v1/completions", json={"prompt": p}, timeout=60).json(),
            PROMPTS * 2,
        )
        for prompt, answer in zip(PROMPTS * 2, answers, strict=True):
            assert answer["choices"][0]["text"] == want[prompt]
    assert len(cpp.sources[0].backend.free) == 64  # every sequence given back


def test_bad_llama_cpp_settings_are_named(tiny, tmp_path) -> None:
    paths, root = tiny
    folder = tmp_path / "hf"
    folder.mkdir()
    cases = [
        ({"model": str(folder), "role": "a", "backend": "llama_cpp"}, "runs .gguf files"),
        (
            {
                "model": str(paths["large"]),
                "role": "a",
                "backend": "llama_cpp",
                "backend_options": {"n_gpu": 1},
            },
            "unknown backend_options ['n_gpu']",
        ),
        ({"model": str(paths["large"]), "role": "a", "backend": "llama_cpp", "device": "cuda:0"}, "CUDA"),
    ]
    for model, message in cases:
        raw = {
            "models": [model],
            "fusion": {"method": "single", "role": "a"},
            "cache_dir": str(root / "cache"),
        }
        with pytest.raises(Exception, match=re.escape(message)) as raised:
            FusedLM.from_config(load_config(raw))
        assert isinstance(raised.value, SourceLoadError | Exception)
    small = _lm(tiny, dict.fromkeys(("large", "small_cpt", "small_base"), "llama_cpp"))
    backend = small.sources[0].backend
    backend.free = backend.free[:2]  # as if n_seq_max were 2
    with pytest.raises(ConfigError, match=r"raise backend_options\.n_seq_max"):
        small.generate(PROMPTS, max_new_tokens=2, batch_size=4)


def test_an_adapter_is_merged_into_a_derived_gguf(tiny, tmp_path) -> None:
    """A LoRA adapter over a GGUF base (as the demo's CPT sources are) runs on llama.cpp from a derived
    file: the base's tensors copied, the adapted ones written as W + (alpha/r) B A. At float32 it gives
    the logits of transformers with the adapter applied (the query/key rows permuted as llama.cpp lays
    them out), and the merge is cached."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths, root = tiny
    base = AutoModelForCausalLM.from_pretrained(str(paths["large"].parent), gguf_file=paths["large"].name)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(0)
    for name, weight in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.2)  # PEFT starts B at zero: make the update real
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter, save_embedding_layers=False)  # the LoRA weights alone
    (adapter / "trimix_source.json").write_text(json.dumps({"base": {"model": str(paths["large"])}}))
    options = {"n_threads": 2, "kv_type": "f32", "merge_precision": "f32"}
    models = {
        backend: FusedLM.from_config(
            load_config(
                {
                    "models": [
                        {
                            "model": str(adapter),
                            "role": "cpt",
                            "backend": backend,
                            "backend_options": options if backend == "llama_cpp" else {},
                        }
                    ],
                    "fusion": {"method": "single", "role": "cpt"},
                    "cache_dir": str(root / "cache"),
                }
            )
        )
        for backend in ("hf", "llama_cpp")
    }
    hf, cpp = (models[b].sources[0].backend for b in ("hf", "llama_cpp"))
    enc = models["hf"].encode(models["hf"].sources[0], PROMPTS)
    merged, _ = cpp.prefill(enc["input_ids"], enc["attention_mask"])
    adapted, _ = hf.prefill(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(merged, adapted, atol=LOGIT_ATOL, rtol=0)
    assert list((root / "cache" / "gguf").glob("large-adapter-*-f32.gguf"))  # written once, then reused
    want = [g.token_ids for g in models["hf"].generate(PROMPTS, max_new_tokens=8)]
    assert [g.token_ids for g in models["llama_cpp"].generate(PROMPTS, max_new_tokens=8)] == want


def test_byte_level_sources_run_on_llama_cpp(pair) -> None:
    """llama.cpp sources read one byte at a time (tokenizations continued with ``take``: shared cache
    cells) give transformers' next-byte distributions and greedy bytes."""
    from trimix.bytelevel import START
    from trimix.decoding import SourcePool

    hf, cpp = pair
    on_hf = FusedLM(SourcePool(list(hf.pool.token_sources.values()), space="bytes"), hf.fusion)
    on_cpp = FusedLM(SourcePool(list(cpp.pool.token_sources.values()), space="bytes"), cpp.fusion)
    text = list("ئۇيغۇر tili".encode())
    for a, b in zip(on_hf.sources, on_cpp.sources, strict=True):
        ids = torch.tensor([[START, *b"ab"]])
        la, sa = a.backend.prefill(ids, torch.ones_like(ids))
        lb, sb = b.backend.prefill(ids, torch.ones_like(ids))
        torch.testing.assert_close(lb, la, atol=1e-3, rtol=0)
        step = torch.tensor([text])
        torch.testing.assert_close(
            b.backend.advance(sb, step), a.backend.advance(sa, step), atol=1e-3, rtol=0
        )
    expected = on_hf.generate(PROMPTS[:2], max_new_tokens=10)
    assert [g.token_ids for g in on_cpp.generate(PROMPTS[:2], max_new_tokens=10)] == [
        g.token_ids for g in expected
    ]
