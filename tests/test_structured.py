"""Constrained JSON decoding (lmstack.generate.structured) and the engine that applies it.

The masks are checked against a reference JSON prefix recognizer written here from RFC 8259, independent of
llguidance: every token a mask allows keeps the text a prefix of some JSON object, and EOS is allowed
exactly when the text is one. The engine runs tiny random-weight models (garbage logits) under the
constraint: every output that stops is valid JSON, and one cut by max_tokens is still a prefix of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.api import LLM
from lmstack.engine import LLMEngine
from lmstack.engine.runner import _SamplingState, sample_batch
from lmstack.generate import SamplingParams, generate_tokens
from lmstack.generate.structured import JSON_OBJECT, GrammarCompiler, apply_bitmask, fill_bitmask
from lmstack.tokenizer import Tokenizer

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "tag": {"type": "string", "maxLength": 4}},
    "required": ["n", "tag"],
    "additionalProperties": False,
}


# --- a reference recognizer -----------------------------------------------------------------------------
class _End(Exception):
    """The text ran out: what was read so far can still be completed."""


class _Bad(Exception):
    """No continuation makes this JSON."""


def json_prefix(text: str) -> str:
    """'complete' if `text` is one JSON object (RFC 8259, whitespace around allowed), 'prefix' if some text
    appended can make it one, else 'bad'."""
    i = 0

    def ch() -> str:
        if i >= len(text):
            raise _End
        return text[i]

    def eat(c: str) -> None:
        nonlocal i
        if ch() != c:
            raise _Bad
        i += 1

    def ws() -> None:
        nonlocal i
        while i < len(text) and text[i] in " \t\n\r":
            i += 1

    def digits(at_least_one: bool) -> None:
        nonlocal i
        if at_least_one and ch() not in "0123456789":
            raise _Bad
        while i < len(text) and text[i] in "0123456789":
            i += 1

    def number() -> None:
        nonlocal i
        if ch() == "-":
            i += 1
        if ch() == "0":
            i += 1
        else:
            digits(at_least_one=True)
        if i < len(text) and text[i] == ".":
            i += 1
            digits(at_least_one=True)
        if i < len(text) and text[i] in "eE":
            i += 1
            if ch() in "+-":
                i += 1
            digits(at_least_one=True)

    def string() -> None:
        nonlocal i
        eat('"')
        while True:
            c = ch()
            i += 1
            if c == '"':
                return
            if c == "\\":
                e = ch()
                i += 1
                if e == "u":
                    for _ in range(4):
                        if ch() not in "0123456789abcdefABCDEF":
                            raise _Bad
                        i += 1
                elif e not in '"\\/bfnrt':
                    raise _Bad
            elif ord(c) < 0x20:
                raise _Bad

    def literal() -> None:
        nonlocal i
        for word in ("true", "false", "null"):
            if text.startswith(word, i):
                i += len(word)
                return
            if word.startswith(text[i:]):
                raise _End
        raise _Bad

    def members(close: str, member) -> None:
        ws()
        if ch() == close:
            eat(close)
            return
        while True:
            member()
            ws()
            if ch() == ",":
                eat(",")
                continue
            eat(close)
            return

    def pair() -> None:
        ws()
        string()
        ws()
        eat(":")
        value()

    def value() -> None:
        ws()
        c = ch()
        if c == "{":
            eat("{")
            members("}", pair)
        elif c == "[":
            eat("[")
            members("]", value)
        elif c == '"':
            string()
        elif c in "-0123456789":
            number()
        else:
            literal()

    try:
        ws()
        if ch() != "{":
            raise _Bad
        value()
        ws()
        return "complete" if i == len(text) else "bad"
    except _End:
        return "prefix"
    except _Bad:
        return "bad"


def test_reference_recognizer():
    complete = ["{}", ' {"a": [1, -2.5e+3, true, null, {"b": "\\u00e9\\n"}]} ', '{"": false}']
    prefix = ["", "{", '{"a', '{"a": tr', '{"a": -', '{"a": 1.', '{"a": 1e', '{"a": "\\u00', '{"a": [1, ']
    bad = ["[]", '{"a": 01}', '{"a": 1,}', "{a: 1}", '{"a": tx', '{"a": "\\x"}', "{} x", '{"a": 1]', '{"\n"}']
    assert all(json_prefix(t) == "complete" for t in complete)
    assert all(json_prefix(t) == "prefix" for t in prefix)
    assert all(json_prefix(t) == "bad" for t in bad)


# --- the mask, token by token -------------------------------------------------------------------------------
def _allowed(bitmask_row: torch.Tensor, V: int) -> list[int]:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")  # bit j of word w: 32 w + j
    return np.flatnonzero(bits[:V]).tolist()


def _tokenizer(kind: str, tiny_checkpoint: Path) -> tuple[Tokenizer, int]:
    if kind == "tiny":
        return Tokenizer.from_pretrained_dir(tiny_checkpoint), 299
    from lmstack.hub import ModelNotFoundError, resolve

    cache = Path(__file__).resolve().parent.parent / ".pytest_cache" / "d" / "lmstack-models"
    try:
        return Tokenizer.from_gguf(
            resolve("qwen2.5-coder-0.5b-instruct", cache, allow_download=False).path
        ), 151936
    except ModelNotFoundError as e:
        pytest.skip(f"no packaged qwen2.5-coder-0.5b-instruct: {e}")


@pytest.mark.parametrize("kind", ["tiny", pytest.param("qwen", marks=pytest.mark.slow)])
def test_mask_keeps_a_json_prefix_and_eos_waits_for_the_end(kind, tiny_checkpoint):
    """Random walks through the allowed tokens: each allowed token keeps the text a JSON-object prefix (all
    of them for the tiny vocabulary, a sample of 100 for Qwen's 151,936), EOS is allowed exactly when the
    text is a complete object, and then nothing else is."""
    tok, V = _tokenizer(kind, tiny_checkpoint)
    compiler = GrammarCompiler(tok, V)
    eos = tok.stop_ids
    pieces = {t: tok.decode([t]) for t in range(min(V, tok.vocab_size))}
    closers = {t for t, p in pieces.items() if any(c in p for c in '"}]')}
    finished = 0
    for walk in range(6):
        rng = random.Random(walk)
        matcher, text = compiler.matcher(JSON_OBJECT), ""
        for _ in range(80):
            allowed = _allowed(fill_bitmask([(matcher, [])], V)[0], V)
            allowed_set = set(allowed)
            state = json_prefix(text)
            assert state != "bad", text
            assert (eos <= allowed_set) == (state == "complete"), (text, allowed[:10])
            if state == "complete":
                assert allowed_set == eos
                finished += 1
                break
            checked = allowed if len(allowed) <= 300 else rng.sample(allowed, 100)
            broken = [t for t in checked if json_prefix(text + pieces[t]) == "bad"]
            assert not broken, (text, [pieces[t] for t in broken[:5]])
            closing = sorted(closers & allowed_set)
            token = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
            matcher.advance([token])
            text += pieces[token]
        assert not matcher.error
    assert finished >= 3


def test_bitmask_with_drafts_masks_each_position(tiny_checkpoint):
    """Speculative verification: row i is the mask after drafts[:i]; rows past a rejected draft stay open."""
    tok = Tokenizer.from_pretrained_dir(tiny_checkpoint)
    compiler, V = GrammarCompiler(tok, 299), 299
    drafts = tok.encode('{"a": 1}', add_special_tokens=False)
    bitmask = fill_bitmask([(compiler.matcher(JSON_OBJECT), drafts)], V)
    step = compiler.matcher(JSON_OBJECT)
    for i, token in enumerate(drafts):
        assert torch.equal(bitmask[i], fill_bitmask([(step, [])], V)[0])
        step.advance([token])
    assert _allowed(bitmask[len(drafts)], V) == sorted(tok.stop_ids) and step.complete
    bad = tok.encode('{"a": ]', add_special_tokens=False)
    rows = fill_bitmask([(compiler.matcher(JSON_OBJECT), bad)], V)
    assert rows[-1].eq(-1).all()  # after the rejected "]": never kept, left all-allowed


def test_apply_bitmask_matches_the_bits():
    g = torch.Generator().manual_seed(0)
    V = 77  # not a multiple of 32: the last word's spare bits are ignored
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=g)
    logits = torch.randn(3, V, generator=g)
    out = apply_bitmask(logits, bitmask)
    for r in range(3):
        allowed = set(_allowed(bitmask[r], V))
        for t in range(V):
            assert out[r, t] == (logits[r, t] if t in allowed else float("-inf"))


def test_sample_batch_masks_only_the_constrained_rows(tiny_checkpoint):
    tok = Tokenizer.from_pretrained_dir(tiny_checkpoint)
    compiler = GrammarCompiler(tok, 299)
    logits = torch.randn(2, 299, generator=torch.Generator().manual_seed(1))
    free = _SamplingState(SamplingParams(temperature=0), None, None, None)
    constrained = _SamplingState(
        SamplingParams(temperature=0), None, None, None, compiler.matcher(JSON_OBJECT)
    )
    ids = sample_batch(logits, [free, constrained]).tolist()
    pieces = [tok.decode([t]) for t in range(tok.vocab_size)]
    opening = [t for t, p in enumerate(pieces) if p.startswith("{") and json_prefix(p) != "bad"]
    assert ids[0] == int(logits[0].argmax()) and ids[1] == max(opening, key=lambda t: float(logits[1, t]))


# --- the engine -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM.load(str(tiny_checkpoint), device="cpu")


def run(
    engine: LLMEngine, prompt: list[int], params: list[SamplingParams]
) -> list[tuple[str, str, list[int]]]:
    """(text, finish reason, token ids) of each request, run together in one engine."""
    texts, reasons, ids = [""] * len(params), [""] * len(params), [[] for _ in params]
    for i, p in enumerate(params):
        engine.add_request(str(i), prompt, p)
    while engine.has_unfinished():
        for out in engine.step():
            i = int(out.request_id)
            texts[i] += out.text_delta
            ids[i] += out.new_token_ids
            if out.finished:
                reasons[i] = out.finish_reason or ""
    return list(zip(texts, reasons, ids, strict=True))


def test_random_model_yields_json_whenever_it_stops(llm):
    """Garbage logits at temperature 1, with and without penalties: a stop is always a complete object,
    EOS its last token; a length cut is still a JSON prefix."""
    engine = LLMEngine(llm.model, llm.tokenizer, num_blocks=256)
    prompt = llm.tokenizer.encode("The capital of France is")
    params = [
        SamplingParams(max_new_tokens=64, temperature=1.0, seed=s, json_schema=JSON_OBJECT, **knobs)
        for s, knobs in enumerate(
            [{}] * 6 + [{"repetition_penalty": 1.3, "frequency_penalty": 0.5, "top_p": 0.9}] * 2
        )
    ]
    results = run(engine, prompt, params)
    stopped = [(text, ids) for text, reason, ids in results if reason == "stop"]
    assert len(stopped) >= 4
    for text, ids in stopped:
        assert isinstance(json.loads(text), dict) and ids[-1] in llm.tokenizer.stop_ids
    for text, reason, _ in results:
        assert reason in ("stop", "length") and json_prefix(text) != "bad"


def test_json_schema_is_followed(llm):
    engine = LLMEngine(llm.model, llm.tokenizer, num_blocks=256)
    prompt = llm.tokenizer.encode("def f(x):")
    schema = json.dumps(SCHEMA)
    results = run(
        engine, prompt, [SamplingParams(max_new_tokens=48, seed=s, json_schema=schema) for s in range(4)]
    )
    stopped = [json.loads(text) for text, reason, _ in results if reason == "stop"]
    assert stopped
    for obj in stopped:
        assert set(obj) == {"n", "tag"} and isinstance(obj["n"], int) and len(obj["tag"]) <= 4


def test_length_cut_and_unconstrained_neighbours(llm):
    """max_tokens first: finish "length" with a JSON prefix; a free request in the same batch gets exactly
    the tokens it gets alone."""
    prompt = llm.tokenizer.encode("The capital of France is")
    free = SamplingParams(max_new_tokens=12, temperature=0)
    alone = run(LLMEngine(llm.model, llm.tokenizer, num_blocks=64), prompt, [free])[0]
    engine = LLMEngine(llm.model, llm.tokenizer, num_blocks=64)
    cut, together = run(engine, prompt, [SamplingParams(max_new_tokens=1, json_schema=JSON_OBJECT), free])
    assert cut[1] == "length" and cut[0].startswith("{") and json_prefix(cut[0]) != "bad"
    assert together == alone


def test_speculative_drafts_are_verified_under_the_mask(llm):
    """Prompt-lookup drafts get the mask of their own position: the same JSON as without speculation,
    greedy and seeded, with some drafts accepted."""
    prompt = llm.tokenizer.encode('{"n": 1, "tag": "abc"} ' * 3)
    schemas = (JSON_OBJECT, json.dumps(SCHEMA))
    params = [
        SamplingParams(max_new_tokens=40, temperature=t, seed=s, json_schema=js)
        for s in range(2)
        for t in (0, 1.0)
        for js in schemas
    ]
    plain = run(LLMEngine(llm.model, llm.tokenizer, num_blocks=256), prompt, params)
    engine = LLMEngine(llm.model, llm.tokenizer, num_blocks=256, speculative="prompt_lookup")
    assert run(engine, prompt, params) == plain
    assert engine.spec_stats.accepted > 0


def test_refusals(llm):
    engine = LLMEngine(llm.model, llm.tokenizer, num_blocks=64)
    with pytest.raises(ValueError, match="json_schema"):
        engine.validate([1, 2], SamplingParams(max_new_tokens=8, json_schema='{"type": "objekt"}'))
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema="[1, 2]")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(json_schema=JSON_OBJECT, ignore_eos=True)
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema=JSON_OBJECT, num_beams=2, temperature=0)
    json_params = SamplingParams(max_new_tokens=8, json_schema=JSON_OBJECT)
    with pytest.raises(ValueError, match="engine"):
        generate_tokens(llm.model, [1, 2], json_params, stop_ids=frozenset())
    no_text = LLMEngine(llm.model, None, num_blocks=64)
    with pytest.raises(ValueError, match="tokenizer"):
        no_text.validate([1, 2], json_params)
