"""The CUDA-graph engine against the eager engine on a GPU (skipped without one; CI has none).

Float32 tiny trios on the GPU: every setting must give the eager engine's tokens exactly, and a
second ``generate`` on the same model reuses the captured graph.
"""

from __future__ import annotations

import pytest
import torch

from conftest import trio_config
from trimix import FusedLM, GenerationConfig, load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    "Hello world, this is",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ. بۈگۈن ھاۋا",
    "The",
    "Translate the sentence into English. Answer: The quick brown fox",
    "Numbers 0 1 2 3",
]


def _trio(make_model, arch: str, plausibility: bool = False) -> FusedLM:
    trio = {
        "large": make_model(arch, seed=1, extra_rows=8),
        "small_cpt": make_model(arch, seed=2),
        "small_base": make_model(arch, seed=3),
    }
    fusion = {"method": "trimix"}
    if plausibility:
        fusion["plausibility"] = {"role": "small_cpt", "alpha": 0.2}
    raw = trio_config(trio, **fusion) | {"device": "cuda"}
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    return FusedLM.from_config(load_config(raw))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 3},
        {"plausibility": True},
        {"stop": True},
    ],
    ids=["greedy", "sampled", "plausibility", "stop"],
)
def test_graph_engine_equals_eager_on_gpu(make_model, arch: str, settings: dict) -> None:
    settings = dict(settings)
    lm = _trio(make_model, arch, settings.pop("plausibility", False))
    stop = settings.pop("stop", False)
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True, batch_size=5, compile=False, **settings)
    eager = lm.generate(PROMPTS, gen, engine="eager")
    if stop:
        gen = gen.model_copy(update={"stop": [eager[1].text[2:4]]})
        eager = lm.generate(PROMPTS, gen, engine="eager")
    graphs = lm.generate(PROMPTS, gen, engine="graphs")
    assert [g.token_ids for g in graphs] == [g.token_ids for g in eager]
    assert [g.finish_reason for g in graphs] == [g.finish_reason for g in eager]
    static = lm.generate(PROMPTS, gen, engine="static")
    assert [g.token_ids for g in static] == [g.token_ids for g in eager]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_compiled_graph_engine_equals_eager_on_gpu(make_model, arch: str) -> None:
    lm = _trio(make_model, arch)
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True, batch_size=5)
    eager = lm.generate(PROMPTS, gen, engine="eager")
    compiled = lm.generate(PROMPTS, gen, engine="graphs", compile=True)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]


def test_graph_session_is_captured_once_and_reused(make_model) -> None:
    lm = _trio(make_model, "qwen2")
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True, batch_size=4, engine="graphs", compile=False)
    first = lm.generate(PROMPTS[:3], gen)
    (session,) = lm.pool.sessions.sessions.values()
    graph = session.graph
    second = lm.generate(PROMPTS[:3], gen)
    other = lm.generate(PROMPTS[1:4], gen)  # same bucket (4 rows), other prompts: same graph, new contents
    assert session.graph is graph and len(lm.pool.sessions.sessions) == 1
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    eager = lm.generate(PROMPTS[1:4], gen, engine="eager")
    assert [g.token_ids for g in other] == [g.token_ids for g in eager]
