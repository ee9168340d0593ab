"""Speculative decoding inside the engine (prompt lookup): drafts verified in the flattened batch change no
token. Every request of a mixed, chunked, preempted batch gets exactly what the engine without speculation
and the simple path give it -- greedy, seeded sampling, penalties, logprobs, stop ids, stop strings and
length limits cutting a step's accepted run -- and the runner's results are recorded to show that steps
really did emit several tokens and really were cut.

The model that makes prompt lookup pay off is a tiny Llama whose two layers are sliding-window (6): its
next token depends on the last 11 tokens only (RoPE is relative), so a prompt `P + O + P`, where P has at
least 11 tokens and O is the model's own continuation of P, is continued by O again: a quote that prompt
lookup finds in the prompt."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from test_engine import CONFIGS, GREEDY, assert_matches_simple_path, one_thread, prompts, run, tiny, tok

from lmstack.config import NAMED_CONFIGS
from lmstack.engine import LLMEngine
from lmstack.engine.runner import RunnerOutput
from lmstack.generate import SamplingParams, generate_text
from lmstack.models.transformer import Transformer

__all__ = ["one_thread", "tok"]  # test_engine's fixtures, used here: one torch thread, a word-level tokenizer

_LLAMA = NAMED_CONFIGS["llama-tiny"]
CONFIGS["llama-local"] = _LLAMA.with_(name="llama-local", sliding_window=6, layer_types=("local",) * 2)


@pytest.fixture(scope="module")
def quoter():
    model = tiny("llama-local")
    with torch.no_grad():
        model.output.weight.mul_(4)  # peaked distributions: sampling mostly follows the quote too
    return model


def quoting_prompt(model, tok, n: int, seed: int, quote: int = 16) -> list[int]:
    """P + (the model's greedy continuation of P) + P, for P of n >= 11 tokens."""
    (p,) = prompts(n, seed=seed)
    cont = generate_text(model, tok, p, SamplingParams(max_new_tokens=quote, **GREEDY)).token_ids
    return p + cont + p


def spy(engine: LLMEngine) -> dict[str, list[list[int]]]:
    """Record what the runner returned per request, step by step (the real runner runs)."""
    returned: dict[str, list[list[int]]] = defaultdict(list)
    execute = engine.runner.execute

    def recording(so) -> RunnerOutput:
        result = execute(so)
        for rid, tokens in result.sampled_token_ids.items():
            returned[rid].append(tokens)
        return result

    engine.runner.execute = recording  # type: ignore[method-assign]
    return returned


def engines(model, tok, **kw) -> tuple[LLMEngine, LLMEngine]:
    """(with prompt lookup, without), the same small pool and budget."""
    spec = LLMEngine(model, tok, speculative="prompt_lookup", num_speculative_tokens=6, **kw)
    return spec, LLMEngine(model, tok, **kw)


# --- greedy ------------------------------------------------------------------------------------------------
def test_greedy_with_prompt_lookup_equals_the_engine_without_and_the_simple_path(quoter, tok):
    q = [quoting_prompt(quoter, tok, n, seed=11 + i) for i, n in enumerate([12, 13, 14, 11])]
    free = generate_text(quoter, tok, q[1], SamplingParams(max_new_tokens=24, **GREEDY)).token_ids
    assert free[3] not in free[:3]  # so a stop id there ends the output there
    stop_text = f" w{free[5]} w{free[6]}"
    rnd = prompts(3, 37, seed=2)
    G = SamplingParams(max_new_tokens=24, **GREEDY)
    reqs = [
        ("quote", q[0], G),
        ("stop-id", q[1], SamplingParams(max_new_tokens=24, stop_token_ids=(free[3],), **GREEDY)),
        ("stop-string", q[1], SamplingParams(max_new_tokens=24, stop=(stop_text,), **GREEDY)),
        ("max-tokens", q[2], SamplingParams(max_new_tokens=5, **GREEDY)),
        ("one-token", q[3], SamplingParams(max_new_tokens=1, **GREEDY)),
        ("random-short", rnd[0], G),
        ("random-long", rnd[1], SamplingParams(max_new_tokens=12, **GREEDY)),  # a chunked prefill
        ("quote-again", q[0], G),  # prefix-cache hits on "quote"
    ]
    arrivals = {0: reqs[:4], 2: reqs[4:7], 6: reqs[7:]}
    spec, plain = engines(quoter, tok, block_size=4, num_blocks=24, max_num_batched_tokens=16)
    returned = spy(spec)
    got, base = run(spec, arrivals), run(plain, arrivals)
    for rid, prompt, params in reqs:
        assert_matches_simple_path(quoter, tok, got[rid], prompt, params)
        assert got[rid].tokens == base[rid].tokens and got[rid].text == base[rid].text

    # several tokens per step, accepted runs cut by a stop id, a stop string and the length limit
    assert max(len(t) for t in returned["quote"]) == 7  # 6 drafts accepted + the target's token
    assert got["stop-id"].last.finish_reason == "stop" and got["stop-id"].tokens == free[:4]
    assert len(returned["stop-id"][-1]) > len(got["stop-id"].last.new_token_ids) > 1
    assert got["stop-string"].last.finish_reason == "stop" and stop_text not in got["stop-string"].text
    assert len(returned["stop-string"][-1]) > len(got["stop-string"].last.new_token_ids) > 1
    assert [len(t) for t in returned["max-tokens"]] == [1, 4]  # drafts trimmed to the room left
    assert returned["one-token"] == [got["one-token"].tokens]

    stats, plain_stats = spec.stats(), plain.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total  # rejections too
    assert stats.spec_acceptance_rate == stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total
    assert plain_stats.spec_draft_tokens_total == 0 and math.isnan(plain_stats.spec_acceptance_rate)
    assert stats.generation_tokens_total == plain_stats.generation_tokens_total
    assert stats.kv_usage == 0 and stats.num_running == stats.num_waiting == 0
    assert spec.spec_stats.tokens_per_forward > 1.2


@pytest.mark.parametrize("name", ["gemma3-tiny", "gpt2-tiny"])
def test_greedy_parity_on_other_architectures(tok, name):
    """Mixed local/global windows (Gemma 3) and learned positions (GPT-2): verification chunks read the
    paged cache like prefill chunks; their random weights loop, so lookup proposes, right and wrong."""
    model = tiny(name)
    ps = prompts(5, 20, 33, seed=4)
    reqs = [(f"r{i}", p, SamplingParams(max_new_tokens=20 + i, **GREEDY)) for i, p in enumerate(ps)]
    spec, _ = engines(model, tok, block_size=4, num_blocks=40, max_num_batched_tokens=16)
    got = run(spec, {0: reqs})
    for rid, prompt, params in reqs:
        assert_matches_simple_path(model, tok, got[rid], prompt, params)
    assert spec.stats().spec_accepted_tokens_total > 0 and spec.stats().kv_usage == 0


# --- sampling ----------------------------------------------------------------------------------------------
def test_seeded_sampling_and_penalties_draw_the_non_speculative_tokens(quoter, tok):
    """A seeded request's generator is rewound to the draws of the tokens it kept, so speculation changes
    no token: the same as the engine without it and the simple path, logprobs included."""
    q = [quoting_prompt(quoter, tok, n, seed=11 + i) for i, n in enumerate([12, 15, 14])]
    reqs = [
        ("top-k-p", q[0], SamplingParams(max_new_tokens=24, temperature=0.1, top_k=20, top_p=0.9, seed=1)),
        ("min-p-logprobs", q[1], SamplingParams(max_new_tokens=20, temperature=0.2, min_p=0.1, seed=2,
                                                logprobs=2)),
        ("penalized", q[2], SamplingParams(max_new_tokens=20, temperature=0.4, repetition_penalty=1.3,
                                           frequency_penalty=0.5, seed=3)),
        ("greedy-penalized", q[0], SamplingParams(max_new_tokens=20, presence_penalty=2.0,
                                                  frequency_penalty=2.0, logprobs=1, **GREEDY)),
    ]  # fmt: skip
    spec, plain = engines(quoter, tok, block_size=4, num_blocks=40, max_num_batched_tokens=16)
    returned = spy(spec)
    got, base = run(spec, {0: reqs[:2], 3: reqs[2:]}), run(plain, {0: reqs[:2], 3: reqs[2:]})
    for rid, prompt, params in reqs:
        ref = assert_matches_simple_path(quoter, tok, got[rid], prompt, params)
        assert got[rid].tokens == base[rid].tokens
        lps = [lp for o in got[rid].outputs for lp in o.logprobs or []]
        assert len(lps) == (len(ref.logprobs) if params.logprobs is not None else 0)
        for lp, ev in zip(lps, ref.logprobs or [], strict=True):
            assert lp.token_id == ev.token_id and lp.logprob == pytest.approx(ev.logprob, abs=1e-4)
            assert [t for t, _ in lp.top] == [t for t, _ in ev.top_logprobs]
    assert spec.stats().num_preemptions > 0
    sampled_runs = [len(t) for rid in ("top-k-p", "min-p-logprobs", "penalized") for t in returned[rid]]
    assert max(sampled_runs) == 7  # sampled rows accepted all their drafts ...
    assert spec.stats().spec_accepted_tokens_total < spec.stats().spec_draft_tokens_total  # ... and rejected


def test_unseeded_top_k_1_is_greedy_and_unseeded_sampling_stays_in_top_k(quoter, tok):
    q = quoting_prompt(quoter, tok, 12, seed=31)
    spec, _ = engines(quoter, tok, block_size=4, num_blocks=64, max_num_batched_tokens=64)
    params = [
        SamplingParams(max_new_tokens=20, temperature=1.0, top_k=1),
        SamplingParams(max_new_tokens=20, temperature=1.5, top_k=3),
    ]
    got = run(spec, {0: [("k1", q, params[0]), ("k3", q, params[1])]})
    greedy = generate_text(quoter, tok, q, SamplingParams(max_new_tokens=20, **GREEDY)).token_ids
    assert got["k1"].tokens == greedy
    ids = torch.tensor([q + got["k3"].tokens])
    with torch.inference_mode():
        logits = quoter(ids, torch.arange(ids.shape[1]))[0, len(q) - 1 : -1]  # (T, V) predicting each token
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in row for t, row in zip(got["k3"].tokens, top3.tolist(), strict=True))
    assert spec.stats().spec_accepted_tokens_total > 0


