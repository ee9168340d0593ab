"""The OpenAI-compatible HTTP app: `create_app(models, settings)`.

A generation request goes: key -> body (size-capped) -> protocol (validated once) -> model -> prompt ids
(chat template) -> context check -> rate limit -> n engine requests (`Choices`) -> JSON or SSE. Refusals
before the first token are HTTP errors in OpenAI's shape; after it (streams) they are an `error` event.
A client that disconnects, or a request past its deadline, aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from lmstack.engine import AsyncEngine, LLMEngine
from lmstack.generate.sampling import SamplingParams
from lmstack.multi_lora import adapter_view
from lmstack.rag.retrieval import Complete, Judge
from lmstack.serve.embeddings import EMBEDDING_MODEL, Embedder, embeddings_response
from lmstack.serve.guards import Authenticator, ClientDisconnected, RateLimiter, read_body, timed_out, watch
from lmstack.serve.metrics import Metrics
from lmstack.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RagIngestRequest,
    RagOptions,
    RagQueryRequest,
    error_body,
    not_supported,
    parse_request,
)
from lmstack.serve.rag import (
    RagAnswerFormat,
    RagChatFormat,
    RagService,
    RagSettings,
    RagSource,
    engine_model,
    refusal_chunks,
    refusal_states,
)
from lmstack.serve.streaming import (
    DONE,
    ChatFormat,
    Choices,
    ChoiceState,
    CompletionFormat,
    TokenText,
    sse,
    usage,
    visible_logprobs,
)


@dataclass
class ModelEntry:
    """One served model: its engine, its tokenizer, and how many positions a request may use."""

    name: str
    engine: AsyncEngine
    tokenizer: Any
    max_model_len: int  # prompt + completion limit: the context window, or the KV cache if smaller
    created: int = field(default_factory=lambda: int(time.time()))
    parent: str | None = None  # a LoRA adapter's base model, served as "parent:adapter"

    @classmethod
    def from_llm(cls, name: str, llm: Any, *, max_waiting: int = 256, **engine_kwargs: Any) -> ModelEntry:
        """Wrap a loaded `lmstack.api.LLM` in an engine; `engine_kwargs` go to `LLMEngine`."""
        engine = LLMEngine(llm.model, llm.tokenizer, **engine_kwargs)
        max_len = min(llm.config.max_seq_len, engine.capacity_tokens)
        return cls(name, AsyncEngine(engine, max_waiting=max_waiting), llm.tokenizer, max_len)

    @classmethod
    def from_adapter(cls, parent: str, adapter: str, llm: Any, path: str | Path, **kwargs: Any) -> ModelEntry:
        """The LoRA adapter in `path` on the weights of `llm` (served as `parent`), served as
        "parent:adapter" with an engine of its own; the base weights are shared, not copied
        (lmstack.multi_lora). An adapter that ships a chat template gives a base model one."""
        view = dataclasses.replace(llm, model=adapter_view(llm.model, path, base_model_name=llm.name))
        template = Path(path) / "chat_template.jinja"
        if template.exists() and llm.tokenizer.chat_template is None:
            view.tokenizer = copy.copy(llm.tokenizer)
            view.tokenizer.chat_template = template.read_text()
        entry = cls.from_llm(f"{parent}:{adapter}", view, **kwargs)
        entry.parent = parent
        return entry

    @property
    def is_chat(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None


@dataclass(frozen=True)
class ServerSettings:
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_body_bytes: int = 4 * 2**20
    request_timeout_s: float | None = 600.0  # whole request, queueing included; None: no deadline
    rate_limit_rpm: int | None = None  # per API key (per client address without keys)
    rate_limit_tpm: int | None = None  # prompt + max_tokens x n, settled to what was used
    drain_timeout_s: float = 30.0  # at shutdown, running requests get this long to finish
    embeddings: bool = True  # serve /v1/embeddings when the packaged MiniLM is installed
    rag: RagSettings = RagSettings()  # collections: /v1/rag/*, chat completions with `collection`


@dataclass
class _Plan:
    """One HTTP request's engine work: one prompt and one SamplingParams per choice."""

    request_id: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    stop_ids: list[frozenset[int]]
    prompt_tokens: int  # usage: each distinct prompt counted once

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_tokens + sum(p.max_new_tokens for p in self.params)


