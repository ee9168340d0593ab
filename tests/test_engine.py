"""The engine against the simple path: every request of a mixed, chunked, preempted batch gets exactly the
tokens and text `generate_text` gives it alone. Plus sampling, stop strings, abort and the AsyncEngine.
Tiny random models and a real word-level `Tokenizer` (each id decodes to "w<id>")."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from lmstack.config import NAMED_CONFIGS, ModelConfig
from lmstack.engine import AsyncEngine, LLMEngine, RequestOutput
from lmstack.generate import SamplingParams, generate_text
from lmstack.models import layers
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import Tokenizer

GEMMA3_TINY = ModelConfig(
    name="gemma3-tiny", family="gemma3", vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=1,
    head_dim=32, hidden_dim=128, max_seq_len=128, norm_eps=1e-6, norm_unit_offset=True, post_norms=True,
    mlp="geglu", qk_norm=True, attn_scale=24**-0.5, sliding_window=7,
    layer_types=("local", "local", "global"), rope_base=1e6, rope_local_base=1e4, embed_scale=8.0,
)  # fmt: skip
# Gemma 2's knobs on top: attention and final logit soft-capping (the explicit attention path), linear RoPE
GEMMA2_TINY = GEMMA3_TINY.with_(name="gemma2-tiny", attn_softcap=20.0, final_softcap=15.0, rope_scaling=4.0)
CONFIGS = {
    c.name: c for c in [*map(NAMED_CONFIGS.get, ["llama-tiny", "gpt2-tiny"]), GEMMA3_TINY, GEMMA2_TINY]
}
GREEDY = dict(temperature=0.0)


def tiny(name: str = "llama-tiny") -> Transformer:
    """Random weights scaled so that attention decides the argmax: with default init, tied embeddings (and
    Gemma's embed scale) dominate the logits and a broken mask or position would not change a token."""
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "embeddings" in n:
                p.normal_(0, 0.1)
            elif p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
            else:  # norms and biases
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads waiting on
    each other at every op make these tests ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    backend = Backend(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, eos_id=0)


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


@dataclass
class Collected:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    outputs: list[RequestOutput] = field(default_factory=list)

    def add(self, out: RequestOutput) -> None:
        assert not (self.outputs and self.outputs[-1].finished), "output after the final one"
        self.tokens += out.new_token_ids
        self.text += out.text_delta
        self.outputs.append(out)

    @property
    def last(self) -> RequestOutput:
        return self.outputs[-1]


def run(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]):
    """Add requests at the given steps, step until done; -> {request_id: Collected}."""
    got: dict[str, Collected] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            got[rid] = Collected()
        for out in engine.step():
            got[out.request_id].add(out)
        step += 1
        assert step < 2000
    return got


def assert_matches_simple_path(model, tok, got: Collected, prompt, params):
    ref = generate_text(model, tok, prompt, params)
    assert got.tokens == ref.token_ids
    assert got.text == ref.text
    assert got.last.finished and got.last.finish_reason == ref.finish_reason
    assert got.last.completion_tokens == len(ref.token_ids) and got.last.prompt_tokens == len(prompt)
    return ref


# --- greedy parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,caching", [("llama-tiny", True), ("llama-tiny", False), ("gpt2-tiny", True), ("gemma3-tiny", True),
                     ("gemma2-tiny", True)],
)  # fmt: skip
@pytest.mark.parametrize("native", [True, False], ids=["native-ops", "pytorch"])
def test_mixed_batch_greedy_equals_simple_path(tok, name, caching, native, monkeypatch):
    """7 requests, prompts up to 60 tokens (budget 16: chunked), staggered arrivals, a shared prefix, and
    a 30-block pool of 4 tokens: preemption and recompute happen, and change no token. Attention runs
    through the native paged-attention op or the PyTorch gather + SDPA path."""
    monkeypatch.setattr(layers, "USE_FUSED_OPS", native)
    model = tiny(name)
    ps = prompts(3, 9, 20, 37, 45, 60, 6)
    ps[6] = ps[4][:32] + ps[6]  # shares 8 blocks with request 4
    max_new = [20, 5, 30, 12, 25, 8, 15]
    reqs = [
        (f"r{i}", p, SamplingParams(max_new_tokens=n, **GREEDY))
        for i, (p, n) in enumerate(zip(ps, max_new, strict=True))
    ]
    engine = LLMEngine(
        model, tok, block_size=4, num_blocks=30, max_num_batched_tokens=16, enable_prefix_caching=caching
    )
    got = run(engine, {0: reqs[:3], 2: reqs[3:5], 5: reqs[5:]})
    for rid, prompt, params in reqs:
        assert_matches_simple_path(model, tok, got[rid], prompt, params)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.kv_usage == 0 and stats.num_running == stats.num_waiting == 0
    assert (stats.prefix_cache_hit_rate > 0) == caching
    assert stats.prompt_tokens_total == sum(map(len, ps))
    assert stats.generation_tokens_total == sum(len(g.tokens) for g in got.values())


