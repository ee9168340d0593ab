"""The simple generate path: cache == full forward, parity with HF greedy and beam search, stop handling,
cache lifecycle and argument checks. Tiny random models only."""

from __future__ import annotations

import gc
import string

import pytest
import torch

from lmstack.config import NAMED_CONFIGS, ModelConfig
from lmstack.generate import (
    SamplingParams,
    StopStringMatcher,
    beam_search,
    generate_text,
    generate_tokens,
    stream_text,
)
from lmstack.models.transformer import Transformer

NO_STOP: frozenset[int] = frozenset()


def tiny(name: str = "llama-tiny", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(NAMED_CONFIGS[name]).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny()


class FakeTokenizer:
    """Each id is a 1-3 character piece, so stop strings start and end inside tokens."""

    eos_id = 0
    stop_ids = frozenset({0})

    def piece(self, i: int) -> str:
        return string.ascii_lowercase[i % 26] * (1 + i % 3)


class FakeDetokenizer:
    def __init__(self, tokenizer: FakeTokenizer) -> None:
        self.tok = tokenizer

    def push(self, token_id: int) -> str:
        return self.tok.piece(token_id)

    def flush(self) -> str:
        return ""


def text_run(model, prompt, params, tok=None):
    tok = tok or FakeTokenizer()
    stream = stream_text(model, tok, prompt, params, detokenizer=FakeDetokenizer(tok))
    deltas = list(stream)
    return deltas, stream.result()


PROMPT = [5, 17, 42, 7, 99]


# --- numerics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_cached_greedy_equals_full_forward_greedy(name):
    m = tiny(name)
    events = list(
        generate_tokens(m, PROMPT, SamplingParams(max_new_tokens=30, temperature=0), stop_ids=NO_STOP)
    )
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert [e.token_id for e in events] == ids[len(PROMPT) :]
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    assert m.cache_len == 0


HF_TO_LMSTACK = {
    "model.embed_tokens": "tok_embeddings",
    "model.layers": "layers",
    "model.norm": "norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.w1",
    "mlp.up_proj": "mlp.w3",
    "mlp.down_proj": "mlp.w2",
}


@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.2,  # peaked distributions: no near-ties for float noise to flip
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    config = ModelConfig(
        name="hf-llama",
        vocab_size=128,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        max_seq_len=128,
        norm_eps=1e-5,
        tie_embeddings=False,
    )
    ours = Transformer(config).eval()
    state = {}
    for key, value in hf.state_dict().items():
        for theirs, mine in HF_TO_LMSTACK.items():
            key = key.replace(theirs, mine)
        state[key] = value
    ours.load_state_dict(state, strict=True)
    return hf, ours


def test_greedy_matches_transformers(hf_pair):
    hf, ours = hf_pair
    out = hf.generate(
        torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    events = generate_tokens(ours, PROMPT, SamplingParams(max_new_tokens=20, temperature=0), stop_ids=NO_STOP)
    assert [e.token_id for e in events] == out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_matches_transformers(hf_pair, length_penalty, early_stopping):
    hf, ours = hf_pair
    prompt = torch.tensor([PROMPT])
    greedy = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(greedy[0, len(PROMPT) + 6])  # a token the model likes: some hypotheses end with it
    out = hf.generate(
        prompt,
        max_new_tokens=12,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        output_scores=True,
        return_dict_in_generate=True,
    )
    hyps = beam_search(
        ours,
        PROMPT,
        num_beams=3,
        max_new_tokens=12,
        stop_ids=frozenset({eos}),
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    best = out.sequences[0, len(PROMPT) :].tolist()
    if hyps[0].stopped:  # HF pads the shorter n-best rows to the longest one
        best = best[: best.index(eos) + 1]
    assert list(hyps[0].token_ids) == best
    torch.testing.assert_close(torch.tensor([h.score for h in hyps]), out.sequences_scores, rtol=0, atol=1e-4)
    assert ours.cache_len == 0
    via_params = SamplingParams(
        max_new_tokens=12, temperature=0, num_beams=3, length_penalty=length_penalty, stop_token_ids=(eos,)
    )
    if not early_stopping:  # the default of generate_tokens' beam path
        events = list(generate_tokens(ours, PROMPT, via_params, stop_ids=NO_STOP))
        assert [e.token_id for e in events] == list(hyps[0].token_ids)
        assert events[-1].finish_reason == ("stop" if hyps[0].stopped else "length")


def test_beam_search_exercises_finished_hypotheses(hf_pair):
    _, ours = hf_pair
    greedy = [
        e.token_id for e in generate_tokens(ours, PROMPT, SamplingParams(8, temperature=0), stop_ids=NO_STOP)
    ]
    hyps = beam_search(
        ours, PROMPT, num_beams=3, max_new_tokens=12, stop_ids=frozenset({greedy[6]}), length_penalty=0.5
    )
    assert any(h.stopped for h in hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_beams_through_the_text_layer(model):
    hyps = beam_search(model, PROMPT, num_beams=2, max_new_tokens=6, stop_ids=NO_STOP)
    assert len(hyps) == 2 and all(len(h.token_ids) == 6 and not h.stopped for h in hyps)
    params = SamplingParams(max_new_tokens=6, temperature=0, num_beams=2)
    _, res = text_run(model, PROMPT, params, FakeTokenizer())
    assert res.token_ids == list(hyps[0].token_ids) and res.finish_reason == "length"
    assert res.text == "".join(FakeTokenizer().piece(t) for t in res.token_ids)


def test_logprobs_are_the_raw_model_distribution(model):
    params = SamplingParams(max_new_tokens=5, temperature=0, logprobs=3)
    events = list(generate_tokens(model, PROMPT, params, stop_ids=NO_STOP))
    ids = PROMPT + [e.token_id for e in events]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0, len(PROMPT) - 1 : -1].float(), -1)  # (5, V)
    for i, e in enumerate(events):
        assert e.logprob == pytest.approx(lp[i, e.token_id].item(), abs=1e-5)
        assert [t for t, _ in e.top_logprobs] == lp[i].topk(3).indices.tolist()
        assert e.top_logprobs[0][0] == e.token_id  # greedy picks the top token


def test_seeded_sampling_is_reproducible(model):
    def run(seed):
        params = SamplingParams(max_new_tokens=20, temperature=1.5, seed=seed)
        return [e.token_id for e in generate_tokens(model, PROMPT, params, stop_ids=NO_STOP)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    penalized = SamplingParams(
        max_new_tokens=20, temperature=0, repetition_penalty=1.5, frequency_penalty=1.0
    )
    tokens = [e.token_id for e in generate_tokens(model, PROMPT, penalized, stop_ids=NO_STOP)]
    assert len(set(tokens)) > len(tokens) // 2


# --- stopping ------------------------------------------------------------------------------------------
def test_stop_matcher_holds_back_possible_prefixes():
    m = StopStringMatcher(("o w", "xyz"))
    assert m.push("hel") == ("hel", False)
    assert m.push("lo") == ("l", False)  # "o" could start "o w"
    assert m.push(" there") == ("o there", False)  # false alarm released
    assert m.push("x") == ("", False)
    assert m.push("yzzz") == ("", True)
    m = StopStringMatcher(("o w",))
    assert m.push("hello") == ("hell", False)
    assert m.push(" world") == ("", True)


def test_stop_string_split_across_tokens_is_cut_and_never_emitted(model):
    params = SamplingParams(max_new_tokens=40, temperature=0)
    _, full = text_run(model, PROMPT, params)
    assert full.finish_reason == "length"
    starts = [0]
    for t in full.token_ids:
        starts.append(starts[-1] + len(FakeTokenizer().piece(t)))
    for start in (starts[3] + 1, starts[5] + 1, starts[8]):  # inside a token, spanning into the next ones
        stop = full.text[start : start + 4]
        deltas, res = text_run(
            model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0, stop=[stop, "@@"])
        )
        assert res.finish_reason == "stop"
        assert res.text == "".join(deltas) == full.text[: full.text.find(stop)]
        assert all(stop not in d for d in deltas)
        assert model.cache_len == 0


def test_stop_token_ids_eos_and_ignore_eos(model):
    tok = FakeTokenizer()
    greedy = generate_text(
        model, tok, PROMPT, SamplingParams(20, temperature=0), detokenizer=FakeDetokenizer(tok)
    )
    target = greedy.token_ids[5]
    first = greedy.token_ids.index(target)
    by_param = generate_tokens(
        model, PROMPT, SamplingParams(20, temperature=0, stop_token_ids=[target]), stop_ids=NO_STOP
    )
    events = list(by_param)
    assert [e.token_id for e in events] == greedy.token_ids[: first + 1]
    assert events[-1].finish_reason == "stop"

    class EosTokenizer(FakeTokenizer):
        stop_ids = frozenset({target})

    eos_tok = EosTokenizer()
    res = generate_text(
        model, eos_tok, PROMPT, SamplingParams(20, temperature=0), detokenizer=FakeDetokenizer(eos_tok)
    )
    assert res.finish_reason == "stop" and res.token_ids == greedy.token_ids[: first + 1]
    assert res.text == "".join(tok.piece(t) for t in res.token_ids[:-1])  # the stop token is not text
    assert res.completion_tokens == first + 1 and res.prompt_tokens == len(PROMPT)
    ignored = generate_text(
        model,
        eos_tok,
        PROMPT,
        SamplingParams(20, temperature=0, ignore_eos=True),
        detokenizer=FakeDetokenizer(eos_tok),
    )
    assert ignored.finish_reason == "length" and ignored.token_ids == greedy.token_ids


def test_max_new_tokens_gives_length(model):
    tok = FakeTokenizer()
    res = generate_text(
        model, tok, PROMPT, SamplingParams(7, temperature=0), detokenizer=FakeDetokenizer(tok)
    )
    assert res.finish_reason == "length" and res.completion_tokens == 7 and res.logprobs is None


def test_early_consumer_exit_clears_the_cache(model):
    it = generate_tokens(model, PROMPT, SamplingParams(20), stop_ids=NO_STOP)
    assert model.cache_len == 0  # nothing runs before the first next()
    next(it)
    assert model.cache_len > 0
    it.close()
    assert model.cache_len == 0

    for _ in generate_tokens(model, PROMPT, SamplingParams(20), stop_ids=NO_STOP):
        break  # the abandoned generator is collected
    gc.collect()
    assert model.cache_len == 0

    tok = FakeTokenizer()
    stream = stream_text(
        model, tok, PROMPT, SamplingParams(20, temperature=0), detokenizer=FakeDetokenizer(tok)
    )
    next(stream)
    stream.close()
    assert model.cache_len == 0
    with pytest.raises(RuntimeError, match="not finished"):
        stream.result()


# --- argument checks -----------------------------------------------------------------------------------
def test_prompt_beyond_context_names_both_numbers(model):
    ctx = model.config.max_seq_len
    with pytest.raises(ValueError, match=rf"100 tokens.*max_new_tokens=50.*{ctx}.*by 22") as err:
        generate_tokens(model, [1] * 100, SamplingParams(max_new_tokens=50), stop_ids=NO_STOP)
    assert "max_new_tokens to 28" in str(err.value)
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate_tokens(model, [1] * (ctx + 5), SamplingParams(max_new_tokens=1), stop_ids=NO_STOP)
    generate_tokens(
        model, [1] * 100, SamplingParams(max_new_tokens=28), stop_ids=NO_STOP
    ).close()  # fits exactly


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_tokens(model, [], SamplingParams(), stop_ids=NO_STOP)
    with pytest.raises(ValueError, match="empty prompt"):
        beam_search(model, [], num_beams=2, max_new_tokens=3, stop_ids=NO_STOP)
