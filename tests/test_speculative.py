"""Speculative decoding: greedy output == target-only greedy for both proposers and every k, full acceptance
when the draft is the target, the cache lifecycle, and the sampled path checked against exactly computed
target distributions (chi-square, fixed seeds, so the verdict is deterministic). Tiny random models only."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import pytest
import torch

from lmstack.config import NAMED_CONFIGS
from lmstack.generate import SamplingParams, draw, generate_tokens
from lmstack.generate.speculative import (
    DraftModelProposer,
    PromptLookupProposer,
    Proposer,
    SpecStats,
    accept_greedy,
    accept_sampled,
    accepted_length,
    ngram_continuation,
    speculative_generate_tokens,
)
from lmstack.models.transformer import Transformer

NO_STOP: frozenset[int] = frozenset()
# a vocabulary of 32 makes the random models repeat themselves, so prompt lookup finds matches that are
# sometimes right and sometimes wrong; a digits-of-pi prompt gives it n-grams to look up from the start
VOCAB = 32
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
DRAFT_SHAPE = dict(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models spend their time in op overhead; a second OpenMP thread on a shared CPU only adds waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int, vocab: int = VOCAB, head_scale: float = 1.0, **shape) -> Transformer:
    config = dataclasses.replace(
        NAMED_CONFIGS["llama-tiny"], name=f"llama-tiny-v{vocab}-s{seed}", vocab_size=vocab, **shape
    )
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.output.weight.mul_(head_scale)  # > 1: peaked distributions
    return model


@pytest.fixture(scope="module")
def target() -> Transformer:
    return tiny(0)


@pytest.fixture(scope="module")
def draft(target: Transformer) -> Transformer:
    """The target's first layer alone (a layer-skip draft): a different model that often agrees."""
    model = Transformer(dataclasses.replace(target.config, name="llama-tiny-first-layer", n_layers=1)).eval()
    kept = {k: v for k, v in target.state_dict().items() if not k.startswith("layers.1.")}
    model.load_state_dict(kept)
    return model


def ids(events) -> list[int]:
    return [e.token_id for e in events]


def reference(model: Transformer, params: SamplingParams, stop_ids=NO_STOP, prompt=PROMPT) -> list:
    return list(generate_tokens(model, prompt, params, stop_ids=stop_ids))


def speculate(model, params, proposer: Proposer, stop_ids=NO_STOP, prompt=PROMPT, stats=None) -> list:
    return list(speculative_generate_tokens(model, prompt, params, proposer, stop_ids=stop_ids, stats=stats))


def proposers(kind: str, k: int, target: Transformer, draft: Transformer) -> Proposer:
    if kind == "draft":
        return DraftModelProposer(draft, k)
    if kind == "self":
        return DraftModelProposer(copy.deepcopy(target), k)  # a copy: the draft owns its own KV cache
    return PromptLookupProposer(k)


# --- greedy: token-for-token parity with the target alone ----------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_greedy_equals_target_only_greedy(target, draft, kind, k):
    params = SamplingParams(max_new_tokens=40, temperature=0)
    stats = SpecStats()
    events = speculate(target, params, proposers(kind, k, target, draft), stats=stats)
    assert events == reference(target, params)  # ids and finish reasons
    assert stats.tokens == 40 and stats.target_forwards < 40  # some drafts were accepted ...
    assert stats.accepted < stats.proposed  # ... and some rejected, so both branches ran
    assert target.cache_len == 0 and draft.cache_len == 0


@pytest.mark.parametrize("kind", ["draft", "lookup", "self"])
@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 8, 9, 13])
def test_max_new_tokens_is_exact_when_several_tokens_land_at_once(target, draft, kind, max_new):
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    events = speculate(target, params, proposers(kind, 4, target, draft))
    assert events == reference(target, params)
    assert len(events) == max_new and events[-1].finish_reason == "length"


@pytest.mark.parametrize("kind", ["draft", "lookup", "self"])
@pytest.mark.parametrize("at", [0, 1, 3, 6, 10])
def test_stop_token_inside_an_accepted_run(target, draft, kind, at):
    params = SamplingParams(max_new_tokens=30, temperature=0)
    plain = ids(reference(target, params))
    stop = plain[at]
    first = plain.index(stop)
    for via in ("stop_ids", "params"):  # the tokenizer's EOS ids, or the request's stop_token_ids
        p = dataclasses.replace(params, stop_token_ids=(stop,)) if via == "params" else params
        stop_ids = frozenset({stop}) if via == "stop_ids" else NO_STOP
        events = speculate(target, p, proposers(kind, 7, target, draft), stop_ids=stop_ids)
        assert events == reference(target, p, stop_ids)
        assert ids(events) == plain[: first + 1] and events[-1].finish_reason == "stop"
    ignored = dataclasses.replace(params, ignore_eos=True)
    assert (
        ids(speculate(target, ignored, proposers(kind, 7, target, draft), stop_ids=frozenset({stop})))
        == plain
    )