def test_outputs_stream_one_token_per_step_with_times(tok):
    model = tiny()
    engine = LLMEngine(model, tok, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, **GREEDY)
    outs = run(engine, {0: [("a", prompts(20)[0], params)]})["a"].outputs
    assert [len(o.new_token_ids) for o in outs] == [1, 1, 1, 1]  # the prefill chunks emit nothing
    assert [o.completion_tokens for o in outs] == [1, 2, 3, 4]
    assert [o.finished for o in outs] == [False, False, False, True]
    assert outs[0].first_token_time is not None and outs[0].first_token_time >= outs[0].arrival_time


# --- sampling --------------------------------------------------------------------------------------------
def test_seeded_sampling_is_the_same_alone_in_a_batch_and_on_the_simple_path(tok):
    model = tiny()
    p = prompts(12, 5, 30, 8, seed=3)
    seeded = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    others = [
        ("greedy", p[1], SamplingParams(max_new_tokens=15, **GREEDY)),
        ("other-seed", p[2], SamplingParams(max_new_tokens=25, temperature=1.3, min_p=0.05, seed=7)),
        ("unseeded", p[3], SamplingParams(max_new_tokens=10, temperature=0.7)),
        (
            "penalized",
            p[1],
            SamplingParams(max_new_tokens=12, temperature=0.8, repetition_penalty=1.2, seed=3),
        ),
    ]

    def engine():  # 16 blocks: the batch preempts, and "s" resumes its random stream where it left it
        return LLMEngine(model, tok, block_size=4, num_blocks=16, max_num_batched_tokens=16)

    alone = run(engine(), {0: [("s", p[0], seeded)]})["s"]
    batched = engine()
    batch = run(batched, {0: others[:2], 1: others[2:], 3: [("s", p[0], seeded)]})  # "s": the youngest
    assert batched.stats().num_preemptions > 0
    assert batch["s"].tokens == alone.tokens
    assert_matches_simple_path(model, tok, alone, p[0], seeded)
    assert_matches_simple_path(model, tok, batch["other-seed"], p[2], others[1][2])
    assert_matches_simple_path(model, tok, batch["penalized"], p[1], others[3][2])


def test_penalties_and_logprobs_match_simple_path(tok):
    model = tiny()
    p = prompts(10, 25)
    params = [
        SamplingParams(max_new_tokens=20, repetition_penalty=1.5, presence_penalty=0.5, logprobs=3, **GREEDY),
        SamplingParams(max_new_tokens=20, frequency_penalty=1.0, logprobs=0, temperature=0.8, seed=5),
    ]
    engine = LLMEngine(model, tok, block_size=4, num_blocks=40, max_num_batched_tokens=16)
    got = run(engine, {0: [(f"r{i}", p[i], params[i]) for i in range(2)]})
    for i in range(2):
        ref = assert_matches_simple_path(model, tok, got[f"r{i}"], p[i], params[i])
        lps = [lp for o in got[f"r{i}"].outputs for lp in o.logprobs or []]
        assert len(lps) == len(ref.logprobs)
        for lp, ev in zip(lps, ref.logprobs, strict=True):
            assert lp.token_id == ev.token_id and lp.logprob == pytest.approx(ev.logprob, abs=1e-4)
            assert [t for t, _ in lp.top] == [t for t, _ in ev.top_logprobs]
            assert [v for _, v in lp.top] == pytest.approx([v for _, v in ev.top_logprobs], abs=1e-4)


