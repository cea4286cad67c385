"""`trimix serve` with the official openai client against a live server on 127.0.0.1 (tiny models).

Each answer is compared with calling the fused model directly; the server and its batcher thread are
stopped at the end of the module, and the port is released.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import time

import pytest

from conftest import trio_config
from trimix import FusedLM, load_config

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from trimix.decoding.batcher import ContinuousBatcher  # noqa: E402
from trimix.server import BackgroundServer, Server  # noqa: E402

PROMPTS = [
    "Hello world, this is",
    "ئۇيغۇر تىلى تۈركىي تىللار",
    "The quick brown",
    "Translate the sentence into English. Answer:",
]


@pytest.fixture(scope="module")
def served(trio):
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    lm = FusedLM.from_config(load_config(raw), load_all=True)
    server = Server(lm, default_max_tokens=8, batcher=ContinuousBatcher(lm, max_batch=32, max_queue=64))
    running = BackgroundServer(server).start()
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield lm, client, running.url, server
    running.stop()
    assert not running.thread.is_alive() and not server.batcher.thread.is_alive()
    with socket.socket() as s:  # nothing listens on the port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", running.port))


def test_completion_equals_the_fused_model(served) -> None:
    lm, client, _, _ = served
    out = client.completions.create(model="trimix", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    expected = lm.generate([PROMPTS[0]], max_new_tokens=6)[0]
    assert out.choices[0].text == expected.text
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.prompt_tokens == len(lm.tokenizer(PROMPTS[0])["input_ids"])  # <bos> included
    assert client.models.list().data[0].id == "trimix"


def test_chat_streaming_and_stop(served) -> None:
    lm, client, _, _ = served
    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model="trimix", messages=messages, max_tokens=8)
    rendered = lm.render(messages)[lm.roles[0]]
    assert (
        rendered.endswith("Assistant:")
        and whole.choices[0].message.content == lm.generate([rendered], max_new_tokens=8)[0].text
    )
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="trimix", messages=messages, max_tokens=8, stream=True)
    ]
    assert "".join(pieces) == whole.choices[0].message.content
    text = client.completions.create(model="trimix", prompt=PROMPTS[0], max_tokens=8).choices[0].text
    stop = text[2:4]
    stopped = client.completions.create(model="trimix", prompt=PROMPTS[0], max_tokens=8, stop=[stop])
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"


def test_per_request_weights_change_the_output_without_a_reload(served) -> None:
    lm, client, _, _ = served
    other = {"weights": {"large": 1.0, "small_cpt": 1.0, "small_base": -1.0}, "method": "weighted"}
    a = client.completions.create(model="trimix", prompt=PROMPTS[1], max_tokens=8, logprobs=0).choices[0]
    b = client.completions.create(
        model="trimix", prompt=PROMPTS[1], max_tokens=8, logprobs=0, extra_body={"trimix": other}
    ).choices[0]
    fused = lm.with_weights(method="weighted", large=1.0, small_cpt=1.0, small_base=-1.0)
    assert b.text == fused.generate([PROMPTS[1]], max_new_tokens=8)[0].text
    # The fused distribution itself changed (the text of a tiny random model may not).
    assert a.logprobs.token_logprobs != b.logprobs.token_logprobs


def test_logprobs_are_the_fused_distribution(served) -> None:
    lm, client, _, _ = served
    out = client.completions.create(model="trimix", prompt=PROMPTS[0], max_tokens=3, logprobs=2)
    logprobs = out.choices[0].logprobs
    generated = lm.generate([PROMPTS[0]], max_new_tokens=3)[0].token_ids
    prompt_ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    (direct,) = lm.loglikelihood_tokens([(prompt_ids + generated, len(generated))])
    assert sum(logprobs.token_logprobs) == pytest.approx(direct.logprob, abs=1e-4)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert all(
        max(top.values()) >= lp - 1e-6
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )


def test_32_concurrent_greedy_requests_each_equal_alone(served) -> None:
    lm, client, _, server = served
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    expected = {p: lm.generate([p], max_new_tokens=6)[0].text for p in prompts}

    def ask(prompt: str) -> str:
        return client.completions.create(model="trimix", prompt=prompt, max_tokens=6).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = dict(zip(prompts, pool.map(ask, prompts), strict=True))
    assert answers == expected
    assert server.batcher.stats["finished"] >= 32


def test_a_disconnected_client_is_cancelled(served) -> None:
    """A streaming client that hangs up after one chunk: its row leaves the batch at the next step (counted
    as cancelled, not finished), and decoding stops, long before its 2000-token budget could run out."""
    _, _, base, server = served
    stats = server.batcher.stats
    cancelled, finished = stats["cancelled"], stats["finished"]
    body = {"prompt": PROMPTS[0], "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as response:
        for _ in response.iter_lines():
            break  # read one chunk, then hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if stats["cancelled"] > cancelled and server.batcher.running == 0:
            break
        time.sleep(0.05)
    got = stats["cancelled"] - cancelled
    assert got == 1, f"{got} request(s) counted as cancelled within 20 s of the hang-up (expected 1)"
    rows = server.batcher.running
    assert rows == 0, f"{rows} row(s) still decoding 20 s after the hang-up"
    assert stats["finished"] == finished, "the row ran to its end instead of being cancelled"
    tokens = stats["tokens"]
    time.sleep(0.5)  # dozens of decode steps of these tiny models: none may happen with nothing running
    assert stats["tokens"] == tokens and server.batcher.running == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "trimix": {"weights": {"huge": 1.0}}}, "unknown role(s) ['huge']"),
        ({"prompt": "hello " * 1200, "max_tokens": 2}, "reads at most 1024"),
        ({"prompt": ""}, "`prompt` must not be empty"),
        ({"prompt": "x", "temperature": "hot"}, "`temperature` must be a number"),
    ],
)
def test_bad_requests_get_400_with_openai_errors(served, body, message) -> None:
    _, _, base, _ = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{base}/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_health_metrics_and_playground(served) -> None:
    _, _, base, _ = served
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{base}/metrics").text
    assert "trimix_tokens_generated_total" in metrics and "trimix_queue_depth" in metrics
    assert "trimix_admit_seconds_total" in metrics and "trimix_step_seconds_total" in metrics
    page = httpx.get(f"{base}/").text
    assert "trimix playground" in page and "/v1/completions" in page


class _HeldBatcher(ContinuousBatcher):
    """A batcher whose decoding thread starts only on :meth:`release`: until then nothing leaves the queue,
    so a full queue stays full for as long as the test needs (no timing involved)."""

    def start(self) -> ContinuousBatcher:  # called by the server's lifespan
        return self

    def release(self) -> None:
        if self.thread is None:
            super().start()


def test_a_full_queue_answers_429(trio) -> None:
    """Over HTTP, against a live server whose one-slot queue holds a request that cannot drain: the next
    request gets 429 with OpenAI's ``rate_limit_error`` body (the openai client raises RateLimitError), is
    not queued, and once the queue drains the waiting request is answered and new ones are accepted."""
    lm = FusedLM.from_config(load_config(trio_config(trio)))
    batcher = _HeldBatcher(lm, max_batch=1, max_queue=1)
    server = Server(lm, default_max_tokens=3, batcher=batcher)
    with BackgroundServer(server) as running, concurrent.futures.ThreadPoolExecutor(1) as pool:
        url = f"{running.url}/v1/completions"
        try:
            waiting = pool.submit(httpx.post, url, json={"prompt": PROMPTS[0], "max_tokens": 3}, timeout=60)
            deadline = time.monotonic() + 30
            while batcher.queued < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.queued == 1, "the first request never reached the queue"
            # Refusing needs no decoding, so the answer is immediate; a request let into the queue would hang
            # here (nothing drains it) and fail with a timeout instead.
            refused = httpx.post(url, json={"prompt": PROMPTS[1], "max_tokens": 3}, timeout=10)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and "busy" in error["message"], error
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=10)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="trimix", prompt=PROMPTS[2], max_tokens=3)
            assert batcher.queued == 1 and batcher.stats["requests"] == 1  # refusals never queued
        finally:
            batcher.release()
        answered = waiting.result(timeout=60)
        assert answered.status_code == 200
        assert answered.json()["choices"][0]["text"] == lm.generate([PROMPTS[0]], max_new_tokens=3)[0].text
        again = httpx.post(url, json={"prompt": PROMPTS[1], "max_tokens": 3}, timeout=60)
        assert again.status_code == 200 and batcher.stats["requests"] == 2


def _headless_chromium():
    """Selenium driving Debian's chromium through chromium-driver, or a skip naming what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="the playground test needs selenium")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("the playground test needs Chromium: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_playground_in_a_headless_browser(served) -> None:
    """Load the page, generate, then move a weight slider with the keyboard and generate again: the second
    request carries the new weight, and the page shows exactly what the fused model gives for it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    lm, _, base, _ = served
    browser = _headless_chromium()
    try:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        slider = wait.until(lambda b: b.find_element(By.ID, "w-large"))
        prompt, limit = browser.find_element(By.ID, "prompt"), browser.find_element(By.ID, "maxTokens")
        prompt.clear()
        prompt.send_keys(PROMPTS[1])
        limit.clear()
        limit.send_keys("6")

        def generate() -> tuple[dict, list]:
            browser.find_element(By.ID, "go").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text.endswith("tokens"))
            return browser.execute_script("return window.lastRequest"), browser.find_elements(
                By.CSS_SELECTOR, ".tok"
            )

        first, tokens = generate()
        assert first["trimix"]["weights"] == {
            "large": 0.3,
            "small_cpt": 0.9,
            "small_base": pytest.approx(-0.2),
        }
        assert tokens and all(t.get_attribute("data-source") in lm.roles for t in tokens)
        ActionChains(browser).move_to_element(tokens[0]).perform()  # hovering shows the candidates
        assert "chosen mostly by" in browser.find_element(By.ID, "tip").text

        slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # 0.30 -> 0.40 (step 0.05)
        second, tokens = generate()
        weights = second["trimix"]["weights"]
        assert weights["large"] == pytest.approx(0.4) and weights["small_cpt"] == pytest.approx(0.9)
        shown = "".join(t.get_attribute("textContent") for t in tokens)
        expected = lm.with_weights(method="weighted", **weights).generate([PROMPTS[1]], max_new_tokens=6)[0]
        assert shown == expected.text
    finally:
        browser.quit()


def test_a_request_at_the_context_limit_stops_where_generate_does(served) -> None:
    """Served rows get the same token budget as ``generate`` with ``on_context_limit: stop``."""
    lm, client, _, _ = served
    source = lm.sources[0]
    prompt, words = "", 0
    while True:  # the longest run of words that leaves 3 or more positions of the 1024-token context
        longer = "hello " * (words + 1)
        if len(source.tokenizer(longer, add_special_tokens=source.adds_special_tokens)["input_ids"]) > 1021:
            break
        prompt, words = longer, words + 1
    room = 1024 - len(source.tokenizer(prompt, add_special_tokens=source.adds_special_tokens)["input_ids"])
    assert 3 <= room < 8
    out = client.completions.create(model="trimix", prompt=prompt, max_tokens=8, temperature=0)
    expected = lm.generate([prompt], max_new_tokens=8, on_context_limit="stop")[0]
    assert out.usage.completion_tokens == len(expected.token_ids) <= room
    assert out.choices[0].text == expected.text


def test_trimix_method_is_honoured_without_weights_and_unknown_methods_refused(served) -> None:
    """`trimix.method` alone selects that method (Proxy Tuning sets its own weights: 1, 1, -1); an unknown
    method is a 400 naming it, not the run's fusion under another name."""
    lm, _, base, _ = served
    body = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "trimix": {"method": "proxy_tuning"}}
    answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
    expected = lm.with_weights(method="proxy_tuning").generate([PROMPTS[0]], max_new_tokens=5)[0]
    assert answer["choices"][0]["text"] == expected.text
    assert lm.with_weights(method="proxy_tuning").fusion.weights == {
        "large": 1.0,
        "small_cpt": 1.0,
        "small_base": -1.0,
    }
    body["trimix"] = {"method": "quadmix"}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert (
        response.status_code == 400
        and "unknown `trimix.method` 'quadmix'" in response.json()["error"]["message"]
    )