class _EventStream(StreamingResponse):
    """SSE whose engine requests are cancelled however the response ends, even if the body never started
    (a client gone between the first token and the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Service:
    def __init__(self, models: Mapping[str, ModelEntry], settings: ServerSettings) -> None:
        self.models, self.settings = dict(models), settings
        self.auth = Authenticator(settings.api_keys)
        self.limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        self.metrics = Metrics({name: e.engine.stats for name, e in self.models.items()})
        rag_cache = settings.rag.data_dir / "cache" / "embeddings.sqlite" if settings.rag.data_dir else None
        shared = Embedder(cache=rag_cache)
        self.embedder = shared if settings.embeddings else None
        self.rag = RagService(settings.rag, shared)
        self.token_text = {name: TokenText(e.tokenizer) for name, e in self.models.items()}

    # --- lookups ----------------------------------------------------------------------------------------
    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is not None:
            return entry
        bare = [e for e in self.models.values() if e.parent is not None and e.name == f"{e.parent}:{name}"]
        if len(bare) == 1:  # vLLM's style: an adapter by its own name, when only one base has it
            return bare[0]
        available = ", ".join(sorted(self.models))
        base, sep, adapter = name.partition(":")
        if sep and base in self.models:  # "base:adapter", an adapter this server was not started with
            adapters = ", ".join(sorted(e.name for e in self.models.values() if e.parent == base))
            served = f"Adapters of `{base}`: {adapters}." if adapters else "It is served without adapters."
            raise APIError(
                404, f"The model `{name}` names LoRA adapter `{adapter}` of `{base}`, which is not served. "
                f"{served} Start the server with --lora NAME=DIR to serve one.",
                param="model", code="model_not_found",
            )  # fmt: skip
        raise APIError(
            404,
            f"The model `{name}` does not exist or you do not have access to it. "
            f"Available models: {available}.",
            param="model",
            code="model_not_found",
        )

    def model_cards(self) -> list[dict[str, Any]]:
        cards = [
            {"id": e.name, "object": "model", "created": e.created, "owned_by": "lmstack", "parent": e.parent}
            for e in self.models.values()
        ]
        if self.embedder is not None and self.embedder.available:
            cards.append({"id": EMBEDDING_MODEL, "object": "model", "created": 0, "owned_by": "lmstack"})
        return cards

    # --- planning ----------------------------------------------------------------------------------------
    def plan(
        self,
        entry: ModelEntry,
        prompts: list[list[int]],
        req: ChatCompletionRequest | CompletionRequest,
        max_tokens: int | None,
        logprobs: int | None,
        what: str,
    ) -> _Plan:
        rid = uuid.uuid4().hex
        plan = _Plan(rid, [], [], [], sum(len(p) for p in prompts))
        for prompt in prompts:
            fitted = _fit(entry, len(prompt), max_tokens, what)
            for choice in range(req.n or 1):
                params = req.sampling_params(fitted, logprobs, choice)
                eos = frozenset() if params.ignore_eos else frozenset(entry.tokenizer.stop_ids)
                plan.prompts.append(prompt)
                plan.params.append(params)
                plan.stop_ids.append(eos | frozenset(params.stop_token_ids))
        return plan

    # --- endpoints ---------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        client = self.auth.client(request)
        req = parse_request(ChatCompletionRequest, await read_body(request, self.settings.max_body_bytes))
        entry = self.model(req.model)
        if req.collection is not None:
            return await self.chat_with_collection(request, client, entry, req)
        prompt = await asyncio.to_thread(chat_prompt, entry, req.template_messages())
        plan = self.plan(entry, [prompt], req, req.requested_max_tokens, req.engine_logprobs, "messages")
        fmt = ChatFormat(
            f"chatcmpl-{plan.request_id}", entry.name, int(time.time()), self.token_text[entry.name],
            bool(req.logprobs), req.include_usage,
        )  # fmt: skip
        return await self.generate(request, client, entry, plan, fmt, bool(req.stream))

    # --- collections ---------------------------------------------------------------------------------------
    async def chat_with_collection(
        self, request: Request, client: str, entry: ModelEntry, req: ChatCompletionRequest
    ) -> Response:
        """The last user message is the question; the RAG rules lead the system turn (the client's own
        system text follows them), earlier turns stay, and the question turn carries the sources."""
        turns = req.template_messages()
        question = turns[-1]["content"]
        assert req.collection is not None
        sources, rag_messages = await asyncio.to_thread(
            self.rag.retrieve, req.collection, question, req.rag, self.retrieval_model(entry, req.rag)
        )
        messages: list[dict[str, Any]] = []
        if rag_messages:
            extra = "\n\n".join(m["content"] for m in turns if m["role"] == "system")
            system = rag_messages[0]["content"] + (f"\n\n{extra}" if extra else "")
            history = [m for m in turns[:-1] if m["role"] != "system"]
            examples = rag_messages[1:-1]  # the worked exchange, then the client's turns, then the question
            messages = [{"role": "system", "content": system}, *examples, *history, rag_messages[-1]]
        rid = uuid.uuid4().hex
        fmt = RagChatFormat(
            f"chatcmpl-{rid}", entry.name, int(time.time()), self.token_text[entry.name], bool(req.logprobs),
            req.include_usage, rag=RagSource(question, sources, messages),
        )  # fmt: skip
        if not messages:
            return self.refuse(fmt, bool(req.stream))
        prompt = await asyncio.to_thread(chat_prompt, entry, messages)
        plan = self.plan(entry, [prompt], req, req.requested_max_tokens, req.engine_logprobs, "messages")
        return await self.generate(request, client, entry, plan, fmt, bool(req.stream))

    async def rag_query(self, request: Request) -> Response:
        client = self.auth.client(request)
        req = parse_request(RagQueryRequest, await read_body(request, self.settings.max_body_bytes))
        entry = self.model(req.model if req.model is not None else next(iter(self.models)))
        sources, messages = await asyncio.to_thread(
            self.rag.retrieve, req.collection, req.query, req, self.retrieval_model(entry, req)
        )
        rid = uuid.uuid4().hex
        if req.retrieve_only:
            body = {"id": f"rag-{rid}", "object": "rag.sources", "created": int(time.time()), "model": None}
            return JSONResponse({**body, "sources": [s.to_dict() for s in sources], "messages": messages})
        fmt = RagAnswerFormat(
            f"rag-{rid}", entry.name, int(time.time()), self.token_text[entry.name], False, False,
            rag=RagSource(req.query, sources, messages),
        )  # fmt: skip
        if not messages:
            return self.refuse(fmt, bool(req.stream))
        chat = ChatCompletionRequest.model_validate(
            {"model": entry.name, "messages": messages, "max_tokens": req.max_tokens, "stream": req.stream,
             "temperature": 0.0 if req.temperature is None else req.temperature}
        )  # fmt: skip
        prompt = await asyncio.to_thread(chat_prompt, entry, messages)
        plan = self.plan(entry, [prompt], chat, req.max_tokens, None, "query")
        return await self.generate(request, client, entry, plan, fmt, bool(req.stream))

    def retrieval_model(self, entry: ModelEntry, options: RagOptions | None) -> tuple[Complete, Judge] | None:
        """The served model as relevance judge and query writer, when the request asks to rerank or
        rewrite: its calls are requests to the model's engine like any other (not billed to the client)."""
        if options is None or not (options.rerank or options.rewrite):
            return None

        def prompt_ids(messages: list[dict[str, Any]], max_tokens: int) -> list[int]:
            prompt = chat_prompt(entry, messages)
            _fit(entry, len(prompt), max_tokens, "reranking or rewriting prompt")
            return prompt

        return engine_model(entry.engine, entry.tokenizer, prompt_ids, asyncio.get_running_loop())

    def refuse(self, fmt: RagChatFormat | RagAnswerFormat, stream: bool) -> Response:
        """Nothing relevant was retrieved: the fixed refusal, without calling the model."""
        if not stream:
            return JSONResponse(fmt.response(refusal_states(), usage(0, 0)))

        async def events() -> AsyncIterator[bytes]:
            for chunk in refusal_chunks(fmt):
                yield sse(chunk)
            yield DONE

        return _EventStream(events(), lambda: None, {"x-request-id": fmt.response_id})

    async def rag_ingest(self, request: Request) -> Response:
        self.auth.client(request)
        req = parse_request(RagIngestRequest, await read_body(request, self.settings.max_body_bytes))
        body = await asyncio.to_thread(
            self.rag.ingest, req.collection, req.paths, req.include, req.exclude, req.metadata
        )
        return JSONResponse(body)

    async def rag_collections(self, request: Request) -> Response:
        self.auth.client(request)
        names = await asyncio.to_thread(self.rag.names)
        return JSONResponse(
            {"object": "list", "data": [{"id": n, "object": "rag.collection"} for n in names]}
        )

    async def completions(self, request: Request) -> Response:
        client = self.auth.client(request)
        req = parse_request(CompletionRequest, await read_body(request, self.settings.max_body_bytes))
        entry = self.model(req.model)
        prompts, texts = await asyncio.to_thread(completion_prompts, entry, req)
        plan = self.plan(entry, prompts, req, req.max_tokens, req.logprobs, "prompt")
        n = req.n or 1
        fmt = CompletionFormat(
            f"cmpl-{plan.request_id}", entry.name, int(time.time()), self.token_text[entry.name],
            req.logprobs is not None, req.include_usage, echo=[t for t in texts for _ in range(n)],
        )  # fmt: skip
        return await self.generate(request, client, entry, plan, fmt, bool(req.stream))

    async def embeddings(self, request: Request) -> Response:
        client = self.auth.client(request)
        req = parse_request(EmbeddingRequest, await read_body(request, self.settings.max_body_bytes))
        if self.embedder is None or req.model != EMBEDDING_MODEL:
            served = EMBEDDING_MODEL if self.embedder is not None else "none"
            raise APIError(
                404, f"The embedding model `{req.model}` is not served here. Embedding models: {served}.",
                param="model", code="model_not_found",
            )  # fmt: skip
        if req.dimensions is not None and req.dimensions != 384:
            raise not_supported("dimensions", "dimensions other than 384")
        texts = req.texts()
        self.limiter.acquire(client, 0)
        vectors, tokens = await asyncio.to_thread(self.embedder.embed_request, texts)
        self.limiter.refund(client, -tokens)  # charged after the fact: counting needs the model's tokenizer
        return JSONResponse(embeddings_response(vectors, tokens, req.encoding_format))

    # --- generation --------------------------------------------------------------------------------------
    async def generate(
        self,
        request: Request,
        client: str,
        entry: ModelEntry,
        plan: _Plan,
        fmt: ChatFormat | CompletionFormat,
        stream: bool,
    ) -> Response:
        deadline = _deadline(self.settings)
        self.limiter.acquire(client, plan.reserved_tokens)
        states = [ChoiceState() for _ in plan.params]
        choices = Choices(entry.engine, plan.request_id, plan.prompts, plan.params)
        streaming = False
        try:
            try:
                await watch(request, choices.started(), deadline)
            except (ValueError, AsyncEngine.QueueFull, RuntimeError) as error:
                raise engine_error(error) from error
            headers = {"x-request-id": fmt.response_id}
            if stream:
                events = self.events(entry, plan, choices, fmt, states, deadline)
                streaming = True

                def close() -> None:  # once the response has ended, however it ended
                    choices.cancel()
                    self.settle(client, plan, states)

                return _EventStream(events, close, headers)
            await watch(request, self.collect(entry, plan, choices, states), deadline)
            body = fmt.response(states, usage(plan.prompt_tokens, sum(s.completion_tokens for s in states)))
            return JSONResponse(body, headers=headers)
        finally:
            if not streaming:
                choices.cancel()
                self.settle(client, plan, states)

    async def collect(
        self, entry: ModelEntry, plan: _Plan, choices: Choices, states: list[ChoiceState]
    ) -> None:
        """Non-streaming: `watch` enforces the deadline and notices a client gone."""
        async for i, out in choices.outputs():
            states[i].add(out, visible_logprobs(out, plan.stop_ids[i]))
            if out.finished:
                self.finished(entry, out)

    async def events(
        self,
        entry: ModelEntry,
        plan: _Plan,
        choices: Choices,
        fmt: ChatFormat | CompletionFormat,
        states: list[ChoiceState],
        deadline: float | None,
    ) -> AsyncIterator[bytes]:
        try:
            for i in range(len(plan.params)):
                for chunk in fmt.opening(i):
                    yield sse(chunk)
            async for i, out in choices.outputs(deadline):
                lps = visible_logprobs(out, plan.stop_ids[i])
                states[i].add(out, lps)
                if out.finished:
                    self.finished(entry, out)
                for chunk in fmt.deltas(i, out, lps, states[i]):
                    yield sse(chunk)
            for chunk in fmt.closing(states):
                yield sse(chunk)
            if fmt.include_usage:
                completion = sum(s.completion_tokens for s in states)
                yield sse(fmt.usage_chunk(usage(plan.prompt_tokens, completion)))
        except Exception as error:  # headers are sent: the error becomes an event, as OpenAI streams do
            api_error = error if isinstance(error, APIError) else engine_error(error)
            self.metrics.errors.labels(str(api_error.status)).inc()
            yield sse(api_error.body())
        yield DONE

    def finished(self, entry: ModelEntry, out: Any) -> None:
        self.metrics.observe(entry.name, out)
        if out.finish_reason == "abort":
            raise APIError(
                503,
                "The request was aborted by the server (shutting down).",
                type="server_error",
                code="aborted",
            )

    def settle(self, client: str, plan: _Plan, states: list[ChoiceState]) -> None:
        used = plan.prompt_tokens + sum(s.completion_tokens for s in states)
        self.limiter.refund(client, plan.reserved_tokens - used)