def test_stop_strings_cut_the_text_and_free_the_blocks(tok):
    model = tiny()
    p = prompts(7, 16, seed=5)
    free = generate_text(model, tok, p[0], SamplingParams(max_new_tokens=30, ignore_eos=True, **GREEDY)).text
    stop = free[12:17]  # spans token boundaries ("w123 w45" pieces)
    params = [
        SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop,), **GREEDY),
        SamplingParams(max_new_tokens=30, ignore_eos=True, stop=("zzz",), **GREEDY),
    ]
    engine = LLMEngine(model, tok, block_size=4, num_blocks=40, max_num_batched_tokens=16)
    got = run(engine, {0: [("a", p[0], params[0]), ("b", p[1], params[1])]})
    ref = assert_matches_simple_path(model, tok, got["a"], p[0], params[0])
    assert ref.finish_reason == "stop" and stop not in got["a"].text and len(got["a"].tokens) < 30
    assert_matches_simple_path(model, tok, got["b"], p[1], params[1])
    assert engine.stats().kv_usage == 0


# --- lifecycle -------------------------------------------------------------------------------------------
def test_abort_frees_blocks_now_and_reports_once(tok):
    engine = LLMEngine(tiny(), tok, block_size=4, num_blocks=64, max_num_batched_tokens=64)
    long = SamplingParams(max_new_tokens=50, ignore_eos=True, **GREEDY)
    engine.add_request("a", prompts(30)[0], long)
    engine.add_request("b", prompts(5)[0], long)
    engine.add_request("c", prompts(40, seed=2)[0], long)  # still waiting: budget 64
    engine.step()
    engine.step()
    assert engine.stats().kv_usage > 0
    for rid in ("a", "b", "c"):
        engine.abort(rid)
    assert engine.stats().kv_usage == 0 and engine.has_unfinished()
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["a", "b", "c"]
    assert all(o.finished and o.finish_reason == "abort" and not o.new_token_ids for o in outs)
    assert not engine.has_unfinished() and engine.step() == []
    engine.abort("unknown")  # no-op


def test_a_failed_step_aborts_its_batch_and_the_engine_goes_on(tok, monkeypatch):
    model = tiny()
    engine = LLMEngine(model, tok, block_size=4, num_blocks=64, max_num_batched_tokens=16)
    params = SamplingParams(max_new_tokens=5, **GREEDY)
    engine.add_request("a", prompts(20)[0], params)
    engine.step()
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda so: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        engine.step()
    monkeypatch.setattr(engine.runner, "execute", real)
    assert engine.stats().kv_usage == 0
    (out,) = engine.step()
    assert out.request_id == "a" and out.finish_reason == "abort"
    p = prompts(20)[0] + [7, 8, 9]  # blocks named for the failed step must not be served as hits
    got = run(engine, {0: [("b", p, params)]})
    assert_matches_simple_path(model, tok, got["b"], p, params)


def test_add_request_refusals(tok):
    engine = LLMEngine(tiny(), tok, block_size=4, num_blocks=10)  # 40 token slots
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("a", [], ok)
    with pytest.raises(ValueError, match="context window"):
        engine.add_request("a", [1] * 120, SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="KV cache capacity"):
        engine.add_request("a", [1] * 30, SamplingParams(max_new_tokens=11))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        engine.add_request("a", [1, 512], ok)
    engine.add_request("a", [1, 2], ok)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 2], ok)


def test_kv_memory_budget_sets_the_block_count(tok):
    model = tiny()  # llama-tiny: 2 layers x 2 kv heads x 16 dims x K,V x fp32 = 512 bytes per token
    engine = LLMEngine(model, tok, block_size=16, kv_cache_memory_bytes=100 * 512 * 16 + 1)
    assert engine.kv_manager.num_blocks == 100


# --- AsyncEngine -----------------------------------------------------------------------------------------
async def collect(ae: AsyncEngine, rid: str, prompt, params) -> Collected:
    got = Collected()
    async for out in ae.generate(rid, prompt, params):
        got.add(out)
    return got