# --- configuration -----------------------------------------------------------------------------------------
def test_speculative_options_are_checked(tok):
    model = tiny()
    with pytest.raises(ValueError, match="speculative"):
        LLMEngine(model, tok, num_blocks=8, speculative="medusa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLMEngine(model, tok, num_blocks=8, speculative="prompt_lookup", num_speculative_tokens=0)


# --- draft model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_kind", ["same", "other"])
def test_draft_model_greedy_and_seeded_equal_the_simple_path(tok, draft_kind):
    """A draft model with the target's vocabulary drafts for every running request from its own per-request
    KV cache. The target itself as draft is always right (full acceptance); a different model is mostly
    wrong. Either way each request gets the simple path's tokens, under preemption, and finished requests
    leave no draft cache behind."""
    target = tiny("llama-tiny")
    draft = target if draft_kind == "same" else tiny("llama-local")
    ps = prompts(5, 14, 30, 9, seed=7)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=20, seed=5)
    reqs = [(f"g{i}", p, SamplingParams(max_new_tokens=12 + 3 * i, **GREEDY)) for i, p in enumerate(ps[:3])]
    reqs.append(("seeded", ps[3], sampled))
    engine = LLMEngine(
        target, tok, block_size=4, num_blocks=26, max_num_batched_tokens=16,
        speculative="draft_model", num_speculative_tokens=3, draft_model=draft,
    )  # fmt: skip
    got = run(engine, {0: reqs[:2], 3: reqs[2:]})
    for rid, prompt, params in reqs:
        assert_matches_simple_path(target, tok, got[rid], prompt, params)
    stats = engine.stats()
    assert stats.spec_draft_tokens_total > 0 and stats.kv_usage == 0
    if draft_kind == "same":  # greedy drafts of the target: every greedy request accepts them all
        assert stats.spec_acceptance_rate > 0.7 and engine.spec_stats.tokens_per_forward > 2
    else:
        assert stats.spec_acceptance_rate < 0.7
    assert not engine.proposer._caches and not engine.proposer._fed  # type: ignore[union-attr]


