"""OpenAI's response side of ``trimix serve``: the batcher's events as completions, chat completions and
server-sent-event chunks (with ``usage``, log-probabilities, the echoed prompt and trimix's per-token
inspection), and ``/metrics`` through ``prometheus_client``."""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from trimix.decoding import FusedLM
from trimix.decoding.batcher import ContinuousBatcher, PromptEcho, RequestHandle, TokenEvent


class ClientGone(Exception):
    """The HTTP client disconnected while its request was decoding."""


def error_body(
    message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ResponseWriter:
    """Turns a request's events into OpenAI's response bodies for the model served as ``model_name``."""

    def __init__(self, lm: FusedLM, model_name: str) -> None:
        self.lm, self.model_name = lm, model_name

    async def events(
        self, handles: list[RequestHandle], is_disconnected
    ) -> AsyncIterator[tuple[int, TokenEvent | PromptEcho | Exception]]:
        """Each handle's events as they arrive, as ``(index, event)``, until every handle has finished (an
        exception ends its handle); raises :class:`ClientGone` when the client disconnects. The batcher's
        thread wakes this coroutine when it hands over an event (no polling)."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        for handle in handles:
            handle.notify = lambda: loop.call_soon_threadsafe(ready.set)
        done = [False] * len(handles)
        while not all(done):
            ready.clear()
            for i, handle in enumerate(handles):
                while not done[i]:
                    try:
                        event = handle.events.get_nowait()
                    except queue.Empty:
                        break
                    done[i] = isinstance(event, Exception) or (
                        isinstance(event, TokenEvent) and event.finish_reason is not None
                    )
                    yield i, event
            if all(done):
                return
            try:
                await asyncio.wait_for(ready.wait(), timeout=0.5)
            except TimeoutError:
                if await is_disconnected():
                    raise ClientGone from None

    async def collect(
        self, handles: list[RequestHandle], is_disconnected
    ) -> list[tuple[PromptEcho | None, list[TokenEvent]]]:
        """Wait for every handle's events (cancelling all if the client goes away): each handle's echoed
        prompt (or None) and its token events."""
        echoes: list[PromptEcho | None] = [None] * len(handles)
        results: list[list[TokenEvent]] = [[] for _ in handles]
        try:
            async for i, event in self.events(handles, is_disconnected):
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, PromptEcho):
                    echoes[i] = event
                else:  # a token, or the end without one (max_tokens 0)
                    results[i].append(event)
        except ClientGone:
            for handle in handles:
                handle.cancel()
        return list(zip(echoes, results, strict=True))

    async def stream(
        self, handles: list[RequestHandle], chat: bool, is_disconnected, include_usage: bool = False
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, one chunk per token, then (with
        ``stream_options.include_usage``) a chunk with the usage and no choices, then ``[DONE]``."""
        ident, created = self._ident(chat), int(time.time())
        if chat:
            for i in range(len(handles)):
                yield self._sse(
                    self._chunk(ident, created, chat, i, {"role": "assistant", "content": ""}, None)
                )
        completion_tokens = 0
        try:
            async for i, event in self.events(handles, is_disconnected):
                if isinstance(event, Exception):
                    yield self._sse(error_body(str(event), kind="server_error"))
                elif isinstance(event, PromptEcho):
                    chunk = self._chunk(ident, created, chat, i, {}, None)
                    chunk["choices"][0]["text"] = event.text
                    if event.tokens:
                        chunk["choices"][0]["logprobs"] = _echo_logprobs(event)
                    yield self._sse(chunk)
                else:
                    completion_tokens += event.token_id >= 0
                    yield self._sse(self._event_chunk(ident, created, chat, i, event))
            if include_usage:
                usage = self._chunk(ident, created, chat, 0, {}, None)
                usage["choices"] = []
                usage["usage"] = _usage(_prompt_tokens(handles), completion_tokens)
                yield self._sse(usage)
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            for handle in handles:  # a client that went away: free its rows
                handle.cancel()

    def response(
        self,
        handles: list[RequestHandle],
        results: list[tuple[PromptEcho | None, list[TokenEvent]]],
        chat: bool,
    ) -> dict[str, Any]:
        choices = []
        completion_tokens = 0
        for i, (echo, ended) in enumerate(results):
            events = [e for e in ended if e.token_id >= 0]
            text = "".join(e.text for e in events)
            finish = ended[-1].finish_reason if ended else "length"
            completion_tokens += len(events)
            choice: dict[str, Any] = {"index": i, "finish_reason": _finish(finish)}
            request = handles[i].request
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if request.logprobs is not None:
                    choice["logprobs"] = {"content": [self._chat_logprob(e) for e in events]}
            else:
                choice["text"] = (echo.text if echo is not None else "") + text
                if request.logprobs is not None:
                    logprobs = {
                        "tokens": [self.lm.token_text(e.token_id) for e in events],
                        "token_logprobs": [e.logprob for e in events],
                        "top_logprobs": [dict(e.top_logprobs or []) for e in events],
                        "text_offset": _offsets(events, len(echo.text) if echo is not None else 0),
                    }
                    if echo is not None:
                        before = _echo_logprobs(echo)
                        logprobs = {key: before[key] + logprobs[key] for key in logprobs}
                    choice["logprobs"] = logprobs
            if request.inspect:
                choice["trimix"] = {"tokens": [_inspection(e, self.lm) for e in events]}
            choices.append(choice)
        return {
            "id": self._ident(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(_prompt_tokens(handles), completion_tokens),
        }

    def _event_chunk(
        self, ident: str, created: int, chat: bool, index: int, event: TokenEvent
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": event.text} if chat else {}
        chunk = self._chunk(
            ident, created, chat, index, delta, _finish(event.finish_reason) if event.finish_reason else None
        )
        choice = chunk["choices"][0]
        if not chat:
            choice["text"] = event.text
        if event.logprob is not None:
            choice["logprobs"] = (
                {"content": [self._chat_logprob(event)]}
                if chat
                else {
                    "tokens": [self.lm.token_text(event.token_id)],
                    "token_logprobs": [event.logprob],
                    "top_logprobs": [dict(event.top_logprobs or [])],
                }
            )
        if event.inspection is not None:
            choice["trimix"] = _inspection(event, self.lm)
        return chunk

    def _chunk(
        self, ident: str, created: int, chat: bool, index: int, delta: dict, finish: str | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if chat:
            choice["delta"] = delta
        return {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [choice],
        }

    def _chat_logprob(self, event: TokenEvent) -> dict[str, Any]:
        token = self.lm.token_text(event.token_id)
        return {
            "token": token,
            "logprob": event.logprob,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                for t, lp in event.top_logprobs or []
            ],
        }

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    @staticmethod
    def _ident(chat: bool) -> str:
        return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    @staticmethod
    def metrics(batcher: ContinuousBatcher) -> str:
        """Prometheus text for ``/metrics`` (``prometheus_client``; the batcher's counters read at scrape)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, timing = batcher.stats, batcher.timing
        families = [
            CounterMetricFamily("trimix_requests", "Requests submitted.", value=stats["requests"]),
            CounterMetricFamily("trimix_requests_finished", "Requests finished.", value=stats["finished"]),
            CounterMetricFamily(
                "trimix_requests_cancelled", "Requests cancelled (client gone).", value=stats["cancelled"]
            ),
            CounterMetricFamily("trimix_tokens_generated", "Tokens generated.", value=stats["tokens"]),
            GaugeMetricFamily(
                "trimix_tokens_per_second",
                "Tokens generated per second over the last 10 s.",
                value=batcher.tokens_per_second(),
            ),
            CounterMetricFamily(
                "trimix_admit_seconds",
                "Time spent prefilling arrivals and inserting them into the batch.",
                value=timing["admit_seconds"],
            ),
            CounterMetricFamily(
                "trimix_step_seconds", "Time spent in decode steps.", value=timing["step_seconds"]
            ),
            GaugeMetricFamily(
                "trimix_queue_depth", "Requests waiting to join the batch.", value=batcher.queued
            ),
            GaugeMetricFamily("trimix_running_batch_size", "Rows decoding now.", value=batcher.running),
        ]

        class _Now:
            def collect(self):
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Now())
        return generate_latest(registry).decode("utf-8")


def _finish(reason: str | None) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(
        reason or "length", "length"
    )


def _prompt_tokens(handles: list[RequestHandle]) -> int:
    """The prompts' tokens, once per prompt (its ``n`` choices read the same tokens)."""
    return sum({id(h.request.prompt): h.prompt_tokens for h in handles}.values())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _echo_logprobs(echo: PromptEcho) -> dict[str, list]:
    """The echoed prompt's part of a completion's ``logprobs`` (OpenAI's layout: the first token has none)."""
    offsets, total = [], 0
    for token in echo.tokens:
        offsets.append(total)
        total += len(token)
    return {
        "tokens": list(echo.tokens),
        "token_logprobs": list(echo.logprobs),
        "top_logprobs": [None if top is None else dict(top) for top in echo.top_logprobs],
        "text_offset": offsets,
    }


def _offsets(events: list[TokenEvent], start: int = 0) -> list[int]:
    offsets, total = [], start
    for event in events:
        offsets.append(total)
        total += len(event.text)
    return offsets


def _inspection(event: TokenEvent, lm: FusedLM) -> dict[str, Any]:
    info = event.inspection
    return {
        "token": info.token,
        "source": info.leader,
        "contributions": info.contributions,
        "fused_prob": info.fused_prob,
        "candidates": {role: [[t, p] for t, p in cand.top] for role, cand in info.sources.items()},
        "fused_top": [[t, p] for t, p in info.fused_top],
    }