def test_async_concurrent_generates_complete_and_match(tok):
    model = tiny()
    ps = prompts(3, 17, 30, 8, 22, 11)
    params = [SamplingParams(max_new_tokens=5 + 3 * i, **GREEDY) for i in range(len(ps))]

    async def main():
        ae = AsyncEngine(LLMEngine(model, tok, block_size=4, num_blocks=40, max_num_batched_tokens=16))
        ae.start()
        results = await asyncio.gather(*(collect(ae, f"r{i}", ps[i], params[i]) for i in range(len(ps))))
        await ae.shutdown()
        return results, ae.stats()

    results, stats = asyncio.run(main())
    for got, p, sp in zip(results, ps, params, strict=True):
        assert_matches_simple_path(model, tok, got, p, sp)
    assert stats.kv_usage == 0 and stats.num_running == 0


def test_async_cancelled_consumer_aborts_and_frees(tok):
    async def main():
        ae = AsyncEngine(LLMEngine(tiny(), tok, block_size=4, num_blocks=64))
        ae.start()
        first = asyncio.Event()

        async def consume():
            async for _ in ae.generate("c", [1, 2, 3], SamplingParams(max_new_tokens=100, ignore_eos=True)):
                first.set()
                await asyncio.sleep(3600)  # a slow client

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        busy = ae.stats()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if ae.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        await ae.shutdown()
        return busy, ae.stats()

    busy, after = asyncio.run(main())
    assert busy.kv_usage > 0
    assert after.kv_usage == 0 and after.num_running == 0 and after.generation_tokens_total < 100


def test_async_shutdown_drains_running_and_refuses_new(tok):
    async def main():
        ae = AsyncEngine(LLMEngine(tiny(), tok, block_size=4, num_blocks=64))
        ae.start()
        params = SamplingParams(max_new_tokens=30, ignore_eos=True, **GREEDY)
        tasks = [asyncio.create_task(collect(ae, f"r{i}", [i + 1, 7, 9], params)) for i in range(4)]
        await asyncio.sleep(0.05)
        await ae.shutdown(drain=True)
        with pytest.raises(RuntimeError, match="shutting down"):
            await collect(ae, "late", [1, 2], params)
        return await asyncio.gather(*tasks)

    for got in asyncio.run(main()):
        assert len(got.tokens) == 30 and got.last.finish_reason == "length"


def test_async_shutdown_without_drain_aborts(tok):
    async def main():
        ae = AsyncEngine(LLMEngine(tiny(), tok, block_size=4, num_blocks=64))
        ae.start()
        params = SamplingParams(max_new_tokens=100, ignore_eos=True, **GREEDY)
        task = asyncio.create_task(collect(ae, "r", [1, 2, 3], params))
        await asyncio.sleep(0.05)
        await ae.shutdown(drain=False)
        return await task, ae.stats()

    got, stats = asyncio.run(main())
    assert got.last.finish_reason == "abort" and len(got.tokens) < 100 and stats.kv_usage == 0


def test_async_queue_full_and_abort(tok):
    async def main():
        ae = AsyncEngine(LLMEngine(tiny(), tok, block_size=4, num_blocks=64), max_waiting=2)
        params = SamplingParams(max_new_tokens=3, **GREEDY)
        # not started: accepted requests wait in the queue
        gens = [ae.generate(f"r{i}", [1, 2, 3], params) for i in range(3)]
        firsts = [asyncio.create_task(anext(g)) for g in gens[:2]]
        await asyncio.sleep(0)
        with pytest.raises(AsyncEngine.QueueFull):
            await anext(gens[2])
        await ae.abort("r1")
        ae.start()
        first = await firsts[0]
        aborted = await firsts[1]
        rest = [out async for out in gens[0]]
        await ae.shutdown()
        return first, aborted, rest

    first, aborted, rest = asyncio.run(main())
    assert aborted.finish_reason == "abort" and aborted.finished
    assert len(first.new_token_ids) + sum(len(o.new_token_ids) for o in rest) in (1, 2, 3)
    assert (rest[-1] if rest else first).finished