def test_draft_equal_to_target_accepts_everything(target):
    params = SamplingParams(max_new_tokens=30, temperature=0)
    stats = SpecStats()
    events = speculate(target, params, proposers("self", 4, target, target), stats=stats)
    assert events == reference(target, params)
    assert stats.acceptance_rate == 1.0
    # the prefill gives 1 token, then 29 come in verifications of up to 5 (k = 4): 6 rounds
    assert stats.target_forwards == 1 + 6 and stats.tokens_per_forward == 30 / 7


def test_penalties_and_logprobs_follow_the_target_only_path(target, draft):
    params = SamplingParams(
        max_new_tokens=30,
        temperature=0,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        logprobs=3,
    )
    want = reference(target, params)
    assert ids(want) != ids(reference(target, SamplingParams(max_new_tokens=30, temperature=0)))
    for kind in ("draft", "lookup", "self"):
        got = speculate(target, params, proposers(kind, 4, target, draft))
        assert ids(got) == ids(want)
        torch.testing.assert_close(
            torch.tensor([[e.logprob, *(lp for _, lp in e.top_logprobs)] for e in got]),
            torch.tensor([[e.logprob, *(lp for _, lp in e.top_logprobs)] for e in want]),
        )
        assert [[t for t, _ in e.top_logprobs] for e in got] == [[t for t, _ in e.top_logprobs] for e in want]


# --- lifecycle and argument checks ---------------------------------------------------------------------
def test_caches_are_released_when_the_consumer_stops_early(target, draft):
    params = SamplingParams(max_new_tokens=30, temperature=0)
    stream = speculative_generate_tokens(
        target, PROMPT, params, DraftModelProposer(draft, 4), stop_ids=NO_STOP
    )
    next(stream)
    next(stream)
    assert target.cache_len > 0 and draft.cache_len > 0
    stream.close()
    assert target.cache_len == 0 and draft.cache_len == 0


def test_arguments_are_refused_with_reasons(target):
    proposer = PromptLookupProposer(4)
    with pytest.raises(ValueError, match="context window"):
        speculative_generate_tokens(
            target, PROMPT, SamplingParams(max_new_tokens=200), proposer, stop_ids=NO_STOP
        )
    with pytest.raises(ValueError, match="num_beams"):
        beams = SamplingParams(max_new_tokens=4, temperature=0, num_beams=2)
        speculative_generate_tokens(target, PROMPT, beams, proposer, stop_ids=NO_STOP)
    with pytest.raises(ValueError, match="vocabulary"):
        speculate(target, SamplingParams(max_new_tokens=4), DraftModelProposer(tiny(2, vocab=64), 2))
    assert target.cache_len == 0
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupProposer(4, max_ngram=1, min_ngram=2)


def test_ngram_continuation_prefers_the_longest_then_the_latest_match():
    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 2, 3]
    assert ngram_continuation(seq, 2, max_ngram=3, min_ngram=1) == [7, 8]  # latest "2 3"
    assert ngram_continuation([4, 1, 2, 3, 5, 6, 9, 2, 3, 7, 1, 2, 3], 3, 3, 1) == [5, 6, 9]  # "1 2 3" wins
    assert ngram_continuation([1, 2, 3], 4, 3, 1) == []
    assert ngram_continuation([1, 2, 1], 4, 3, 1) == [2, 1]  # may run into the suffix itself
    assert ngram_continuation([5, 1, 2, 1], 4, 3, 2) == []  # no match of two tokens


def test_accept_greedy_keeps_the_agreeing_prefix_then_the_targets_token():
    logits = torch.nn.functional.one_hot(torch.tensor([4, 6, 1, 0]), 8).float()  # argmax 4, 6, 1, 0
    n, tokens = accept_greedy(logits, torch.tensor([4, 6, 2]))
    assert int(n) == 2 and tokens[: int(n) + 1].tolist() == [4, 6, 1]
    n, tokens = accept_greedy(logits, torch.tensor([4, 6, 1]))
    assert int(n) == 3 and tokens.tolist() == [4, 6, 1, 0]  # all kept, plus the bonus token


