"""Every entry point decodes one run.yaml the same way: the Python API (``generate``, ``stream``),
``trimix generate``, the server's ``/v1/completions`` and lm-eval's ``generate_until`` give identical
tokens, text and finish reasons, on each decoding engine, greedy and with seeded sampling.

The run's ``generation`` section carries what every entry point must honour: an end-of-sequence id of
its own (not the tokenizer's), a stop string in a script the tokenizer spells in bytes (a Tibetan letter,
three byte tokens), the token budget, the seed and the sampling settings. ``large`` is a model built to
be certain of its continuation after some prompts (``build_chain_model``): one prompt runs into the stop
string, one into the run's end-of-sequence id, one cycles until the token budget ends it; on the other
prompts the random small sources decide, so sampling has a real distribution to draw from.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import pytest
import yaml
from lm_eval.api.instance import Instance

import trimix
from trimix.cli.main import main
from trimix.lm_eval import TrimixLM
from trimix.server import BackgroundServer, Server
from trimix.testing import build_byte_level_tokenizer, build_chain_model, save_tiny_model

STOP = "ཀ"  # one Tibetan letter: three byte tokens of the byte-level BPE
PROMPTS = ["q", "w", "m", "Numbers 0 1"]
OPENAI_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
EXPECTED_REASONS = {"q": "stop", "w": "eos", "m": "length"}  # greedy; where the chain model decides


@pytest.fixture(scope="module")
def chain_trio(tmp_path_factory) -> tuple[dict[str, Path], int]:
    tokenizer = build_byte_level_tokenizer()

    def token(text: str) -> int:
        (only,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        return only

    chain: dict[int, int] = {}
    for sequence in (
        [token("q"), token("r"), token("s"), *tokenizer(STOP, add_special_tokens=False)["input_ids"]],
        [token("w"), token("u"), token("v"), token("k")],  # k: the run's end-of-sequence id
        [token("m"), token("n"), token("o"), token("m")],  # a cycle: only the budget ends it
    ):
        for a, b in itertools.pairwise(sequence):
            chain[a] = b
    root = tmp_path_factory.mktemp("chain_trio")
    large = root / "large"
    build_chain_model(tokenizer, chain, seed=5).save_pretrained(large)
    tokenizer.save_pretrained(large)
    folders = {
        "large": large,
        "small_cpt": save_tiny_model(root / "small_cpt", "llama", tokenizer, seed=6, hidden_size=64),
        "small_base": save_tiny_model(root / "small_base", "llama", tokenizer, seed=7, hidden_size=64),
    }
    return folders, token("k")


def _run_yaml(folders: dict[str, Path], eos: int, tmp: Path, engine: str, sampled: bool) -> Path:
    generation = {
        "max_new_tokens": 6,
        "stop": [STOP],
        "eos_token_ids": [eos],
        "engine": "static" if engine == "static" else "eager",
        "seed": 11,
        "do_sample": sampled,
        "temperature": 0.8,
        "batch_size": 2,
    }
    if engine == "speculative":
        generation["speculative"] = {"k": 3, "draft": "small_cpt"}
    weights = {"large": 0.6, "small_cpt": 0.6}  # small_base: 1 - 0.6 - 0.6 = -0.2
    raw = {
        "models": [
            {"model": str(path), "role": role, **({"weight": weights[role]} if role in weights else {})}
            for role, path in folders.items()
        ],
        "fusion": {"method": "trimix"},
        "generation": generation,
    }
    path = tmp / f"run_{engine}_{int(sampled)}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def _python_api(run: Path) -> dict[str, tuple]:
    lm = trimix.load(str(run))
    out = {}
    for prompt in PROMPTS:  # one at a time: every entry point gives a lone prompt sampling key 0
        (g,) = lm.generate([prompt])
        out[prompt] = (g.token_ids, g.text, g.finish_reason)
    return out


def _stream(run: Path) -> dict[str, tuple]:
    lm = trimix.load(str(run))
    out = {}
    for prompt in PROMPTS:
        events = list(lm.stream([prompt]))
        final = events[-1].generation
        assert "".join(e.text for e in events) == final.text  # the deltas add up to the text
        out[prompt] = (final.token_ids, final.text, final.finish_reason)
    return out


def _cli(run: Path, tmp: Path) -> dict[str, tuple]:
    out = {}
    for i, prompt in enumerate(PROMPTS):
        folder = tmp / f"cli_{run.stem}_{i}"
        assert main(["-q", "generate", "-c", str(run), "-p", prompt, "-o", str(folder)]) == 0
        (row,) = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
        out[prompt] = (row["token_ids"], row["text"], row["finish_reason"])
    return out


def _server(run: Path) -> dict[str, tuple]:
    lm = trimix.load(str(run))
    out = {}
    server = Server(lm)
    # The server drives the run's runner (not a loop of its own): speculation, or the run's engine.
    gen = lm.generation
    assert server.batcher.scheduler.runner_kind == ("speculative" if gen.speculative else gen.engine)
    with BackgroundServer(server) as running:
        for prompt in PROMPTS:
            # No max_tokens, stop or temperature: the run's settings apply; the seed keys the sampling.
            body = {"model": "trimix", "prompt": prompt, "seed": lm.generation.seed}
            answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).json()
            choice = answer["choices"][0]
            # OpenAI's answer has no token ids: their count (usage), the text and the finish reason.
            out[prompt] = (answer["usage"]["completion_tokens"], choice["text"], choice["finish_reason"])
    return out


def _lm_eval(run: Path) -> dict[str, tuple]:
    lm = trimix.load(str(run))
    gen = lm.generation
    settings = {"until": list(gen.stop), "max_gen_toks": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        settings["temperature"] = gen.temperature
    backend = TrimixLM(lm=lm)
    out = {}
    for prompt in PROMPTS:
        (text,) = backend.generate_until([Instance("generate_until", {}, (prompt, settings), 0)])
        out[prompt] = (None, text, None)  # lm-eval's API returns the text alone
    return out


ENTRY_POINTS = {"stream": _stream, "cli": _cli, "server": _server, "lm_eval": _lm_eval}


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("engine", ["eager", "static", "speculative"])
def test_every_entry_point_decodes_the_run_alike(chain_trio, tmp_path, engine, sampled) -> None:
    folders, eos = chain_trio
    run = _run_yaml(folders, eos, tmp_path, engine, sampled)
    expected = _python_api(run)
    if not sampled:
        for prompt, reason in EXPECTED_REASONS.items():
            assert expected[prompt][2] == reason, (prompt, expected[prompt])
        assert expected["q"][1] == "rs"  # cut before the stop string
    for name, entry in ENTRY_POINTS.items():
        got = entry(run, tmp_path) if name == "cli" else entry(run)
        for prompt in PROMPTS:
            want, have = expected[prompt], got[prompt]
            assert have[1] == want[1], (name, prompt, have, want)
            if isinstance(have[0], int):  # OpenAI's protocol names an end of sequence "stop" too
                reason = OPENAI_REASONS[want[2]]
                assert have[0] == len(want[0]) and have[2] == reason, (name, prompt, have, want)
            elif have[0] is not None:
                assert have[0] == want[0] and have[2] == want[2], (name, prompt, have, want)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("engine", ["eager", "static", "speculative"])
def test_an_evaluation_generate_cell_decodes_with_the_run(chain_trio, tmp_path, engine, sampled) -> None:
    """``trimix eval``'s generation cells decode each rendered prompt as ``generate`` does under the run's
    settings (engine, end-of-sequence id, sampling), with the task's stop strings and token budget."""
    from trimix.evaluation import Evaluator, read_predictions
    from trimix.evaluation.plan import EvalPlan

    folders, eos = chain_trio
    run = _run_yaml(folders, eos, tmp_path, engine, sampled)
    raw = yaml.safe_load(run.read_text(encoding="utf-8"))
    raw["eval"] = {
        "methods": [{"name": "fused", "method": "trimix", "weights": {"large": 0.6, "small_cpt": 0.6}}],
        "tasks": [{"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 4, "shots": 0}],
        "batch_size": 2,
    }
    config = trimix.load_config(raw)
    out = tmp_path / "eval"
    out.mkdir()
    Evaluator(config, out, progress=False).run()
    rows = {str(r["id"]): r for r in read_predictions(out / "predictions.jsonl")}
    (cell,) = EvalPlan(config).cells
    settings = cell.task.generation_settings()
    lm = trimix.FusedLM.from_config(config)
    for start in range(0, len(cell.items), 2):  # the cell's batches: sampling keys restart per batch
        batch = cell.items[start : start + 2]
        expected = lm.generate(
            [cell.task.render(e).text for e in batch],
            max_new_tokens=settings["max_new_tokens"],
            stop=settings["stop"],
            on_context_limit="stop",
        )
        for example, generation in zip(batch, expected, strict=True):
            row = rows[str(example.id)]
            assert (row["output"], row["finish_reason"]) == (generation.text, generation.finish_reason)