def test_draft_model_options_are_checked(tok):
    target = tiny("llama-tiny")
    with pytest.raises(ValueError, match="go together"):
        LLMEngine(target, tok, num_blocks=8, speculative="draft_model")
    other_vocab = Transformer(
        NAMED_CONFIGS["llama-tiny"].with_(vocab_size=NAMED_CONFIGS["llama-tiny"].vocab_size + 1)
    )
    with pytest.raises(ValueError, match="tokenizer"):
        LLMEngine(target, tok, num_blocks=8, speculative="draft_model", draft_model=other_vocab)


def test_no_drafting_while_more_requests_run_than_the_cap(quoter, tok):
    """speculative_max_running=1: with two requests running nobody drafts; once one finishes, the other
    drafts again. The tokens are the simple path's either way."""
    q = [quoting_prompt(quoter, tok, n, seed=21 + i) for i, n in enumerate([12, 13])]
    reqs = [
        ("short", q[0], SamplingParams(max_new_tokens=3, **GREEDY)),
        ("long", q[1], SamplingParams(max_new_tokens=24, **GREEDY)),
    ]
    engine = LLMEngine(
        quoter, tok, block_size=4, num_blocks=40, max_num_batched_tokens=64,
        speculative="prompt_lookup", num_speculative_tokens=4, speculative_max_running=1,
    )  # fmt: skip
    returned = spy(engine)
    got = run(engine, {0: reqs})
    for rid, prompt, params in reqs:
        assert_matches_simple_path(quoter, tok, got[rid], prompt, params)
    assert all(len(t) == 1 for t in returned["short"])  # always in company: never drafted
    assert max(len(t) for t in returned["long"]) > 1  # alone after "short" finished: drafts again
    with pytest.raises(ValueError, match="speculative_max_running"):
        LLMEngine(quoter, tok, num_blocks=8, speculative="prompt_lookup", speculative_max_running=0)
