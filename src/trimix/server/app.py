"""``trimix serve``: an OpenAI-compatible HTTP server over a fused model (FastAPI + uvicorn).

The server holds no model logic: it validates requests, turns them into
:class:`~trimix.decoding.batcher.ServeRequest` objects for the :class:`ContinuousBatcher`, and turns
token events back into OpenAI responses (or server-sent-event chunks ending with ``[DONE]``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text), and the playground at ``/``.

Fields honoured: ``max_tokens`` (default and cap configurable), ``temperature`` (0 or absent: greedy),
``top_p``, ``seed``, ``stop``, ``stream``, ``n``, ``logprobs`` / ``top_logprobs`` (of the fused
distribution after the plausibility mask, before temperature), ``usage``. Unknown fields are
ignored, as OpenAI-compatible servers do. The extension field ``trimix`` changes the fusion of one
request without reloading anything: ``{"weights": {"large": 0.3, "small_cpt": 0.9}, "plausibility":
{"role": "small_cpt", "alpha": 0.1} | null, "inspect": K}`` (weights are read as ``--weights`` is; all
sources of the run are loaded at start). Requests with the run's own set of fused sources share one
batch, each row with its own weights; a request that fuses another set decodes in a batch of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

try:  # at module level: FastAPI resolves the handlers' (string) annotations from these globals
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
except ImportError:  # pragma: no cover - the serve extra; create_app says what to install
    FastAPI = Request = HTMLResponse = JSONResponse = PlainTextResponse = StreamingResponse = None

from trimix.config import resolve_generation
from trimix.decoding import FusedLM
from trimix.decoding.batcher import (
    ContinuousBatcher,
    PromptEcho,
    QueueFull,
    RequestHandle,
    ServeRequest,
    TokenEvent,
    check_prompt,
    request_key,
)
from trimix.errors import ConfigError, TrimixError
from trimix.fusion import Fusion, Plausibility
from trimix.fusion.methods import METHODS
from trimix.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    TrimixExtension,
    validation_message,
)

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 1024 * 1024


class ClientGone(Exception):
    """The HTTP client disconnected while its request was decoding."""


class RequestError(Exception):
    """A bad request: HTTP 400 (or ``status``) with OpenAI's error JSON."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(
    message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Server:
    """Request translation between OpenAI's API and the batcher (the FastAPI app is built by :func:`create_app`).

    Args:
        lm: the fused model; every source of its pool is loadable by a request's weights.
        model_name: the id reported by ``/v1/models`` and in responses.
        default_max_tokens: used when a request gives no ``max_tokens`` (None: the run's
            ``generation.max_new_tokens``). Every setting a request leaves out comes from the run's
            ``generation`` section (``FusedLM.generation``: end-of-sequence ids, stops, sampling).
        max_tokens_cap: the largest ``max_tokens`` accepted.
        batcher: the continuous batcher (created from ``lm`` when omitted).
    """

    def __init__(
        self,
        lm: FusedLM,
        model_name: str = "trimix",
        default_max_tokens: int | None = None,
        max_tokens_cap: int = 2048,
        batcher: ContinuousBatcher | None = None,
    ) -> None:
        self.lm = lm
        self.model_name = model_name
        self.default_max_tokens, self.max_tokens_cap = default_max_tokens, max_tokens_cap
        self.batcher = batcher or ContinuousBatcher(lm)
        self.started = time.time()

    # ---------------------------------------------------------------- request -> ServeRequest
    def parse(self, body: Any, chat: bool) -> list[ServeRequest]:
        """One ServeRequest per prompt and choice (``n``), validated; raises :class:`RequestError`.

        Runs off the event loop (it tokenises every prompt to check it fits the sources' contexts)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        try:
            request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as exc:
            raise RequestError(*validation_message(exc)) from None
        self.check_model(request.model)
        if chat:
            prompts: list[Any] = [[m.model_dump() for m in request.messages]]
            asked = (
                request.max_completion_tokens
                if request.max_completion_tokens is not None
                else request.max_tokens
            )
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
            echo = False
        else:
            prompts = request.prompts
            asked, logprobs, echo = request.max_tokens, request.logprobs, request.echo
            self._check_ids(prompts)
        run = self.lm.generation  # the run's settings: what a request leaves out
        max_tokens = (
            asked
            if asked is not None
            else (self.default_max_tokens or min(run.max_new_tokens, self.max_tokens_cap))
        )
        if max_tokens > self.max_tokens_cap:
            param = (
                "max_completion_tokens"
                if chat and request.max_completion_tokens is not None
                else "max_tokens"
            )
            raise RequestError(f"`{param}` must be at most {self.max_tokens_cap}; got {max_tokens}", param)
        fusion, inspect = self._fusion(request.trimix)
        fields: dict[str, Any] = {"max_new_tokens": max(max_tokens, 1), "stop": request.stops}
        if request.temperature is not None:  # 0: greedy; otherwise sampling at that temperature
            fields["do_sample"] = request.temperature > 0
            if request.temperature > 0:
                fields["temperature"] = request.temperature
        elif request.top_p is not None:
            fields["do_sample"] = True
        if request.top_p is not None and request.top_p > 0:
            fields["top_p"] = request.top_p
        try:
            generation = resolve_generation(run, fields, origin="request field")
        except ConfigError as exc:
            raise RequestError(str(exc)) from exc
        requests = []
        for prompt in prompts:
            try:  # once per prompt: its n completions read the same tokens
                length = check_prompt(self.batcher, ServeRequest(prompt, generation, fusion))
            except TrimixError as exc:
                raise RequestError(str(exc), "messages" if chat else "prompt") from exc
            requests += [
                ServeRequest(
                    prompt,
                    generation,
                    fusion,
                    logprobs,
                    inspect,
                    request_key(request.seed, index),
                    length,
                    echo=echo,
                    max_tokens=max_tokens,
                )
                for index in range(request.n)
            ]
        return requests

    def check_model(self, name: str | None) -> None:
        """A request naming another model than the one served is a 404 (``model_not_found``), as with
        OpenAI and vLLM; a request that names none gets the served model."""
        if name is not None and name != self.model_name:
            raise RequestError(
                f"the model `{name}` does not exist; this server serves `{self.model_name}` (GET /v1/models)",
                "model",
                status=404,
                code="model_not_found",
            )

    def _check_ids(self, prompts: list[Any], field: str = "prompt") -> None:
        vocab = self.lm.vocab_size
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                bad = [t for t in prompt if t >= vocab]
                if bad:
                    where = field if len(prompts) == 1 else f"{field}[{i}]"
                    raise RequestError(
                        f"`{where}` holds token id(s) {bad[:5]} beyond the fused vocabulary of {vocab} tokens",
                        field,
                    )

    def _fusion(self, extension: TrimixExtension | None) -> tuple[Fusion, int]:
        """The request's fusion: the run's, or the ``trimix`` extension's method, weights and plausibility."""
        if extension is None:
            return self.lm.fusion, 0
        lm = self.lm
        weights, method = extension.weights, extension.method
        if method is not None:
            if method not in METHODS:
                raise RequestError(
                    f"unknown `trimix.method` {method!r}; one of {', '.join(METHODS)}", "trimix.method"
                )
            if weights is None:  # the method alone: the weights it sets itself, else the run's weights
                try:
                    lm = lm.with_weights(method=method)
                except TrimixError:
                    try:
                        lm = lm.with_weights(method=method, **_written_weights(lm))
                    except TrimixError as exc:
                        raise RequestError(str(exc), "trimix.method") from exc
        if weights is not None:
            unknown_roles = sorted(set(weights) - set(lm.pool.roles))
            if unknown_roles:
                raise RequestError(
                    f"`trimix.weights` names unknown role(s) {unknown_roles}; roles: {lm.pool.roles}",
                    "trimix.weights",
                )
            try:
                lm = lm.with_weights(method=method, **weights)
            except TrimixError as exc:
                raise RequestError(str(exc), "trimix.weights") from exc
        fusion = lm.fusion
        if "plausibility" in extension.model_fields_set:
            plaus = extension.plausibility
            if plaus is None:
                fusion = Fusion(fusion.weights, fusion.method, None, fusion.options)
            else:
                if plaus.role not in lm.pool.roles:
                    raise RequestError(
                        f"`trimix.plausibility.role` must be one of {lm.pool.roles}; got {plaus.role!r}",
                        "trimix.plausibility.role",
                    )
                fusion = Fusion(
                    fusion.weights, fusion.method, Plausibility(plaus.role, plaus.alpha), fusion.options
                )
        missing = [r for r in fusion.roles if r not in lm.pool.sources]
        if missing:
            raise RequestError(f"source(s) {missing} are not loaded on this server", "trimix.weights")
        return fusion, extension.inspect

    # ---------------------------------------------------------------- tokenizer endpoints
    def tokenize(self, body: Any) -> dict[str, Any]:
        try:
            request = TokenizeRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestError(*validation_message(exc)) from None
        self.check_model(request.model)
        source, tokenizer = self.lm.sources[0], self.lm.tokenizer
        if request.messages is not None:
            messages = [m.model_dump() for m in request.messages]
            text = self.lm.render(messages)[source.role]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        return {
            "count": len(ids),
            "max_model_len": min((s.max_positions or 0) for s in self.lm.sources) or None,
            "tokens": ids,
            "token_strs": [self.lm.token_text(t) for t in ids],
        }

    def detokenize(self, body: Any) -> dict[str, Any]:
        try:
            request = DetokenizeRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestError(*validation_message(exc)) from None
        self.check_model(request.model)
        self._check_ids([request.tokens], "tokens")
        return {"prompt": self.lm.tokenizer.decode(request.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.lm.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": min((s.max_positions or 0) for s in self.lm.sources) or None,
            "vocab_size": self.lm.vocab_size,
        }

    # ---------------------------------------------------------------- events -> responses
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

    def metrics(self) -> str:
        """Prometheus text for ``/metrics`` (``prometheus_client``; the batcher's counters read at scrape)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        batcher = self.batcher
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


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from exc


def _written_weights(lm: FusedLM) -> dict[str, float]:
    """The run's weights as a user would write them, for a method that needs weights it does not set."""
    return {role: weight for role, weight in lm.fusion.weights.items() if weight != 0.0}


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


def create_app(server: Server):
    """The FastAPI application around a :class:`Server`."""
    if FastAPI is None:  # pragma: no cover - the serve extra
        raise ImportError("trimix serve needs FastAPI and uvicorn: pip install 'trimix[serve]'")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.stop()

    app = FastAPI(
        title="trimix", description="OpenAI-compatible server for fused language models", lifespan=lifespan
    )

    async def _body(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(
                f"the request body has {len(raw):,} bytes; this server reads at most {MAX_BODY_BYTES:,}",
                status=413,
            )
        return await asyncio.to_thread(_json, raw)

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.param, code=exc.code), status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def _busy(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(error_body(str(exc), kind="rate_limit_error"), status_code=429)

    async def _complete(request: Request, chat: bool):
        body = await _body(request)
        # Validation tokenises every prompt: off the event loop, so a large request never delays others.
        requests = await asyncio.to_thread(server.parse, body, chat)
        handles = [server.batcher.submit(r) for r in requests]
        if body.get("stream"):
            options = body.get("stream_options") or {}
            return StreamingResponse(
                server.stream(handles, chat, request.is_disconnected, bool(options.get("include_usage"))),
                media_type="text/event-stream",
            )
        results = await server.collect(handles, request.is_disconnected)
        return JSONResponse(server.response(handles, results, chat))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": int(server.started),
                    "owned_by": "trimix",
                }
            ],
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        """vLLM's: the fused vocabulary's token ids of a prompt (or of chat messages as the first fused
        source renders them)."""
        body = await _body(request)
        return await asyncio.to_thread(server.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _body(request)
        return await asyncio.to_thread(server.detokenize, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's special tokens and chat template (lm-eval's remote tokenizer reads it)."""
        return server.tokenizer_info()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": server.batcher.running, "waiting": server.batcher.queued}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/trimix/sources")
    async def sources() -> dict[str, Any]:
        """What the playground needs: the roles, the run's weights, and the plausibility rule."""
        fusion = server.lm.fusion
        return {
            "roles": server.lm.pool.roles,
            "weights": {r: fusion.weight(r) for r in server.lm.pool.roles},
            "method": fusion.method,
            "plausibility": None
            if fusion.plausibility is None
            else {"role": fusion.plausibility.role, "alpha": fusion.plausibility.alpha},
        }

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return (STATIC / "index.html").read_text(encoding="utf-8")

    return app