def _deadline(settings: ServerSettings) -> float | None:
    if settings.request_timeout_s is None:
        return None
    return asyncio.get_running_loop().time() + settings.request_timeout_s


def _fit(entry: ModelEntry, n_prompt: int, max_tokens: int | None, what: str) -> int:
    """max_tokens for one prompt: the request's if it fits the context, else a 400 saying by how much."""
    ctx = entry.max_model_len
    if n_prompt == 0:
        raise APIError(400, f"The {what} is empty after tokenization.", param=what)
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in "
            f"{n_prompt} tokens, which leaves no room for a completion. "
            f"Please reduce the length of the {what}.",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        over = n_prompt + max_tokens - ctx
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the completion), "
            f"{over} over the limit. Please reduce the length of the {what}, or max_tokens to at most "
            f"{ctx - n_prompt}.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def engine_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, TimeoutError):
        return timed_out()
    if isinstance(error, AsyncEngine.QueueFull):
        return APIError(
            503,
            f"The server is overloaded ({error}); please retry shortly.",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, RuntimeError) and "shut" in str(error):
        return APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
    return APIError(500, f"The engine failed on this request: {error}", type="server_error")


# --- prompts ------------------------------------------------------------------------------------------------
def chat_prompt(entry: ModelEntry, messages: list[dict[str, Any]]) -> list[int]:
    if not entry.is_chat:
        raise APIError(
            400,
            f"`{entry.name}` is a base model without a chat template, so it cannot serve "
            "/v1/chat/completions. Use /v1/completions with a plain-text prompt.",
            param="model",
            code="model_not_chat",
        )
    try:
        text = entry.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as error:
        raise APIError(400, str(error), param="messages") from error
    return entry.tokenizer.encode(text, add_special_tokens=False)


