"""`trimix serve` under a bounded load on loopback, against offline `generate` on the same prompts.

A live server (uvicorn in this process, 127.0.0.1 only) holds the fused model; ``clients`` threads
each send streaming ``/v1/completions`` requests one after another (a closed loop) until the
scenario's requests are done. Every request asks for ``--new-tokens`` greedy tokens of a Uyghur
sentence's continuation. The same prompts then run offline through ``FusedLM.generate`` with
``batch_size = clients``; the serving overhead is the ratio of the two throughputs.

Reported per scenario: tokens/s (tokens the batcher emitted over the scenario's wall time),
requests/s, p50/p95 time to first token (first streamed chunk) and request latency. Target: at 16
concurrent clients, server throughput >= 0.8x offline batched generate.

    python bench/serve_load.py --model tiny
    python bench/serve_load.py --model gemma                     # the issue's scenarios (long on CPU)
    python bench/serve_load.py --model gemma --scenarios 1:10 16:64
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import torch
from common import demo_trio, machine, save

from trimix import FusedLM, GenerationConfig
from trimix.data import read_sib200
from trimix.decoding.batcher import ContinuousBatcher
from trimix.decoding.text import encode_texts
from trimix.server import BackgroundServer, Server

logger = logging.getLogger("bench")
DEFAULT_SCENARIOS = ("1:50", "4:50", "16:200", "64:200")


@dataclass
class Timings:
    first_token: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_prompts(n: int, max_chars: int = 120) -> list[str]:
    """``n`` real Uyghur sentences (SIB-200 dev, then test), cut to a length budget."""
    rows = read_sib200("uig_Arab", "dev") + read_sib200("uig_Arab", "test")
    return [rows[i % len(rows)].text[:max_chars] for i in range(n)]


def start_server(lm: FusedLM, max_batch: int) -> tuple[BackgroundServer, Server]:
    server = Server(lm, batcher=ContinuousBatcher(lm, max_batch=max_batch, max_queue=1024))
    return BackgroundServer(server).start(), server


def one_request(client: httpx.Client, prompt: str, new_tokens: int, timings: Timings) -> None:
    body = {"model": "trimix", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            timings.errors.append(f"HTTP {response.status_code}: {response.read()[:200]!r}")
            return
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - start
    timings.first_token.append(first if first is not None else float("nan"))
    timings.latency.append(time.perf_counter() - start)


def run_load(base: str, prompts: list[str], clients: int, new_tokens: int) -> tuple[float, Timings]:
    """Wall seconds for ``clients`` closed-loop clients to finish every prompt, and per-request timings."""
    timings, lock, queue = Timings(), threading.Lock(), list(enumerate(prompts))

    def client_loop() -> None:
        with httpx.Client(base_url=base, timeout=3600) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    _, prompt = queue.pop(0)
                one_request(client, prompt, new_tokens, timings)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def costs_alone(lm: FusedLM, prompts: list[str]) -> dict[str, float]:
    """What the batcher's admissions and steps would cost without the HTTP side, for the first fused
    source: prefilling 8 prompts, inserting 8 rows into a 56-row cache, one decode step of 64 rows."""
    source = lm.sources[0]
    backend = source.backend

    def prefill(texts: list[str]):
        enc = encode_texts(source, texts)
        return backend.prefill(enc["input_ids"], enc["attention_mask"])[1]

    prefill(prompts[:8])  # warm-up
    start = time.perf_counter()
    arrivals = prefill(prompts[56:64])
    prefill_s = time.perf_counter() - start
    running = prefill(prompts[:56])
    start = time.perf_counter()
    backend.insert_rows(running, arrivals)
    insert_s = time.perf_counter() - start
    token = torch.full((64, 1), int(source.tokenizer.eos_token_id or 0))
    start = time.perf_counter()
    backend.advance(running, token)
    step_s = time.perf_counter() - start
    return {
        "prefill 8 prompts": prefill_s,
        "insert 8 rows into 56": insert_s,
        "decode step of 64 rows": step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=list(DEFAULT_SCENARIOS),
        help="CLIENTS:REQUESTS pairs (default: %(default)s)",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    scenarios = [tuple(int(x) for x in s.split(":")) for s in args.scenarios]

    lm = demo_trio(args.model)  # TriMix, large 0.1 / small_cpt 0.9 / small_base 0
    running, server = start_server(lm, max_batch=max(c for c, _ in scenarios))
    base = running.url
    print(
        f"# serve load, {args.model} trio ({lm.fusion.describe()}), {args.new_tokens} new tokens — {machine()}"
    )
    print(
        f"{'clients':>7} {'reqs':>5} {'srv tok/s':>9} {'req/s':>6} {'TTFT p50':>8} {'p95':>6} "
        f"{'lat p50':>7} {'p95':>6} {'offline tok/s':>13} {'ratio':>6}"
    )
    rows = []
    try:
        run_load(base, load_prompts(2), 2, 4)  # warm-up: first-call costs out of the first scenario
        for clients, n_requests in scenarios:
            prompts = load_prompts(n_requests)
            tokens_before = server.batcher.stats["tokens"]
            timing_before = dict(server.batcher.timing)
            wall, timings = run_load(base, prompts, clients, args.new_tokens)
            spent = {key: server.batcher.timing[key] - timing_before[key] for key in timing_before}
            if timings.errors:
                raise SystemExit(f"{len(timings.errors)} request(s) failed, e.g. {timings.errors[0]}")
            served_tokens = server.batcher.stats["tokens"] - tokens_before
            gen = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=clients)
            start = time.perf_counter()
            offline = lm.generate(prompts, gen)
            offline_wall = time.perf_counter() - start
            offline_tokens = sum(len(g.token_ids) for g in offline)
            row = {
                "clients": clients,
                "requests": n_requests,
                "served_tokens": served_tokens,
                "served_wall_s": wall,
                "served_tps": served_tokens / wall,
                "requests_per_s": n_requests / wall,
                "ttft_p50_s": statistics.median(timings.first_token),
                "ttft_p95_s": percentile(timings.first_token, 0.95),
                "latency_p50_s": statistics.median(timings.latency),
                "latency_p95_s": percentile(timings.latency, 0.95),
                "offline_tokens": offline_tokens,
                "offline_wall_s": offline_wall,
                "offline_tps": offline_tokens / offline_wall,
            }
            row["ratio"] = row["served_tps"] / row["offline_tps"]
            row["batcher"] = spent
            rows.append(row)
            print(
                f"{clients:>7} {n_requests:>5} {row['served_tps']:>9.1f} {row['requests_per_s']:>6.2f} "
                f"{row['ttft_p50_s']:>8.2f} {row['ttft_p95_s']:>6.2f} {row['latency_p50_s']:>7.2f} "
                f"{row['latency_p95_s']:>6.2f} {row['offline_tps']:>13.1f} {row['ratio']:>6.2f}",
                flush=True,
            )
            print(
                f"  batcher: {spent['admit_seconds']:.1f} s admitting ({spent['admissions']} admissions, "
                f"{spent['admitted'] / max(1, spent['admissions']):.1f} requests each), {spent['step_seconds']:.1f} s "
                f"in {spent['steps']} decode steps ({spent['step_seconds'] / max(1, spent['steps']):.3f} s each), "
                f"{max(0.0, wall - spent['admit_seconds'] - spent['step_seconds']):.1f} s idle; offline: "
                f"{-(-n_requests // clients)} batches",
                flush=True,
            )
            if served_tokens != offline_tokens:
                print(f"  note: served {served_tokens} tokens, offline {offline_tokens} (EOS at other steps)")
    finally:
        running.stop()
    alone = costs_alone(lm, load_prompts(64))
    print(
        "costs measured alone (no HTTP), per fused source: "
        + ", ".join(f"{key} {value:.3f} s" for key, value in alone.items())
    )
    print(
        "ratio = server tokens/s over offline generate tokens/s with batch_size = clients; times in seconds"
    )
    save(
        args.json,
        {"model": args.model, "new_tokens": args.new_tokens, "machine": machine(), "rows": rows},
    )


if __name__ == "__main__":
    main()
