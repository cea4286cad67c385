"""The OpenAI / vLLM request bodies ``trimix serve`` accepts, as pydantic models.

Field names follow OpenAI's API (``/v1/completions``, ``/v1/chat/completions``) and vLLM's
(``/tokenize``, ``/detokenize``). Types are strict (``"5"`` is not a number, ``true`` not an integer),
numbers must be finite (a JSON ``NaN`` is refused), and every string must be valid Unicode text (a lone
surrogate such as ``"\\ud800"`` is refused). Fields a client sends that trimix does not use are ignored,
as OpenAI-compatible servers do; the ``trimix`` extension object is checked strictly.

A :class:`pydantic.ValidationError` becomes OpenAI's error body through :func:`validation_message`:
HTTP 400, ``invalid_request_error``, ``param`` naming the field (``messages[0].content``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trimix.errors import TrimixError
from trimix.fusion import Fusion
from trimix.fusion import Plausibility as FusionPlausibility
from trimix.fusion.methods import METHODS

if TYPE_CHECKING:
    from trimix.decoding import FusedLM

MAX_STOP_STRINGS = 8
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI: 20)
MAX_COMPLETION_LOGPROBS = 5  # the completions API's logprobs (OpenAI: 5)

NonNegative = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegative], Field(min_length=1)]


def _valid_text(value: Any) -> Any:
    """Refuse strings that are not valid Unicode text (lone surrogates), anywhere in ``value``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start : exc.end].encode("unicode_escape").decode("ascii")
            raise ValueError(
                f"must be Unicode text; it contains {bad}, a lone surrogate (JSON escapes must pair high "
                "and low surrogates)"
            ) from None
    elif isinstance(value, list):
        for item in value:
            _valid_text(item)
    return value


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class Plausibility(_Body):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    role: str
    alpha: float = Field(0.1, gt=0.0, le=1.0)


class TrimixExtension(_Body):
    """The ``trimix`` field: this request's fusion over the server's loaded sources.

    ``weights``: role -> weight, read as ``--weights`` is (a method derives what it sets itself);
    ``method``: a registered fusion method (with or without weights: alone, the weights it sets, else
    the run's); ``plausibility``: ``{role, alpha}``, or ``null`` to decode without the constraint;
    ``inspect``: attach each source's top-k candidates and the margin shares to every token.
    """

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    weights: dict[str, float] | None = None
    method: str | None = None
    plausibility: Plausibility | None = None
    inspect: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What both completion endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: (
        str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    trimix: TrimixExtension | None = None

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, value: Any) -> Any:
        if value == "":
            raise ValueError("must not be empty")
        return _valid_text(value)

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class CompletionRequest(_Generation):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, a list of token ids, or a list of
    such lists (ids of the fused vocabulary, read by every source as they are). ``echo``: the prompt comes
    back before the completion, and with ``logprobs`` its tokens' log-probabilities under the fused
    model (the first ``null``), as OpenAI and vLLM return them; ``max_tokens: 0`` then scores only."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def ids(v: Any) -> bool:
            return (
                isinstance(v, list)
                and bool(v)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            )

        ok = isinstance(value, str) or (
            isinstance(value, list)
            and bool(value)
            and (all(isinstance(v, str) for v in value) or ids(value) or all(ids(v) for v in value))
        )
        if not ok:
            raise ValueError(
                "must be a non-empty string, a list of strings, a list of token ids, or a list of such lists"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
        if any(not t.strip() for t in texts):
            raise ValueError("must not be empty or blank")
        return _valid_text(value)

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "`max_tokens` 0 generates nothing; it is allowed only with `echo` (scoring the prompt)"
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_text(cls, value: str) -> str:
        return _valid_text(value)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is OpenAI's newer name of ``max_tokens``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _at_least_one_token(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise ValueError("`max_tokens` must be at least 1 for a chat completion")
        return self


class TokenizeRequest(_Body):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered as the first source renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: Any) -> Any:
        return _valid_text(value)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("`prompt` or `messages`: give one of them, not both or neither")
        return self


class DetokenizeRequest(_Body):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[NonNegative]


def validated(model: type[BaseModel], body: Any) -> Any:
    """``body`` read as ``model``, or a :class:`RequestError` naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestError(*validation_message(exc)) from None


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """OpenAI's error message and ``param`` for the first problem of a request body."""
    error = exc.errors(include_url=False)[0]
    param = _param(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"`{param}` is required", param
    if error["type"] == "extra_forbidden":
        return f"unknown field `{param}`", param
    if message.startswith("`"):  # a rule about several fields, worded in full
        return message, param
    message = message.replace("Input should be", "must be").replace("Input should have", "must have")
    message = message.replace("must be a valid ", "must be a ").replace(
        "must be a integer", "must be an integer"
    )
    value = error.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return (f"`{param}` {message}; got {shown}" if param else f"{message}; got {shown}"), param


def _param(loc: tuple) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {"str", "list[str]", "list[int]", "list[list[int]]"} or "[" in str(item):
            continue  # the union member pydantic tried, not a field
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


class RequestError(Exception):
    """A bad request: HTTP 400 (or ``status``) with OpenAI's error JSON."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def request_fusion(lm: FusedLM, extension: TrimixExtension | None) -> tuple[Fusion, int]:
    """The request's fusion: the run's, or the ``trimix`` extension's method, weights and plausibility."""
    if extension is None:
        return lm.fusion, 0
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
                fusion.weights, fusion.method, FusionPlausibility(plaus.role, plaus.alpha), fusion.options
            )
    missing = [r for r in fusion.roles if r not in lm.pool.sources]
    if missing:
        raise RequestError(f"source(s) {missing} are not loaded on this server", "trimix.weights")
    return fusion, extension.inspect


def _written_weights(lm: FusedLM) -> dict[str, float]:
    """The run's weights as a user would write them, for a method that needs weights it does not set."""
    return {role: weight for role, weight in lm.fusion.weights.items() if weight != 0.0}
