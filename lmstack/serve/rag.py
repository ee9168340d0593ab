"""Collections over HTTP: /v1/rag/query, /v1/rag/ingest, /v1/rag/collections, and chat completions with a
`collection` field.

Retrieval runs in a worker thread; the answer runs through the same engine, limits and stream machinery
as any chat completion. Only the body shapes differ (`RagChatFormat`, `RagAnswerFormat`): the answer
streams first, then one event carries the sources, the citations and the exact messages. With no relevant
source the model is not called and the answer is the fixed refusal. /v1/rag/ingest reads only inside the
folders the server was started with (`--rag-root`), and is off without one.
"""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.engine import AsyncEngine, RequestOutput, TokenLogprob
from lmstack.generate.sampling import SamplingParams
from lmstack.rag.answer import NOT_ENOUGH, SYSTEM_PROMPT, Answer, Messages, Source, finish, prepare
from lmstack.rag.collection import (
    Collection,
    judge_messages,
    relevance,
    store_class,
    store_location,
    yes_no_ids,
)
from lmstack.rag.documents import DocumentError
from lmstack.rag.embedder import Embedder
from lmstack.rag.retrieval import Complete, Judge, RetrievalConfig
from lmstack.rag.store import CollectionNotFound, Record, StoreError
from lmstack.serve.protocol import APIError, RagOptions
from lmstack.serve.streaming import ChatFormat, ChoiceState

# next-token alternatives the served judge reads: its relevance is P(yes) / (P(yes) + P(no)) among them
JUDGE_TOP = 20


def engine_model(
    engine: AsyncEngine,
    tokenizer: Any,
    prompt_ids: Callable[[Messages, int], list[int]],
    loop: asyncio.AbstractEventLoop,
) -> tuple[Complete, Judge]:
    """Query rewriting and the relevance judge on the served model, for retrieval running in a worker
    thread: each call is one more request to the model's engine (batched with the others), awaited on
    the server's event loop `loop`. `prompt_ids(messages, max_tokens)` renders a chat prompt that fits.
    Greedy, as `Collection.retrieve(llm=...)` is; the judge reads the first token's top JUDGE_TOP
    logprobs, where the local judge reads the whole distribution (the two agree whenever "yes" or "no"
    is among the likely replies)."""
    yes, no = yes_no_ids(tokenizer)

    def run(messages: Messages, params: SamplingParams) -> list[RequestOutput]:
        prompt = prompt_ids(messages, params.max_new_tokens)

        async def outputs() -> list[RequestOutput]:
            return [out async for out in engine.generate(f"rag-{uuid.uuid4().hex}", prompt, params)]

        return asyncio.run_coroutine_threadsafe(outputs(), loop).result()

    def complete(messages: Messages) -> str:
        outputs = run(messages, SamplingParams(max_new_tokens=48, temperature=0))
        return "".join(out.text_delta for out in outputs)

    def judge(question: str, record: Record) -> float:
        outputs = run(
            judge_messages(question, record.text), SamplingParams(1, temperature=0, logprobs=JUDGE_TOP)
        )
        first = next(lp for out in outputs for lp in out.logprobs or [])
        return relevance({token: math.exp(lp) for token, lp in first.top}, yes, no)

    return complete, judge


@dataclass(frozen=True)
class RagSettings:
    data_dir: Path | None = None  # collections live in <data_dir>/collections; None: RAG endpoints off
    backend: str = "embedded"
    pg_uri: str | None = None
    ingest_roots: tuple[Path, ...] = ()  # folders /v1/rag/ingest may read; empty: ingest over HTTP is off


