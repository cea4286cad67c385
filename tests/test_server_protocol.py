"""`trimix serve` speaks the protocol real clients use: lm-eval's own API models, the official openai
client, vLLM's tokenizer endpoints; and no request body makes it fail or stall.

Against a live server on 127.0.0.1 holding the tiny trio at TriMix weights.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FLOAT32_SUM_REL, trio_config
from trimix import FusedLM, load_config

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
lm_eval = pytest.importorskip("lm_eval")

from trimix import lm_eval as backend  # noqa: E402
from trimix.decoding.batcher import ContinuousBatcher  # noqa: E402
from trimix.server import BackgroundServer, Server  # noqa: E402

PROMPT = "ئۇيغۇر تىلى تۈركىي تىللار"
LOGLIK, GEN = "trimix_sib200_topic_loglik_uig_Arab", "trimix_sib200_topic_gen_uig_Arab"


@pytest.fixture(scope="module")
def live(trio, tmp_path_factory):
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    raw["generation"] = {"max_new_tokens": 8}
    run = tmp_path_factory.mktemp("protocol") / "run.yaml"
    run.write_text(yaml.safe_dump(raw))
    lm = FusedLM.from_config(load_config(raw), load_all=True)
    server = Server(lm, model_name="trimix-tiny", batcher=ContinuousBatcher(lm, max_batch=32, max_queue=256))
    with BackgroundServer(server) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield lm, client, running.url, run


def test_echo_scores_the_prompt_as_loglikelihood_does(live) -> None:
    """Token-id prompts with echo (through the official client): each prompt token's log-probability under
    the fused model (the first null), what ``loglikelihood_tokens`` sums; ``max_tokens: 0`` scores only."""
    lm, client, url, _ = live
    ids = [lm.tokenizer(PROMPT)["input_ids"], lm.tokenizer("Hello world, this is")["input_ids"]]
    body = {"model": "trimix-tiny", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0}
    answer = client.completions.create(**body).model_dump()
    for choice, row in zip(sorted(answer["choices"], key=lambda c: c["index"]), ids, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(row) and logprobs["token_logprobs"][0] is None
        assert choice["text"] == lm.tokenizer.decode(row)
        (direct,) = lm.loglikelihood_tokens([(row, len(row) - 1)])
        total = sum(logprobs["token_logprobs"][1:])
        assert total == pytest.approx(direct.logprob, rel=FLOAT32_SUM_REL)
        greedy = all(
            lp == max(top.values())
            for lp, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True)
        )
        assert greedy == direct.is_greedy
    assert answer["usage"]["completion_tokens"] == 0
    # With max_tokens 1 (lm-eval's request), the generated token follows the prompt's.
    body.update(max_tokens=1, prompt=ids[0])
    (choice,) = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids[0]) + 1
    assert choice["text"].startswith(lm.tokenizer.decode(ids[0]))


def _samples(out: dict, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_local_completions_agrees_with_the_trimix_model(live) -> None:
    """lm-eval's own ``local-completions`` model against the live server: the log-likelihood task's
    per-sample scores and accuracy, and the generation task's outputs, equal ``--model trimix`` on the
    same run.yaml (the API model encodes with the served tokenizer, BOS added as trimix adds it)."""
    from lm_eval.tasks import TaskManager

    lm, _, url, run = live
    manager = TaskManager(include_path=backend.tasks_dir(), include_defaults=False)
    tokenizer = run.parent / "tokenizer"  # the served tokenizer alone, as lm-eval's AutoTokenizer reads it
    lm.tokenizer.save_pretrained(tokenizer)
    common = {"tasks": [LOGLIK, GEN], "limit": 4, "task_manager": manager, "log_samples": True}
    api = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url={url}/v1/completions,model=trimix-tiny,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},add_bos_token=True,max_retries=1"
        ),
        **common,
    )
    own = lm_eval.simple_evaluate(model="trimix", model_args=f"config={run}", **common)
    for api_sample, own_sample in zip(_samples(api, LOGLIK), _samples(own, LOGLIK), strict=True):
        for (a_lp, a_greedy), (o_lp, o_greedy) in zip(
            [r[0] for r in api_sample["resps"]], [r[0] for r in own_sample["resps"]], strict=True
        ):
            assert float(a_lp) == pytest.approx(float(o_lp), rel=1e-6, abs=1e-6)
            assert bool(a_greedy) == bool(o_greedy)
    assert api["results"][LOGLIK]["acc,none"] == own["results"][LOGLIK]["acc,none"]
    api_gen = [s["resps"][0][0] for s in _samples(api, GEN)]
    assert api_gen == [s["resps"][0][0] for s in _samples(own, GEN)]
    assert api["results"][GEN]["exact_match,none"] == own["results"][GEN]["exact_match,none"]


def test_tokenizer_endpoints_as_vllm_and_lm_eval_read_them(live) -> None:
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    lm, _, url, _ = live
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}, timeout=30).json()
    assert tokens["tokens"] == lm.tokenizer(PROMPT)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    bare = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}, timeout=30)
    assert bare.json()["tokens"] == lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    back = httpx.post(f"{url}/detokenize", json={"tokens": bare.json()["tokens"]}, timeout=30).json()
    assert back["prompt"] == PROMPT
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 200 and chat.json()["count"] > 0
    assert check_remote_tokenizer_support(f"{url}/v1/completions")
    remote = RemoteTokenizer(f"{url}/v1/completions")
    assert remote.encode(PROMPT) == bare.json()["tokens"] and remote.eos_token == lm.tokenizer.eos_token
    for body, param in (
        ({"tokens": [10**9]}, "tokens"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ):
        endpoint = "detokenize" if "tokens" in body else "tokenize"
        refused = httpx.post(f"{url}/{endpoint}", json=body, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_the_openai_client_sees_model_names_usage_and_limits(live) -> None:
    lm, client, url, _ = live
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert raised.value.body["code"] == "model_not_found" and "trimix-tiny" in raised.value.body["message"]
    chunks = list(
        client.completions.create(
            model="trimix-tiny",
            prompt=PROMPT,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == sum(bool(c.choices) for c in chunks)
    assert usage.prompt_tokens == len(lm.tokenizer(PROMPT)["input_ids"])
    chat = client.chat.completions.create(
        model="trimix-tiny", messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=3
    )
    assert chat.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="trimix-tiny", prompt=PROMPT, max_tokens=2, logprobs=6)
    # A lone surrogate cannot leave the openai client (it encodes UTF-8); as JSON text it can.
    raw = '{"model": "trimix-tiny", "prompt": "abc\\ud800", "max_tokens": 2}'
    refused = httpx.post(f"{url}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert refused.status_code == 400 and "lone surrogate" in refused.json()["error"]["message"], refused.text
    assert refused.json()["error"]["param"] == "prompt"
    chat = '{"messages": [{"role": "user", "content": "\\udfff"}]}'
    refused = httpx.post(
        f"{url}/v1/chat/completions", content=chat, headers={"Content-Type": "application/json"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content", (
        refused.text
    )
    with pytest.raises(openai.BadRequestError, match=r"unknown `trimix\.method` 'quadmix'"):
        client.completions.create(
            model="trimix-tiny", prompt=PROMPT, max_tokens=2, extra_body={"trimix": {"method": "quadmix"}}
        )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "stream",
    "logprobs",
    "echo",
    "top_logprobs",
    "trimix",
    "model",
    "stream_options",
    "max_completion_tokens",
]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
    body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON,
)
def test_no_request_body_is_a_server_error(live, endpoint, body) -> None:
    """Wrong types, huge and tiny numbers, NaN, lone surrogates, nesting: a 4xx or an answer, never a
    5xx, and the server keeps serving."""
    _, _, url, _ = live
    if isinstance(body, dict) and endpoint.endswith("completions"):
        body.setdefault("max_tokens", 2)  # a valid request decodes; keep it short
    content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    answer = httpx.post(
        url + endpoint, content=content, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert answer.status_code < 500, (body, answer.text)
    if answer.status_code >= 400:
        assert answer.json()["error"]["type"] == "invalid_request_error", answer.text


def test_large_or_many_requests_do_not_stall_the_server(live) -> None:
    """A 5 MB body and 32 concurrent long prompts are tokenised off the event loop: ``/health`` keeps
    answering at once meanwhile (the slowest answer is reported; the bound is generous for CI)."""
    _, _, url, _ = live
    big = json.dumps({"prompt": "ئۇيغۇر " * 400_000, "max_tokens": 1}, ensure_ascii=False).encode()
    assert len(big) > 5_000_000
    long_prompt = {"prompt": "ئۇيغۇر تىلى " * 60, "max_tokens": 1}
    with httpx.Client(timeout=30) as probe:
        idle = []
        for _ in range(5):
            start = time.perf_counter()
            probe.get(f"{url}/health")
            idle.append(time.perf_counter() - start)
    slowest = 0.0
    with concurrent.futures.ThreadPoolExecutor(34) as pool:
        pending = [pool.submit(httpx.post, f"{url}/v1/completions", content=big, timeout=120)]
        pending += [
            pool.submit(httpx.post, f"{url}/v1/completions", json=long_prompt, timeout=120) for _ in range(32)
        ]
        with httpx.Client(timeout=30) as probe:
            while not all(p.done() for p in pending):
                start = time.perf_counter()
                assert probe.get(f"{url}/health").status_code == 200
                slowest = max(slowest, time.perf_counter() - start)
                time.sleep(0.02)
        statuses = sorted(p.result().status_code for p in pending)
    assert statuses[-1] < 500 and statuses.count(200) >= 32, statuses
    print(f"/health: {min(idle) * 1000:.0f} ms idle, slowest {slowest * 1000:.0f} ms during the load")
    assert slowest < 1.0 and math.isfinite(slowest)


def test_lm_eval_local_chat_completions_runs_a_generation_task(live) -> None:
    from lm_eval.tasks import TaskManager

    lm, _, url, _ = live
    manager = TaskManager(include_path=backend.tasks_dir(), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"base_url={url}/v1/chat/completions,model=trimix-tiny,max_retries=1",
        tasks=[GEN],
        limit=2,
        apply_chat_template=True,
        task_manager=manager,
        log_samples=True,
    )
    for sample in _samples(out, GEN):  # each answer is the fused model's own reply to the chat
        (context, *_), settings = sample["arguments"][0]  # lm-eval logs the chat as (JSON text,)
        messages = json.loads(context)
        rendered = lm.render(messages)[lm.roles[0]]
        until = [s for s in settings["until"] if s]
        expected = lm.generate([rendered], max_new_tokens=settings["max_gen_toks"], stop=until)[0].text
        assert sample["resps"][0][0] == expected
    assert "exact_match,none" in out["results"][GEN]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "--port must be a TCP port from 1 to 65535; got 99999"),
        (["--max-tokens-cap", "-5"], "--max-tokens-cap must be positive; got -5"),
        (
            ["--default-max-tokens", "0"],
            "--default-max-tokens must be from 1 to --max-tokens-cap (2048); got 0",
        ),
        (["--max-tokens-cap", "8", "--default-max-tokens", "16"], "got 16"),
        (["--host", "192.0.2.7"], "--host 192.0.2.7 --port"),
        ("busy", "is in use by another process"),
    ],
)
def test_serve_refuses_bad_flags_before_loading_models(tmp_path, capsys, monkeypatch, flags, message) -> None:
    """Checked before any model loads: the run names models that do not exist, and loading them would fail
    with another message."""
    from trimix.cli.main import main
    from trimix.server.background import bound_socket

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"models": [{"model": str(tmp_path / "absent"), "role": "only"}]}))
    holder = None
    if flags == "busy":
        holder = bound_socket("127.0.0.1", 0)
        holder.listen()
        flags = ["--port", str(holder.getsockname()[1])]
    try:
        assert main(["-q", "serve", "-c", str(run), *flags]) == 2
    finally:
        if holder is not None:
            holder.close()
    err = capsys.readouterr().err
    assert message in err and "absent" not in err, err
