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
import math
import queue
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

try:  # at module level: FastAPI resolves the handlers' (string) annotations from these globals
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
except ImportError:  # pragma: no cover - the serve extra; create_app says what to install
    FastAPI = Request = HTMLResponse = JSONResponse = PlainTextResponse = StreamingResponse = None

from trimix.config import resolve_generation
from trimix.decoding import FusedLM
from trimix.decoding.batcher import (
    ContinuousBatcher,
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

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class ClientGone(Exception):
    """The HTTP client disconnected while its request was decoding."""


class RequestError(Exception):
    """A bad request: HTTP 400 with OpenAI's error JSON."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _number(
    body: dict, name: str, default: float | None, low: float | None = None, high: float | None = None
) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"`{name}` must be a number; got {value!r}", name)
    if not math.isfinite(value):
        raise RequestError(f"`{name}` must be a finite number; got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"`{name}` must be between {low} and {high}; got {value!r}", name)
    return value


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
        """One ServeRequest per prompt and choice (``n``), validated; raises :class:`RequestError`."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("`messages` must be a non-empty list", "messages")
            for i, m in enumerate(messages):
                if (
                    not isinstance(m, dict)
                    or not isinstance(m.get("content"), str)
                    or m.get("role") not in {"system", "user", "assistant"}
                ):
                    raise RequestError(
                        f"messages[{i}] needs a role (system, user, assistant) and string content", "messages"
                    )
            prompts: list[Any] = [[{"role": m["role"], "content": m["content"]} for m in messages]]
        else:
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(p, str) and p for p in prompts)
            ):
                raise RequestError("`prompt` must be a non-empty string or a list of them", "prompt")
        run = self.lm.generation  # the run's settings: what a request leaves out
        default_max = self.default_max_tokens or min(run.max_new_tokens, self.max_tokens_cap)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
        if (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= self.max_tokens_cap
        ):
            raise RequestError(
                f"`max_tokens` must be an integer from 1 to {self.max_tokens_cap}; got {max_tokens!r}",
                "max_tokens",
            )
        temperature = _number(body, "temperature", None, 0.0, 2.0)
        top_p = _number(body, "top_p", None, 0.0, 1.0)
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise RequestError(f"`n` must be an integer from 1 to 16; got {n!r}", "n")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"`seed` must be an integer; got {seed!r}", "seed")
        stop = body.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
                raise RequestError("`stop` must be a non-empty string or a list of up to 8 of them", "stop")
        logprobs = self._logprobs(body, chat)
        fusion, inspect = self._fusion(body.get("trimix"))
        fields: dict[str, Any] = {"max_new_tokens": max_tokens, "stop": stop}
        if temperature is not None:  # 0: greedy; otherwise sampling at that temperature
            fields["do_sample"] = temperature > 0
            if temperature > 0:
                fields["temperature"] = temperature
        elif top_p is not None:
            fields["do_sample"] = True
        if top_p is not None and top_p > 0:
            fields["top_p"] = top_p
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
                ServeRequest(prompt, generation, fusion, logprobs, inspect, request_key(seed, index), length)
                for index in range(n)
            ]
        return requests

    def _logprobs(self, body: dict, chat: bool) -> int | None:
        if chat:
            if not body.get("logprobs"):
                return None
            top = body.get("top_logprobs", 0) or 0
        else:
            top = body.get("logprobs")
            if top is None:
                return None
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise RequestError(
                f"top log-probabilities must be an integer from 0 to 20; got {top!r}",
                "top_logprobs" if chat else "logprobs",
            )
        return top

    def _fusion(self, extension: Any) -> tuple[Fusion, int]:
        """The request's fusion: the run's, or the ``trimix`` extension's weights and plausibility."""
        if extension is None:
            return self.lm.fusion, 0
        if not isinstance(extension, dict):
            raise RequestError("`trimix` must be an object: {weights, plausibility, inspect}", "trimix")
        unknown = sorted(set(extension) - {"weights", "plausibility", "inspect", "method"})
        if unknown:
            raise RequestError(
                f"unknown `trimix` field(s) {unknown}; use weights, plausibility, method, inspect", "trimix"
            )
        lm = self.lm
        weights = extension.get("weights")
        method = extension.get("method")
        if method is not None:
            if not isinstance(method, str) or method not in METHODS:
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
            if not isinstance(weights, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in weights.values()
            ):
                raise RequestError("`trimix.weights` must map roles to numbers", "trimix.weights")
            unknown_roles = sorted(set(weights) - set(lm.pool.roles))
            if unknown_roles:
                raise RequestError(
                    f"`trimix.weights` names unknown role(s) {unknown_roles}; roles: {lm.pool.roles}",
                    "trimix.weights",
                )
            try:
                lm = lm.with_weights(method=extension.get("method"), **weights)
            except TrimixError as exc:
                raise RequestError(str(exc), "trimix.weights") from exc
        fusion = lm.fusion
        if "plausibility" in extension:
            plaus = extension["plausibility"]
            if plaus is None:
                fusion = Fusion(fusion.weights, fusion.method, None, fusion.options)
            else:
                if not isinstance(plaus, dict) or plaus.get("role") not in lm.pool.roles:
                    raise RequestError(
                        f"`trimix.plausibility.role` must be one of {lm.pool.roles}", "trimix.plausibility"
                    )
                try:
                    fusion = Fusion(
                        fusion.weights,
                        fusion.method,
                        Plausibility(plaus["role"], float(plaus.get("alpha", 0.1))),
                        fusion.options,
                    )
                except (ValueError, TypeError) as exc:
                    raise RequestError(str(exc), "trimix.plausibility") from exc
        missing = [r for r in fusion.roles if r not in lm.pool.sources]
        if missing:
            raise RequestError(f"source(s) {missing} are not loaded on this server", "trimix.weights")
        inspect = extension.get("inspect", 0)
        if isinstance(inspect, bool) or not isinstance(inspect, int) or not 0 <= inspect <= 20:
            raise RequestError("`trimix.inspect` must be an integer from 0 to 20", "trimix.inspect")
        return fusion, inspect

    # ---------------------------------------------------------------- events -> responses
    async def events(
        self, handles: list[RequestHandle], is_disconnected
    ) -> AsyncIterator[tuple[int, TokenEvent | Exception]]:
        """Each handle's events as they arrive, as ``(index, event)``, until every handle has finished (an
        exception ends its handle); raises :class:`ClientGone` when the client disconnects."""
        done = [False] * len(handles)
        while not all(done):
            progressed = False
            for i, handle in enumerate(handles):
                while not done[i]:
                    try:
                        event = handle.events.get_nowait()
                    except queue.Empty:
                        break
                    progressed = True
                    done[i] = isinstance(event, Exception) or event.finish_reason is not None
                    yield i, event
            if not progressed:
                if await is_disconnected():
                    raise ClientGone
                await asyncio.sleep(0.005)

    async def collect(self, handles: list[RequestHandle], is_disconnected) -> list[list[TokenEvent]]:
        """Wait for every handle's events (cancelling all if the client goes away)."""
        results: list[list[TokenEvent]] = [[] for _ in handles]
        try:
            async for i, event in self.events(handles, is_disconnected):
                if isinstance(event, Exception):
                    raise event
                results[i].append(event)
        except ClientGone:
            for handle in handles:
                handle.cancel()
        return results

    async def stream(self, handles: list[RequestHandle], chat: bool, is_disconnected) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, one chunk per token, then ``[DONE]``."""
        ident, created = self._ident(chat), int(time.time())
        if chat:
            for i in range(len(handles)):
                yield self._sse(
                    self._chunk(ident, created, chat, i, {"role": "assistant", "content": ""}, None)
                )
        try:
            async for i, event in self.events(handles, is_disconnected):
                if isinstance(event, Exception):
                    yield self._sse(error_body(str(event), kind="server_error"))
                else:
                    yield self._sse(self._event_chunk(ident, created, chat, i, event))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            for handle in handles:  # a client that went away: free its rows
                handle.cancel()

    def response(
        self, handles: list[RequestHandle], results: list[list[TokenEvent]], chat: bool
    ) -> dict[str, Any]:
        choices = []
        completion_tokens = 0
        for i, events in enumerate(results):
            text = "".join(e.text for e in events)
            finish = events[-1].finish_reason if events else "length"
            completion_tokens += len(events)
            choice: dict[str, Any] = {"index": i, "finish_reason": _finish(finish)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if handles[i].request.logprobs is not None:
                    choice["logprobs"] = {"content": [self._chat_logprob(e) for e in events]}
            else:
                choice["text"] = text
                if handles[i].request.logprobs is not None:
                    choice["logprobs"] = {
                        "tokens": [self.lm.token_text(e.token_id) for e in events],
                        "token_logprobs": [e.logprob for e in events],
                        "top_logprobs": [dict(e.top_logprobs or []) for e in events],
                        "text_offset": _offsets(events),
                    }
            if handles[i].request.inspect:
                choice["trimix"] = {"tokens": [_inspection(e, self.lm) for e in events]}
            choices.append(choice)
        prompt_tokens = sum(
            {id(h.request.prompt): h.prompt_tokens for h in handles}.values()
        )  # once per prompt
        return {
            "id": self._ident(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
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
        stats = self.batcher.stats
        lines = [
            "# HELP trimix_requests_total Requests submitted.",
            "# TYPE trimix_requests_total counter",
            f"trimix_requests_total {stats['requests']}",
            "# HELP trimix_requests_finished_total Requests finished.",
            "# TYPE trimix_requests_finished_total counter",
            f"trimix_requests_finished_total {stats['finished']}",
            "# HELP trimix_requests_cancelled_total Requests cancelled (client gone).",
            "# TYPE trimix_requests_cancelled_total counter",
            f"trimix_requests_cancelled_total {stats['cancelled']}",
            "# HELP trimix_tokens_generated_total Tokens generated.",
            "# TYPE trimix_tokens_generated_total counter",
            f"trimix_tokens_generated_total {stats['tokens']}",
            "# HELP trimix_tokens_per_second Tokens generated per second over the last 10 s.",
            "# TYPE trimix_tokens_per_second gauge",
            f"trimix_tokens_per_second {self.batcher.tokens_per_second():.3f}",
            "# HELP trimix_admit_seconds_total Time spent prefilling arrivals and inserting them into the batch.",
            "# TYPE trimix_admit_seconds_total counter",
            f"trimix_admit_seconds_total {self.batcher.timing['admit_seconds']:.3f}",
            "# HELP trimix_step_seconds_total Time spent in decode steps.",
            "# TYPE trimix_step_seconds_total counter",
            f"trimix_step_seconds_total {self.batcher.timing['step_seconds']:.3f}",
            "# HELP trimix_queue_depth Requests waiting to join the batch.",
            "# TYPE trimix_queue_depth gauge",
            f"trimix_queue_depth {self.batcher.queued}",
            "# HELP trimix_running_batch_size Rows decoding now.",
            "# TYPE trimix_running_batch_size gauge",
            f"trimix_running_batch_size {self.batcher.running}",
        ]
        return "\n".join(lines) + "\n"


def _written_weights(lm: FusedLM) -> dict[str, float]:
    """The run's weights as a user would write them, for a method that needs weights it does not set."""
    return {role: weight for role, weight in lm.fusion.weights.items() if weight != 0.0}


def _finish(reason: str | None) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(
        reason or "length", "length"
    )


def _offsets(events: list[TokenEvent]) -> list[int]:
    offsets, total = [], 0
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
        try:
            return json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from exc

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def _busy(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(error_body(str(exc), kind="rate_limit_error"), status_code=429)

    async def _complete(request: Request, chat: bool):
        body = await _body(request)
        requests = server.parse(body, chat)
        handles = [server.batcher.submit(r) for r in requests]
        if isinstance(body, dict) and body.get("stream"):
            return StreamingResponse(
                server.stream(handles, chat, request.is_disconnected), media_type="text/event-stream"
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