class RagService:
    def __init__(self, settings: RagSettings, embedder: Embedder) -> None:
        self.settings, self.embedder = settings, embedder
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.settings.data_dir is not None or self.settings.backend == "pgvector"

    def _require(self) -> None:
        if not self.enabled:
            raise APIError(
                404, "This server has no collections (start it with --rag-data-dir).", code="rag_off"
            )

    def names(self) -> list[str]:
        self._require()
        s = self.settings
        return store_class(s.backend).list_collections(store_location(s.backend, s.data_dir, s.pg_uri))

    def collection(self, name: str, create: bool = False) -> Collection:
        self._require()
        with self._lock:
            coll = self._open.get(name)
            if coll is None:
                s = self.settings
                try:
                    coll = Collection.open(
                        name, data_dir=s.data_dir or Path("."), backend=s.backend, pg_uri=s.pg_uri,
                        create=create, embedder=self.embedder,
                    )  # fmt: skip
                except CollectionNotFound as error:
                    raise APIError(
                        404, f"{error}.", param="collection", code="collection_not_found"
                    ) from error
                except StoreError as error:
                    raise APIError(400, f"{error}.", param="collection") from error
                self._open[name] = coll
            return coll

    def retrieve(
        self,
        name: str,
        question: str,
        options: RagOptions | None,
        model: tuple[Complete, Judge] | None = None,
    ) -> tuple[list[Source], list]:
        """Blocking (call it in a thread): -> (numbered sources, the exact messages; [] = refuse).
        `model`: the served model's (complete, judge), which `rerank` and `rewrite` need."""
        o = options or RagOptions.model_validate({})
        config = RetrievalConfig(
            k=o.k, mode=o.mode, min_score=o.min_score, where=o.where, mmr=o.mmr, small_to_big=o.small_to_big,
            candidates=max(40, o.k), rerank=o.rerank, rerank_method="judge", rewrite=o.rewrite,
            sentences=o.sentences,
        )  # fmt: skip
        coll = self.collection(name)
        complete, judge = model if model is not None else (None, None)
        try:
            hits = coll.retrieve(question, config, complete=complete, judge=judge)
        except (StoreError, ValueError) as error:
            raise APIError(400, f"{error}.", param="rag.where" if "filter" in str(error) else None) from error
        return prepare(question, hits, SYSTEM_PROMPT)

    def ingest(
        self,
        name: str,
        paths: Sequence[str],
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        metadata: dict[str, Any] | None,
    ) -> dict[str, Any]:
        if not self.settings.ingest_roots:
            raise APIError(
                403, "Ingesting over HTTP is off on this server (start it with --rag-root FOLDER).",
                code="ingest_off",
            )  # fmt: skip
        coll = self.collection(name, create=True)
        try:
            report = coll.ingest(
                list(paths), include=tuple(include or ("**/*",)), exclude=tuple(exclude or ()),
                metadata=metadata, allowed_roots=self.settings.ingest_roots, progress=False,
            )  # fmt: skip
        except DocumentError as error:
            status = 403 if "outside the folders" in str(error) else 400
            raise APIError(status, f"{error}.", param="paths") from error
        except (StoreError, ValueError) as error:
            raise APIError(400, f"{error}.") from error
        return {
            "object": "rag.ingest",
            "collection": name,
            "added": len(report.added),
            "updated": len(report.updated),
            "deleted": len(report.deleted),
            "unchanged": report.unchanged,
            "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
            "chunks_written": report.chunks,
            "count": coll.store.count(),
            "seconds": round(report.seconds, 3),
        }

    def close(self) -> None:
        with self._lock:
            for coll in self._open.values():
                coll.close()
            self._open.clear()


# --- body shapes -------------------------------------------------------------------------------------------
@dataclass
class RagSource:
    """What one RAG request retrieved and sent, to finish its body with."""

    question: str = ""
    sources: list[Source] = field(default_factory=list)
    messages: list = field(default_factory=list)

    def answer(self, states: Sequence[ChoiceState]) -> Answer:
        text = "".join(states[0].text) if states else ""
        return finish(self.question, self.sources, self.messages, text)

    def extension(self, states: Sequence[ChoiceState]) -> dict[str, Any]:
        a = self.answer(states)
        return {
            "sources": [s.to_dict() for s in a.sources],
            "citations": a.citations,
            "refused": a.refused,
            "messages": a.messages,
        }


@dataclass
class RagChatFormat(ChatFormat):
    """A chat completion plus `sources`, `citations`, `refused` and `messages`: in the body, or in one
    last chunk (no choices) after the answer when streaming."""

    rag: RagSource = field(default_factory=RagSource)

    def response(self, states: Sequence[ChoiceState], totals: dict[str, int]) -> dict[str, Any]:
        return {**super().response(states, totals), **self.rag.extension(states)}

    def closing(self, states: Sequence[ChoiceState]) -> list[dict[str, Any]]:
        return [{**self._envelope("chat.completion.chunk", []), **self.rag.extension(states)}]


@dataclass
class RagAnswerFormat(ChatFormat):
    """/v1/rag/query: {"object": "rag.answer", answer, sources, citations, refused, messages, usage}; streamed
    as rag.answer.delta events, then one rag.answer.sources event."""

    rag: RagSource = field(default_factory=RagSource)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def deltas(
        self, index: int, out: RequestOutput, lps: list[TokenLogprob] | None, state: ChoiceState
    ) -> list[dict[str, Any]]:
        return [{**self._head("rag.answer.delta"), "delta": out.text_delta}] if out.text_delta else []

    def usage_chunk(self, totals: dict[str, int]) -> dict[str, Any]:
        return {**self._head("rag.answer.usage"), "usage": totals}

    def response(self, states: Sequence[ChoiceState], totals: dict[str, int]) -> dict[str, Any]:
        a = self.rag.answer(states)
        return {**self._head("rag.answer"), "answer": a.answer, **self.rag.extension(states), "usage": totals}

    def closing(self, states: Sequence[ChoiceState]) -> list[dict[str, Any]]:
        return [{**self._head("rag.answer.sources"), **self.rag.extension(states)}]


def refusal_states() -> list[ChoiceState]:
    """The answer when nothing relevant was found: the fixed refusal, no model call, no tokens."""
    return [ChoiceState(text=[NOT_ENOUGH], finish_reason="stop")]


def refusal_chunks(fmt: RagChatFormat | RagAnswerFormat) -> list[dict[str, Any]]:
    states = refusal_states()
    if isinstance(fmt, RagAnswerFormat):
        return [{**fmt._head("rag.answer.delta"), "delta": NOT_ENOUGH}, *fmt.closing(states)]
    return [
        *fmt.opening(0),
        fmt._chunk(0, {"content": NOT_ENOUGH}, None, None),
        fmt._chunk(0, {}, None, "stop"),
        *fmt.closing(states),
    ]
