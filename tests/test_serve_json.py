"""response_format json_object / json_schema through the real server and the official `openai` client: a
tiny random Llama (garbage logits) and, in the slow tier, the packaged SmolLM2 instruct model. Whatever the
weights, an answer that stops is JSON; a stream says the same as the JSON response."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from test_serve import MESSAGES, client_for, start_server
from test_structured import SCHEMA, json_prefix

from lmstack.api import LLM
from lmstack.serve import BackgroundServer, ModelEntry, ServerSettings, create_app

pytest.importorskip("llguidance")

JSON_OBJECT = {"type": "json_object"}


@pytest.fixture(scope="module")
def client(tiny_checkpoint) -> Iterator[openai.OpenAI]:
    srv, _ = start_server(LLM.load(str(tiny_checkpoint), device="cpu"), ServerSettings(embeddings=False))
    yield client_for(srv)
    srv.stop()


def chat_text(client: openai.OpenAI, stream: bool, **kw) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        return choice.message.content or "", choice.finish_reason
    chunks = list(client.chat.completions.create(stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_random_model_chat_json_object_stream_and_not(client):
    """Seeded, temperature 1: a stop is a JSON object, a length cut a JSON prefix, and the stream says
    exactly what the JSON response says."""
    stopped = 0
    for seed in range(6):
        kw = dict(model="tiny", messages=MESSAGES, max_tokens=48, temperature=1.0, seed=seed)
        text, reason = chat_text(client, False, response_format=JSON_OBJECT, **kw)
        assert chat_text(client, True, response_format=JSON_OBJECT, **kw) == (text, reason)
        if reason == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length" and json_prefix(text) != "bad"
    assert stopped >= 3


def test_completions_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
    got = client.completions.create(
        model="tiny", prompt="def f(x):", max_tokens=48, n=4, seed=1, extra_body={"response_format": fmt}
    )
    answers = [json.loads(c.text) for c in got.choices if c.finish_reason == "stop"]
    assert answers
    for obj in answers:
        assert set(obj) == {"n", "tag"} and isinstance(obj["n"], int) and len(obj["tag"]) <= 4


def test_max_tokens_first_is_length(client):
    text, reason = chat_text(
        client, False, model="tiny", messages=MESSAGES, max_tokens=1, response_format=JSON_OBJECT
    )
    assert reason == "length" and text.startswith("{")


# --- the real packaged model (slow) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm(model_cache_dir) -> Iterator[openai.OpenAI]:
    from lmstack.hub import ModelNotFoundError

    name = "smollm2-135m-instruct"
    try:
        llm = LLM.load(name, device="cpu", cache_dir=model_cache_dir)
    except ModelNotFoundError as e:
        pytest.skip(f"{name} is not installed: {e}")
    app = create_app({name: ModelEntry.from_llm(name, llm, num_blocks=64)}, ServerSettings(embeddings=False))
    srv = BackgroundServer(app).start()
    yield client_for(srv)
    srv.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_real_model_answers_a_json_object(smollm, stream):
    messages = [
        {"role": "system", "content": "You reply with JSON only."},
        {"role": "user", "content": "Describe a cat as a JSON object with the keys name, age and color."},
    ]
    text, reason = chat_text(
        smollm, stream, model="smollm2-135m-instruct", messages=messages, max_tokens=48, temperature=0,
        response_format=JSON_OBJECT,
    )  # fmt: skip
    assert reason == "stop"
    answer = json.loads(text)
    assert isinstance(answer, dict) and {"name", "age", "color"} <= set(answer)