RTL_TEXT = " ئۇيغۇر تىلى"  # Uyghur in Arabic script: right to left, letters joined across token boundaries


def test_playground_keeps_right_to_left_text_in_order_and_joined(tmp_path) -> None:
    """A model certain to answer in Uyghur: the page's output reads right to left (its direction comes from
    the text), the first token sits right of the last, and the coloured tokens take exactly the width of
    the same text shaped as one run — token boundaries break no joined letters (padding or borders
    between them did: the letters fell apart into isolated forms)."""
    import itertools

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from trimix.testing import build_byte_level_tokenizer, build_chain_model

    tokenizer = build_byte_level_tokenizer()
    ids = tokenizer("q" + RTL_TEXT, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == len(ids)  # a chain: each token names the next
    folder = tmp_path / "chain"
    build_chain_model(tokenizer, dict(itertools.pairwise(ids)), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = FusedLM.from_config(
        load_config(
            {
                "models": [{"model": str(folder), "role": "uyghur"}],
                "fusion": {"method": "single", "role": "uyghur"},
            }
        )
    )
    with BackgroundServer(Server(lm)) as running:
        browser = _headless_chromium()
        try:
            browser.set_window_size(1000, 800)
            browser.get(running.url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "w-uyghur"))
            prompt, limit = browser.find_element(By.ID, "prompt"), browser.find_element(By.ID, "maxTokens")
            prompt.clear()
            prompt.send_keys("q")
            limit.clear()
            limit.send_keys(str(len(ids) - 1))
            browser.find_element(By.ID, "go").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text.endswith("tokens"))
            shown = browser.execute_script("return document.getElementById('output').textContent")
            assert shown == RTL_TEXT
            layout = browser.execute_script(
                """
                const out = document.getElementById('output');
                const spans = [...out.querySelectorAll('.tok')].filter((s) => s.textContent);
                const boxes = spans.map((s) => s.getBoundingClientRect());
                const probe = out.cloneNode(false);  // the same styles (the same id, for a moment)
                probe.textContent = out.textContent;
                out.parentNode.appendChild(probe);
                const range = document.createRange();
                range.selectNodeContents(probe);
                const whole = range.getBoundingClientRect().width;
                probe.remove();
                return {
                  direction: getComputedStyle(out).direction,
                  first: [boxes[0].left, boxes[0].right],
                  last: [boxes[boxes.length - 1].left, boxes[boxes.length - 1].right],
                  tokens: Math.max(...boxes.map((b) => b.right)) - Math.min(...boxes.map((b) => b.left)),
                  whole,
                };
                """
            )
            assert layout["direction"] == "rtl", layout
            assert layout["first"][1] > layout["last"][1], layout  # read from the right
            assert layout["tokens"] == pytest.approx(layout["whole"], abs=1.0), layout
            screenshot = os.environ.get("TRIMIX_PLAYGROUND_SCREENSHOT")
            if (
                screenshot
            ):  # docs/playground_rtl.png: TRIMIX_PLAYGROUND_SCREENSHOT=... pytest -k right_to_left
                browser.find_element(By.ID, "output").screenshot(screenshot)
        finally:
            browser.quit()
