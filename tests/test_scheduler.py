"""The scheduler as pure policy: plain Request records and a real KV manager, no model. A fake sampler feeds
back token ids, so every invariant is checked over whole runs: budget, chunking, preemption, FCFS."""

from __future__ import annotations

import pytest

from lmstack.engine.kv_cache import KVCacheManager, hash_block
from lmstack.engine.request import Request, RequestStatus
from lmstack.engine.scheduler import Scheduler, SchedulerOutput


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, caching=True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=1024)


def add(s: Scheduler, rid: str, n_prompt: int, max_new: int, first: int = 1, stop=()) -> Request:
    r = Request(rid, list(range(first, first + n_prompt)), max_new, frozenset(stop))
    s.add_request(r)
    return r


def step(s: Scheduler, token: int = 500) -> SchedulerOutput:
    out = s.schedule()
    assert out.total_num_scheduled_tokens <= s.max_num_batched_tokens
    assert s.num_running <= s.max_num_seqs
    for x in out.scheduled:  # a block table always covers what the step writes
        assert len(x.block_ids) * s.kv.block_size >= x.num_computed_tokens + len(x.token_ids)
    s.update(out, {x.request_id: [token] for x in out.scheduled if x.sample})
    return out


def run(s: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished():
        outs.append(step(s))
        assert len(outs) < max_steps, "no progress"
    return outs


def test_chunked_prefill_splits_a_long_prompt():
    s = make(budget=16)
    r = add(s, "a", 50, 3)
    outs = run(s)
    chunks = [(x.num_computed_tokens, len(x.token_ids), x.sample) for o in outs for x in o.scheduled]
    prefill = [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert chunks == [*prefill, (50, 1, True), (51, 1, True)]
    assert r.output_ids == [500] * 3 and r.status is RequestStatus.FINISHED_LENGTH
    assert s.kv.usage() == 0


def test_budget_and_max_num_seqs_are_respected_and_everyone_finishes():
    s = make(budget=10, max_seqs=3)
    sizes = [(3, 5), (25, 2), (7, 9), (1, 4), (12, 1)]
    reqs = [add(s, f"r{i}", n, m, first=100 * i) for i, (n, m) in enumerate(sizes)]
    outs = run(s)
    assert all(o.total_num_scheduled_tokens <= 10 for o in outs)
    assert max(len(o.scheduled) for o in outs) == 3  # the seq cap binds
    assert [r.num_output_tokens for r in reqs] == [5, 2, 9, 4, 1]
    assert s.kv.usage() == 0


def test_running_requests_go_before_admissions():
    s = make(budget=8)
    add(s, "a", 4, 5)
    step(s)
    add(s, "b", 20, 1)
    out = step(s)
    assert [(x.request_id, len(x.token_ids)) for x in out.scheduled] == [("a", 1), ("b", 7)]


def test_preempts_the_youngest_which_later_completes_with_its_tokens():
    s = make(num_blocks=8, block_size=4, budget=32)
    a = add(s, "a", 10, 14, first=0)  # grows to 24 tokens = 6 blocks
    b = add(s, "b", 6, 10, first=50)  # grows to 16 tokens = 4 blocks: both cannot fit in 8
    preempted, resumed = [], 0
    while s.has_unfinished():
        tokens_before = list(b.token_ids)
        out = s.schedule()
        preempted += out.preempted_ids
        if "b" in out.resumed_ids:  # recompute catches up over prompt + earlier outputs, then samples
            resumed += 1
            (x,) = [x for x in out.scheduled if x.request_id == "b"]
            assert x.sample and x.token_ids == tokens_before[x.num_computed_tokens :]
            assert len(tokens_before) > 6
        s.update(out, {x.request_id: [500] for x in out.scheduled if x.sample})
    assert preempted and set(preempted) == {"b"} and resumed == len(preempted)
    assert s.num_preemptions == b.num_preemptions == len(preempted)
    assert a.num_output_tokens == 14 and b.num_output_tokens == 10
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH and s.kv.usage() == 0


def test_a_request_preempts_itself_when_it_is_the_youngest():
    s = make(num_blocks=4, block_size=2, budget=16)
    add(s, "a", 3, 4)  # 2 -> 4 blocks over its life
    add(s, "b", 3, 4, first=20)
    out = step(s)
    assert [x.request_id for x in out.scheduled] == ["a", "b"]
    outs = [step(s) for _ in range(2)]
    assert any("b" in o.preempted_ids and "b" not in o.num_scheduled_tokens for o in outs)
    run(s)


def test_first_come_first_served_no_overtaking():
    s = make(num_blocks=6, block_size=4, budget=64)
    add(s, "old", 12, 8)  # 3 blocks, grows to 5
    step(s)
    add(s, "big", 16, 4, first=100)  # needs 4 blocks: does not fit next to "old"
    add(s, "small", 2, 2, first=200)  # would fit, but must not overtake "big"
    admitted = []
    for o in run(s):
        admitted += [n.request_id for n in o.new_requests]
        if "big" not in admitted:
            assert "small" not in admitted
    assert admitted == ["big", "small"]


def test_preempted_requests_return_to_the_front_in_arrival_order():
    s = make(num_blocks=9, block_size=2, budget=64)
    for i in range(4):
        add(s, f"r{i}", 3, 6, first=10 * i)
    step(s)
    for _ in range(4):
        out = step(s)
        if out.preempted_ids:
            break
    assert out.preempted_ids == sorted(out.preempted_ids, reverse=True)  # youngest first
    waiting = [r.request_id for r in s.waiting]
    assert waiting == sorted(waiting)  # ... so the queue front is the oldest
    run(s)


def test_prefix_hits_count_as_computed_tokens():
    s = make(block_size=4, budget=64)
    add(s, "a", 20, 2)
    run(s)
    add(s, "b", 16, 1)  # same first 16 tokens; 3 full blocks are hits, the 4th holds the last token
    out = s.schedule()
    (x,) = out.scheduled
    assert x.num_computed_tokens == 12 and x.token_ids == list(range(13, 17)) and x.sample
    assert s.kv.prefix_cache_hit_rate() == pytest.approx(12 / 36)
    s.update(out, {"b": [500]})
    assert not s.has_unfinished()


def test_stop_token_and_abort_free_blocks_and_are_reported():
    s = make()
    a = add(s, "a", 5, 10, stop={500})
    b = add(s, "b", 5, 10, first=40)
    step(s)
    assert a.status is RequestStatus.FINISHED_STOPPED and a.output_ids == [500]
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert b.status is RequestStatus.FINISHED_ABORTED and s.kv.usage() == 0
    out = s.schedule()
    assert sorted(out.finished_ids) == ["a", "b"] and not out.scheduled
    assert not s.has_unfinished()


def test_duplicate_ids_are_refused():
    s = make()
    add(s, "a", 3, 1)
    with pytest.raises(ValueError, match="already in use"):
        add(s, "a", 3, 1)


# --- speculative decoding: drafts are computed tokens running ahead ---------------------------------------
def names(s: Scheduler, r: Request) -> list[bytes | None]:
    return [s.kv.pool.blocks[b].block_hash for b in s.kv.block_ids(r.request_id)]


def test_drafts_fit_budget_and_length_and_rejected_ones_are_taken_back():
    s = make(block_size=4, budget=8)
    r = add(s, "a", 6, 10)
    step(s)  # prefill: 6 prompt tokens + 1 output token, 6 computed
    r.spec_token_ids = [7, 8, 9, 10, 11, 12, 13, 14]
    out = s.schedule()
    (x,) = out.scheduled
    assert x.token_ids == [500, 7, 8, 9, 10, 11, 12, 13] and x.num_spec_tokens == 7 and x.sample  # budget 8
    assert x.num_computed_tokens == 6 and len(x.block_ids) == 4  # positions 6..13
    assert names(s, r)[1:] == [None] * 3  # names cover accepted tokens only: one full block of them
    s.update(out, {"a": [7, 8, 99]})  # drafts 7, 8 accepted, then the target's own token
    assert r.output_ids == [500, 7, 8, 99] and r.num_computed_tokens == r.num_tokens - 1 == 9
    assert len(s.kv.block_ids("a")) == 3 and s.kv.usage() == 3 / 64  # the rejected drafts' block is free
    r.spec_token_ids = [1] * 8
    (x,) = s.schedule().scheduled
    assert x.num_spec_tokens == 5  # 10 - 4 output tokens - 1: a verification never runs past the length
    assert names(s, r)[:2] == [
        hash_block(None, r.token_ids[:4]),
        hash_block(names(s, r)[0], r.token_ids[4:8]),
    ]
    s.update(SchedulerOutput([x]), {"a": [1, 1, 1, 1, 1, 2]})
    assert r.num_output_tokens == 10 and r.status is RequestStatus.FINISHED_LENGTH and s.kv.usage() == 0


def test_a_stop_id_inside_an_accepted_run_ends_it_there():
    s = make()
    r = add(s, "a", 5, 20, stop={42})
    step(s)
    r.spec_token_ids = [5, 42, 6]
    out = s.schedule()
    s.update(out, {"a": [5, 42, 6, 7]})
    assert r.output_ids == [500, 5, 42] and r.status is RequestStatus.FINISHED_STOPPED and s.kv.usage() == 0


def test_short_of_blocks_drafts_are_dropped_rather_than_anyone_preempted():
    s = make(num_blocks=4, block_size=4, budget=64)
    a = add(s, "a", 5, 20)
    add(s, "b", 5, 20, first=50)
    step(s)  # 6 tokens each: 2 blocks each, the pool is full, one free slot each
    a.spec_token_ids = [1, 2, 3]
    out = s.schedule()
    assert [(x.request_id, len(x.token_ids), x.num_spec_tokens) for x in out.scheduled] == [
        ("a", 1, 0),
        ("b", 1, 0),
    ]
    assert not out.preempted_ids
