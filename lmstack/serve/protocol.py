"""The OpenAI wire protocol at the HTTP edge: request models, validation, and errors in OpenAI's shape.

Requests are validated once, here, in pydantic's strict JSON mode: a string where a number belongs is a 400
(OpenAI does the same) instead of a silent coercion, and unknown fields are ignored as OpenAI ignores them.
Past this module everything is plain Python: `SamplingParams`, lists of token ids, dicts.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmstack.generate.sampling import SamplingParams
from lmstack.generate.structured import JSON_OBJECT, compile_json_schema


class APIError(Exception):
    """Any refusal, raised anywhere in serve/ and answered as `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_supported(param: str, what: str) -> APIError:
    return APIError(
        400, f"{what} is not supported yet by this server.", param=param, code="unsupported_value"
    )


# --- requests -----------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def check(self) -> None:
        """Cross-field rules pydantic's per-field constraints cannot say; APIError when broken."""


class StreamOptions(_Request):
    include_usage: bool | None = None


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(_Request):
    type: str  # any string, so an unknown type gets our message naming the supported ones
    json_schema: JsonSchemaFormat | None = None

    def schema_text(self) -> str | None:
        """The JSON Schema (as text) the output must match, or None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return JSON_OBJECT
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                param = "response_format.json_schema" + (".schema" if self.json_schema else "")
                raise APIError(
                    400,
                    f"Missing required parameter: '{param}'.",
                    param=param,
                    code="missing_required_parameter",
                )
            return json.dumps(self.json_schema.schema_)
        raise APIError(
            400,
            f"Invalid value: {self.type!r}. Supported values are: 'text', 'json_object', and 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_template(self, index: int) -> dict[str, Any]:
        """The dict a chat template reads: text parts joined; `developer` is the newer name of `system`."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(
                    400,
                    f"messages[{index}].content: only text content parts are supported by this server",
                    param=f"messages[{index}].content",
                    code="unsupported_value",
                )
            content = "".join(part.text or "" for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class _Sampling(_Request):
    """Knobs both generation endpoints share; the extras past OpenAI's are vLLM's names for the same."""

    model: str
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-compatible extras (send them with the openai client's extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None  # OpenAI's on chat; accepted on completions too, as vLLM

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )  # fmt: skip
        if self.logit_bias:
            raise not_supported("logit_bias", "logit_bias")
        schema = self.json_schema
        if schema is None:
            return
        if self.ignore_eos:
            message = (
                "'ignore_eos' cannot go with a JSON response_format: the output ends where the JSON does."
            )
            raise APIError(400, message, param="ignore_eos")
        try:
            compile_json_schema(schema)
        except ValueError as error:
            param = "response_format.json_schema.schema"
            raise APIError(400, str(error), param=param, code="invalid_value") from None

    @property
    def json_schema(self) -> str | None:
        return None if self.response_format is None else self.response_format.schema_text()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """One choice's parameters; choice i of n draws with seed + i so seeded choices still differ."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=top_k,
                min_p=self.min_p or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                seed=seed,
                stop=stop,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=bool(self.ignore_eos),
                logprobs=logprobs,
                json_schema=self.json_schema,
            )
        except ValueError as error:  # e.g. an empty stop string
            raise APIError(400, str(error)) from error


_Scalar = str | int | float | bool


class RagOptions(_Request):
    """lmstack's retrieval knobs (the openai client sends them in extra_body)."""

    k: int = Field(5, ge=1, le=50)
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"
    where: dict[str, _Scalar | list[_Scalar]] | None = None
    mmr: float | None = Field(None, ge=0, le=1)
    min_score: float = Field(0.40, ge=-1, le=1)
    small_to_big: bool = False
    rerank: bool = False  # the served model judges the top 10 candidates' relevance
    rewrite: bool = False  # the served model also writes a search query
    sentences: int = Field(0, ge=0, le=80)  # rescore the first N candidates by their best sentence


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # lmstack extension: answer from a collection (the last user message is the question), citing sources
    collection: str | None = None
    rag: RagOptions | None = None

    def check(self) -> None:
        self.check_common()
        if self.rag is not None:
            if self.collection is None:
                raise APIError(400, "'rag' options need a 'collection' to search.", param="rag")
        if self.collection is not None and self.messages[-1].role != "user":
            raise APIError(
                400, "With 'collection', the last message must be the user's question.", param="messages"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400,
                "Invalid value for 'top_logprobs': logprobs must be set to true if top_logprobs is used.",
                param="top_logprobs",
            )  # fmt: skip
        if self.tools:
            raise not_supported("tools", "Tool calling")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy endpoint's default, as OpenAI's
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise APIError(400, "Invalid 'prompt': empty prompts are not allowed.", param="prompt")
        if self.suffix:
            raise not_supported("suffix", "suffix (insertion)")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise not_supported("best_of", "best_of other than n")
        if self.echo and self.logprobs is not None:
            raise not_supported("echo", "echo together with logprobs (prompt logprobs)")


class RagQueryRequest(RagOptions):
    """POST /v1/rag/query: retrieve from `collection`, answer `query` with `model`, cite the sources."""

    collection: str
    query: str = Field(min_length=1)
    model: str | None = None  # default: the first served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool | None = None
    retrieve_only: bool = False  # sources only, no answer

    def check(self) -> None:
        super().check()
        if not self.query.strip():
            raise APIError(400, "The query is empty; ask a question.", param="query")


class RagIngestRequest(_Request):
    """POST /v1/rag/ingest: add files under the server's allowed folders to a collection."""

    collection: str
    paths: list[str] = Field(min_length=1)
    include: list[str] | None = None
    exclude: list[str] | None = None
    metadata: dict[str, _Scalar] | None = None


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise APIError(400, "Invalid 'input': expected a non-empty string or array.", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise not_supported("input", "Token-id input for embeddings")
        if any(not t for t in texts):  # type: ignore[union-attr]
            raise APIError(400, "Invalid 'input': empty strings cannot be embedded.", param="input")
        return texts  # type: ignore[return-value]


# --- validation -> OpenAI errors ----------------------------------------------------------------------------
R = TypeVar("R", bound=_Request)

_TYPE_NAMES = {
    "float_type": "a number",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "literal_error": "one of the allowed values",
}
_BOUNDS = {
    "greater_than_equal": ("below minimum value", ">=", "ge"),
    "greater_than": ("below minimum value", ">", "gt"),
    "less_than_equal": ("above maximum value", "<=", "le"),
    "less_than": ("above maximum value", "<", "lt"),
}


def parse_request(cls: type[R], body: bytes) -> R:
    try:
        request = cls.model_validate_json(body, strict=True)
    except ValidationError as error:
        raise _api_error(error.errors(include_url=False)) from None
    request.check()
    return request


def _api_error(errors: list[Any]) -> APIError:
    first = errors[0]
    kind, loc, value = first["type"], first["loc"], first.get("input")
    if kind == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request. (HINT: the body must be valid JSON, sent with "
            f"'Content-Type: application/json'.) Parser: {first['msg']}",
        )
    if not loc:
        return APIError(400, "The request body must be a JSON object.", code="invalid_type")
    param = _param(loc)
    if kind == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind == "too_short" and value == []:
        return APIError(
            400,
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param=param,
            code="empty_array",
        )
    if kind in _BOUNDS:
        what, op, key = _BOUNDS[kind]
        limit = first["ctx"][key]
        return APIError(
            400,
            f"Invalid '{param}': {what}. Expected a value {op} {limit}, but got {value!r} instead.",
            param=param,
            code="invalid_value",
        )
    if len({_param(e["loc"]) for e in errors}) == 1 and len(errors) > 1:  # a union: no member matched
        return APIError(
            400, f"Invalid type for '{param}': got {_json_type(value)}.", param=param, code="invalid_type"
        )
    expected = _TYPE_NAMES.get(kind)
    if expected is not None:
        return APIError(
            400,
            f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
            param=param,
            code="invalid_type",
        )
    return APIError(400, f"Invalid '{param}': {first['msg']}.", param=param, code="invalid_value")


def _param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union-member tags ('str', 'list[int]') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            if part[0].isupper():  # a model's name in a union tag
                continue
            out += f".{part}" if out else part
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
