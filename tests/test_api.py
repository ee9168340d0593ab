"""The LLM facade on a tiny local checkpoint (fast) and on the packaged default model (slow)."""

from __future__ import annotations

import pytest
import torch

from lmstack.api import LLM


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, tmp_path_factory) -> LLM:
    return LLM.load(str(tiny_checkpoint), device="cpu", cache_dir=tmp_path_factory.mktemp("home"))


def test_logits_are_float32_full_forward(llm):
    ids = llm.tokenizer.encode("The capital of France")
    logits = llm.logits(ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (len(ids), llm.config.vocab_size)
    # a prefix's logits do not depend on what follows (causal)
    torch.testing.assert_close(llm.logits(ids[:3]), logits[:3], rtol=1e-5, atol=1e-5)


def test_continuation_logprobs_read_the_full_forward(llm):
    context, continuation = llm.tokenizer.encode("The capital of"), llm.tokenizer.encode(" France is Paris")
    ids = context + continuation
    reference = torch.log_softmax(llm.logits(ids), dim=-1)[len(context) - 1 : -1]  # rows predicting each id
    expected = reference.gather(1, torch.tensor(continuation)[:, None]).squeeze(1)
    got = llm.continuation_logprobs(context, continuation)
    assert got.dtype == torch.float32 and got.shape == (len(continuation),)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("context", "continuation", "message"),
    [([], [1], "at least one context id"), ([1], [], "at least one context id"), ([1], [-1], "must lie in")],
)
def test_continuation_logprobs_refuse_bad_ids(llm, context, continuation, message):
    with pytest.raises(ValueError, match=message):
        llm.continuation_logprobs(context, continuation)
    with pytest.raises(ValueError, match="over the context window"):
        llm.continuation_logprobs([1] * llm.config.max_seq_len, [1])


def test_stream_concatenates_to_generate(llm):
    kw = dict(max_new_tokens=12, temperature=0.0)
    text = llm.generate("hello", **kw)
    assert "".join(llm.stream("hello", **kw)) == text


def test_chat_uses_the_template(llm):
    msgs = [{"role": "user", "content": "hello"}]
    assert llm.prompt_ids(msgs) == llm.prompt_ids("hello")  # a plain string is one user turn
    assert llm.prompt_ids("hello", chat=False) != llm.prompt_ids("hello")
    assert isinstance(llm.chat(msgs, max_new_tokens=4, temperature=0), str)


@pytest.mark.parametrize("dtype", ["int8", "q4", "bfloat16"])
def test_quantized_dtypes_load_and_generate(tiny_checkpoint, tmp_path, dtype):
    q = LLM.load(str(tiny_checkpoint), device="cpu", dtype=dtype, cache_dir=tmp_path)
    assert isinstance(q.generate("hello", max_new_tokens=4, temperature=0), str)


def test_bad_inputs_name_the_problem(llm, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM.load(str(tiny_checkpoint), dtype="fp8", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="device"):
        LLM.load(str(tiny_checkpoint), device="tpu", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        llm.logits([])
    with pytest.raises(ValueError, match="token ids must lie"):
        llm.logits([llm.config.vocab_size])
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("hi", temperature=-0.5)
    with pytest.raises(ValueError, match="context window"):
        llm.generate("hi", max_new_tokens=llm.config.max_seq_len)
    with pytest.raises(ValueError, match="unknown model"):
        LLM.load("not-a-model", cache_dir=tmp_path)


@pytest.mark.slow
def test_default_model_api_round_trip():
    big = LLM.load("qwen2.5-coder-0.5b-instruct", device="cpu")
    ids = big.tokenizer.encode("def fib(n):")
    assert big.logits(ids).shape == (len(ids), 151936)
    out = big.generate("What is the capital of France?", temperature=0, max_new_tokens=24)
    assert "Paris" in out