def completion_prompts(entry: ModelEntry, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """-> (ids of each prompt, their texts when echoing). A prompt is text or token ids; a list of either
    is a batch, whose choices are numbered prompt by prompt."""
    p = req.prompt
    items: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    ids = [entry.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in items]
    texts = [x if isinstance(x, str) else entry.tokenizer.decode(x) for x in items] if req.echo else []
    return ids, texts


# --- the app ------------------------------------------------------------------------------------------------
def create_app(models: Mapping[str, ModelEntry], settings: ServerSettings | None = None) -> FastAPI:
    if not models:
        raise ValueError("create_app needs at least one model")
    settings = settings or ServerSettings()
    service = _Service(models, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for entry in service.models.values():
            entry.engine.start()
        yield
        # uvicorn has already waited for open requests; this drains whatever is left, then aborts.
        drains = (e.engine.shutdown(drain=True, timeout=settings.drain_timeout_s) for e in models.values())
        await asyncio.gather(*drains)
        service.rag.close()

    app = FastAPI(title="lmstack", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app, service)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI, service: _Service) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        service.metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def gone(request: Request, error: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    app.add_exception_handler(ClientDisconnected, gone)  # while waiting for tokens
    app.add_exception_handler(ClientDisconnect, gone)  # while uploading the body

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = (
            f"Invalid URL ({request.method} {request.url.path})"
            if error.status_code in (404, 405)
            else str(error.detail)
        )
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> Response:
        service.metrics.errors.labels("500").inc()
        body = error_body("The server had an error while processing your request.", "server_error")
        return JSONResponse(body, status_code=500)


def _add_routes(app: FastAPI, service: _Service) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(service.models)}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        service.auth.client(request)
        return {"object": "list", "data": service.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> dict[str, Any]:
        service.auth.client(request)
        for card in service.model_cards():
            if card["id"] == model_id:
                return card
        service.model(model_id)  # raises the 404 listing what is served
        raise AssertionError

    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", service.completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", service.embeddings, methods=["POST"])
    app.add_api_route("/v1/rag/query", service.rag_query, methods=["POST"])
    app.add_api_route("/v1/rag/ingest", service.rag_ingest, methods=["POST"])
    app.add_api_route("/v1/rag/collections", service.rag_collections, methods=["GET"])
