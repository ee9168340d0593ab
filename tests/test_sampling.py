"""Sampling parameters and the pure logit functions, checked against Hugging Face's processors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmstack.generate.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    draw,
    make_generator,
    min_p_filter,
    prompt_mask,
    sample,
    top_k_filter,
    top_p_filter,
    update_counts_,
)

# --- SamplingParams ------------------------------------------------------------------------------------
INVALID = [
    ("max_new_tokens", 0),
    ("max_new_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -3.0),
    ("seed", -1),
    ("seed", 1.5),
    ("stop", ("ok", "")),
    ("stop_token_ids", (3, -1)),
    ("ignore_eos", 1),
    ("num_beams", 0),
    ("length_penalty", float("inf")),
    ("logprobs", -1),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_field_names_field_value_and_range(field, value):
    with pytest.raises(
        ValueError, match=rf"{field}={value!r}".replace("(", r"\(").replace(")", r"\)")
    ) as err:
        SamplingParams(**{field: value})
    assert "must be" in str(err.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0.7},
        {"repetition_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"stop": "x"},
        {"logprobs": 2},
    ],
)
def test_beam_search_refuses_what_it_would_ignore(changes):
    base = {"temperature": 0.0, "num_beams": 3}
    with pytest.raises(ValueError, match=rf"{next(iter(changes))}=.*num_beams=3"):
        SamplingParams(**{**base, **changes})
    SamplingParams(**base)  # plain deterministic beams are fine


def test_stop_normalization():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    hash(SamplingParams(stop=["a"]))  # frozen and hashable after normalization


# --- against Hugging Face ------------------------------------------------------------------------------
def _same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], theirs[kept])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_hf(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 100, generator=g) * 3
    ids = torch.randint(0, 100, (4, 10), generator=g)
    for k in (1, 5, 40):
        _same_filter(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        _same_filter(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))
    for m in (0.01, 0.1, 0.5):
        _same_filter(min_p_filter(logits, m), MinPLogitsWarper(m)(ids, logits.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    prompt = torch.randint(0, 50, (3, 6), generator=g)
    output = torch.randint(0, 50, (3, 4), generator=g)
    counts = torch.zeros(3, 50, dtype=torch.int32)
    for t in output.T:
        update_counts_(counts, t)
    ours = apply_penalties(logits, counts, prompt_mask(prompt, 50), repetition_penalty=penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.cat([prompt, output], 1), logits.clone())
    torch.testing.assert_close(ours, theirs)


# --- semantics -----------------------------------------------------------------------------------------
def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: (~torch.isinf(top_p_filter(logits, p))).sum().item()  # noqa: E731
    assert kept(0.75) == 2
    assert kept(0.81) == 3
    assert kept(0.96) == 4
    assert kept(1e-6) == 1  # the top token always stays
    assert kept(1.0) == 4


def test_min_p_is_relative_to_the_top_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isinf(min_p_filter(logits, 0.2)).tolist() == [[False, False, False, True]]  # threshold 0.1
    assert torch.isinf(min_p_filter(logits, 0.7)).tolist() == [[False, True, True, True]]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_presence_and_frequency_penalties_touch_only_generated_tokens():
    logits = torch.zeros(1, 6)
    counts = torch.tensor([[0, 1, 3, 0, 0, 0]], dtype=torch.int32)
    mask = torch.tensor([[True, False, False, False, False, False]])  # token 0 only in the prompt
    out = apply_penalties(logits, counts, mask, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0, 0.0]]
    neg = apply_penalties(logits, counts, mask, presence_penalty=-1.0)
    assert neg.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]


def test_per_row_knobs_equal_scalar_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 30, generator=g)
    counts = torch.randint(0, 3, (3, 30), generator=g, dtype=torch.int32)
    rows = {
        "top_k": ([0, 4, 12], top_k_filter),
        "top_p": ([1.0, 0.5, 0.9], top_p_filter),
        "min_p": ([0.0, 0.1, 0.3], min_p_filter),
        "temperature": ([0.0, 0.5, 2.0], apply_temperature),
    }
    for values, fn in rows.values():
        batched = fn(logits, torch.tensor(values))
        for r, v in enumerate(values):
            torch.testing.assert_close(batched[r : r + 1], fn(logits[r : r + 1], v))
    rp, pp, fp = torch.tensor([1.0, 1.5, 0.8]), torch.tensor([0.0, 0.5, -0.5]), torch.tensor([0.2, 0.0, 1.0])
    batched = apply_penalties(logits, counts, None, rp, pp, fp)
    for r in range(3):
        single = apply_penalties(
            logits[r : r + 1], counts[r : r + 1], None, rp[r].item(), pp[r].item(), fp[r].item()
        )
        torch.testing.assert_close(batched[r : r + 1], single)


def test_greedy_is_argmax_and_ignores_filters():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, top_k=3, top_p=0.1)
    assert torch.equal(sample(logits, params), logits.argmax(-1))


def test_seed_determinism_on_a_flat_distribution():
    flat = torch.zeros(1, 1000)
    params = SamplingParams(seed=0)

    def tokens(seed: int) -> list[int]:
        g = make_generator(seed, flat.device)
        return [int(sample(flat, params, g).item()) for _ in range(20)]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_draw_frequencies_and_per_row_generators():
    probs = torch.tensor([0.7, 0.2, 0.1]).expand(4000, 3)
    ids = draw(probs, make_generator(0, "cpu"))
    freq = torch.bincount(ids, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)
    assert draw(torch.tensor([[0.0, 1.0, 0.0]])).item() == 1
    # a seeded row draws the same token alone (simple path) or inside a batch (engine)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    probs = logits.softmax(-1)
    alone = [draw(probs[r : r + 1], make_generator(10 + r, "cpu")).item() for r in range(3)]
    batched = draw(probs, [make_generator(10 + r, "cpu") for r in range(3)]).tolist()
    assert alone == batched


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    cold = apply_temperature(logits, 0.5).softmax(-1)[0, 0].item()
    assert cold > logits.softmax(-1)[0, 0].item()
    assert math.isclose(cold, 1 / (1 + math.exp(-2)), rel_tol=1e-6)
