"""Paged KV cache: block pool refcounts and LRU eviction, prefix-cache hits, slot writes, and paged attention
against dense attention over the same keys."""

from __future__ import annotations

import pytest
import torch

from lmstack.engine.kv_cache import BlockPool, KVCacheManager, PagedKVCache, hash_block
from lmstack.engine.request import Request
from lmstack.engine.runner import _Span, paged_attention, plan_reads
from lmstack.models.attention import attend, attention_mask


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, max_new_tokens=8)


# --- BlockPool -----------------------------------------------------------------------------------------
def test_pool_allocate_free_refcount():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1] and pool.num_free_blocks == 1
    assert pool.usage() == pytest.approx(0.75)
    pool.touch(a[:1])  # shared by a second owner
    pool.free(a)
    assert a[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free(a[:1])
    assert pool.num_free_blocks == 4 and pool.usage() == 0
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_pool_evicts_least_recently_freed_cached_block():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]))
    pool.free([blocks[2], blocks[0], blocks[1]])  # free order = eviction order
    assert all(pool.lookup(bytes([i])) is blocks[i] for i in range(3))  # freed blocks stay cached
    (got,) = pool.allocate(1)
    assert got is blocks[2] and pool.lookup(bytes([2])) is None and got.block_hash is None
    assert pool.lookup(bytes([0])) is blocks[0]
    pool.touch([blocks[0]])  # a hit takes a cached free block back out of the free queue
    assert pool.num_free_blocks == 1 and pool.allocate(1)[0] is blocks[1]


def test_block_hash_chains_on_parent():
    h1 = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == h1
    assert hash_block(h1, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])


# --- KVCacheManager --------------------------------------------------------------------------------------
def test_allocate_slots_grows_by_blocks_and_refuses_without_side_effects():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10) and len(kv.block_ids("a")) == 3
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) and len(kv.block_ids("a")) == 3  # fits in the last block
    r.num_computed_tokens = 12
    assert not kv.allocate_slots(r, 8)  # would need 2 more blocks, 1 is free
    assert len(kv.block_ids("a")) == 3 and kv.pool.num_free_blocks == 1
    kv.free(r)
    assert kv.usage() == 0 and kv.block_ids("a") == []


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(12)))
    kv.allocate_slots(a, 12)  # all 3 blocks full -> named
    b = req("b", list(range(10)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, b.num_tokens - n, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2] and hits[0].ref_cnt == 2
    same = req("c", list(range(12)))  # an identical prompt: the last block is recomputed for its logits
    assert kv.get_computed_blocks(same)[1] == 8
    kv.free(a)
    kv.free(b)
    assert kv.usage() == 0
    hits, n = kv.get_computed_blocks(req("d", list(range(13))))  # cached blocks outlive their requests
    assert n == 12
    assert kv.prefix_cache_hit_rate() == pytest.approx(8 / 25)  # a: 0 of 12, b: 8 of 13


def test_cached_free_blocks_are_evicted_when_needed():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4, 5, 6])
    kv.allocate_slots(a, 6)
    kv.free(a)
    big = req("b", [7] * 7)
    assert kv.allocate_slots(big, 7)  # takes every block, evicting a's
    assert kv.get_computed_blocks(req("c", [1, 2, 3, 4, 5, 6, 0]))[1] == 0


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    kv.allocate_slots(req("a", list(range(12))), 12)
    assert kv.get_computed_blocks(req("b", list(range(12))))[1] == 0


# --- tensors -----------------------------------------------------------------------------------------------
def test_paged_cache_write_lands_in_slots():
    cache = PagedKVCache(1, num_blocks=3, block_size=2, n_kv=1, hs=2, dtype=torch.float32, device="cpu")
    k = torch.arange(6.0).view(3, 1, 2)
    cache.write(0, torch.tensor([5, 0, 2]), k, -k)
    assert torch.equal(cache.k[0][2, 1], k[0]) and torch.equal(cache.k[0][0, 0], k[1])
    assert torch.equal(cache.v[0][1, 0], -k[2])


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (5, 20.0)])
def test_paged_attention_matches_dense(window, softcap):
    """Two prefill chunks and two decodes, scattered over shuffled blocks, vs attend() on dense keys."""
    torch.manual_seed(0)
    bs, nkv, nh, hs, nblocks = 4, 2, 4, 8, 32
    cache = PagedKVCache(1, nblocks, bs, nkv, hs, torch.float32, "cpu")
    perm = torch.randperm(nblocks).tolist()
    lengths = [(0, 7), (5, 6), (12, 1), (9, 1)]  # (computed, new) per request
    spans, qs, dense, start = [], [], [], 0
    for r, (c, n) in enumerate(lengths):
        L = c + n
        blocks = perm[r * 8 : r * 8 + -(-L // bs)]
        k, v = torch.randn(L, nkv, hs), torch.randn(L, nkv, hs)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(L)])
        cache.write(0, slots, k, v)
        spans.append(_Span(start, start + n, c, blocks))
        qs.append(torch.randn(n, nh, hs))
        dense.append((k, v, c, L))
        start += n
    q = torch.cat(qs)
    plan = plan_reads(spans, window, bs, "cpu")
    y = paged_attention(q, cache.k[0], cache.v[0], plan, 0.3, softcap)
    for sp, qr, (k, v, c, L) in zip(spans, qs, dense, strict=True):
        mask = attention_mask(torch.arange(c, L), torch.arange(L), window)
        q1, k1, v1 = (t.transpose(0, 1)[None] for t in (qr, k, v))  # (1, heads, T or S, hs)
        ref = attend(q1, k1, v1, mask, 0.3, softcap)
        torch.testing.assert_close(y[sp.start : sp.end], ref[0].transpose(0, 1))