def test_accepted_length_counts_what_accept_greedy_keeps():
    """The engine's rule (on tokens it already sampled) is accept_greedy's count on argmax tokens."""
    g = torch.Generator().manual_seed(0)
    for k in range(5):
        for _ in range(20):
            logits, drafts = torch.randn(k + 1, 3, generator=g), torch.randint(0, 3, (k,), generator=g)
            n, tokens = accept_greedy(logits, drafts)
            assert accepted_length(tokens.tolist(), drafts.tolist()) == int(n)


# --- sampling: the emitted tokens have the target's distribution ---------------------------------------
def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts under probs; cells expecting fewer than 5 are pooled into one."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs, exp = counts[big].double(), expected[big]
    if not big.all():
        obs = torch.cat([obs, counts[~big].double().sum().view(1)])
        exp = torch.cat([exp, expected[~big].sum().view(1)])
    stat, df = ((obs - exp) ** 2 / exp).sum(), len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("deterministic", [False, True])
def test_accept_sampled_rows_have_the_target_distribution(deterministic):
    """Rows that do not depend on the drafts are a valid (context-free) model, so token i, whenever it is
    emitted by this verification, must follow p_i: a direct check of accept, residual and bonus rows."""
    V, k, trials = 6, 2, 6_000
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(k + 1, V, generator=g) * 1.5).log_softmax(-1)
    p = logp.exp()
    q = (logp[:k] + torch.randn(k, V, generator=g)).softmax(-1)  # a draft that is close, not equal
    counts = torch.zeros(k + 1, V)
    for _ in range(trials):
        drafts = p[:k].argmax(-1) if deterministic else draw(q, g)
        n, tokens = accept_sampled(p, drafts, None if deterministic else q, g)
        n_accepted, *emitted = torch.cat([n.view(1), tokens]).tolist()
        for i, token in enumerate(emitted[: n_accepted + 1]):
            counts[i, token] += 1
    assert counts[k].sum() > 500  # enough all-accepted rounds to test the bonus row
    for i in range(k + 1):
        assert chi_square_p(counts[i], p[i]) > 1e-3, i


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_sampled_speculation_matches_the_exact_target_distribution(kind):
    """Joint law of the first three tokens (8**3 outcomes) over seeded runs vs the target's exact law from
    full forwards. With k = 2 and max_new_tokens = 4, tokens 2 and 3 come out of one verification through
    acceptance and rejection (residual) draws, with warping (temperature, top-k) on. The bonus row is
    checked by the test above."""
    V, runs, temperature, top_k = 8, 700, 0.9, 6
    target = tiny(0, vocab=V, head_scale=4.0, n_layers=1)
    draft = tiny(1, vocab=V, head_scale=2.0, **DRAFT_SHAPE)  # flatter and different: accepts about a fifth
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]  # lookup proposes the cycle; the target often disagrees
    stats, counts = SpecStats(), torch.zeros(V**3)
    for seed in range(runs):
        params = SamplingParams(max_new_tokens=4, temperature=temperature, top_k=top_k, seed=seed)
        proposer = DraftModelProposer(draft, 2) if kind == "draft" else PromptLookupProposer(2)
        t1, t2, t3, _ = ids(speculate(target, params, proposer, prompt=prompt, stats=stats))
        counts[(t1 * V + t2) * V + t3] += 1
    assert 0.1 < stats.acceptance_rate < 0.9
    want = exact_law(target, prompt, 3, temperature, top_k)
    assert chi_square_p(counts, want) > 1e-3
    if kind == "draft":  # the test can tell apart a law halfway to the draft's
        assert chi_square_p(counts, 0.5 * (want + exact_law(draft, prompt, 3, temperature, top_k))) < 1e-6


@torch.no_grad()
def exact_law(model: Transformer, prompt: list[int], horizon: int, temperature: float, top_k: int):
    """(V**horizon,) probability of every continuation, by enumerating all of them in batched forwards."""
    V = model.config.vocab_size
    law, seqs = torch.ones(1, dtype=torch.float64), torch.tensor([prompt])
    for _ in range(horizon):
        logits = model(seqs)[:, -1].float() / temperature  # (N, V)
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
        law = (law[:, None] * logits.softmax(-1).double()).reshape(-1)  # (N * V,)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(len(seqs))[:, None]], dim=1)
    return law
