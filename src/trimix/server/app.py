"""``trimix serve``: an OpenAI-compatible HTTP server over a fused model (FastAPI + uvicorn).

The server holds no model logic. A request body is validated by the pydantic models of
:mod:`trimix.server.protocol` (off the event loop, with tokenisation), becomes
:class:`~trimix.decoding.batcher.ServeRequest` objects for the :class:`ContinuousBatcher` (which drives the
decoding core), and its events go back as OpenAI responses or server-sent-event chunks
(:mod:`trimix.server.responses`).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, vLLM's
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, ``GET /health``, ``GET /metrics``
(Prometheus), and the playground at ``/``. The fields each endpoint reads are documented on its request
model; the extension field ``trimix`` changes the fusion of one request without reloading anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
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
    ServeRequest,
    check_prompt,
    request_key,
)
from trimix.errors import ConfigError, TrimixError
from trimix.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    request_fusion,
    validated,
)
from trimix.server.responses import ResponseWriter, error_body

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 1024 * 1024


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
        self.writer = ResponseWriter(lm, model_name)
        self.started = time.time()

    # ---------------------------------------------------------------- request -> ServeRequest
    def parse(self, body: Any, chat: bool) -> list[ServeRequest]:
        """One ServeRequest per prompt and choice (``n``), validated; raises :class:`RequestError`.

        Runs off the event loop (it tokenises every prompt to check it fits the sources' contexts)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        request = validated(ChatCompletionRequest if chat else CompletionRequest, body)
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
        fusion, inspect = request_fusion(self.lm, request.trimix)
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

    # ---------------------------------------------------------------- tokenizer endpoints
    def tokenize(self, body: Any) -> dict[str, Any]:
        request = validated(TokenizeRequest, body)
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
            "max_model_len": self.context_length,
            "tokens": ids,
            "token_strs": [self.lm.token_text(t) for t in ids],
        }

    def detokenize(self, body: Any) -> dict[str, Any]:
        request = validated(DetokenizeRequest, body)
        self.check_model(request.model)
        self._check_ids([request.tokens], "tokens")
        return {"prompt": self.lm.tokenizer.decode(request.tokens)}

    @property
    def context_length(self) -> int | None:
        """The shortest context among the fused sources (what a prompt must fit), when they state one."""
        return min((s.max_positions or 0) for s in self.lm.sources) or None

    def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.lm.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": self.context_length,
            "vocab_size": self.lm.vocab_size,
        }


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from exc


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
                server.writer.stream(
                    handles, chat, request.is_disconnected, bool(options.get("include_usage"))
                ),
                media_type="text/event-stream",
            )
        results = await server.writer.collect(handles, request.is_disconnected)
        return JSONResponse(server.writer.response(handles, results, chat))

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
        return PlainTextResponse(
            ResponseWriter.metrics(server.batcher), media_type="text/plain; version=0.0.4"
        )

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
