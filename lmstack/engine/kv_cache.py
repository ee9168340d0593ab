"""Paged KV cache: fixed-size blocks of token slots, handed out by a pool, shared through a prefix cache.

Three layers, each hiding the one below:
  BlockPool       block ids, reference counts, the free queue (LRU order) and the prefix-cache index;
  KVCacheManager  which blocks each request holds, prefix-cache lookups, `allocate_slots` / `free`;
  PagedKVCache    the tensors: per layer K and V of shape (num_blocks, block_size, nkv, hs).

Prefix caching: a full block is named by a hash of (parent block's hash, its token ids), so equal names mean
equal prefixes and therefore equal K/V. A freed block keeps its name and its data while its refcount is 0;
it sits in the free queue and is reused (its name dropped) only when the pool runs out of never-named
blocks, least recently freed first. A request whose prompt starts with named blocks takes them as already
computed tokens.

Layout: slot s of the cache is (block s // block_size, offset s % block_size), so writing the N new tokens
of a step is one `index_copy_` over the flattened (num_blocks * block_size) slot axis, and a request's keys
are `k[block_ids]` flattened: its tokens in position order, whatever blocks it got.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lmstack.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Name of a full block: 128-bit BLAKE2b over the parent's name and the tokens (collisions negligible,
    unlike Python's 64-bit `hash`, and stable across processes)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set while the block is in the prefix cache


class BlockPool:
    """Block ids with reference counts; free blocks wait in LRU order and may still be prefix-cached."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """n blocks with refcount 1, taken from the front of the free queue (evicting their cache names)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference to prefix-cache hits (pulling free ones out of the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the back of the free queue, in the given order
        (so pass a request's blocks tail first: its last blocks are evicted first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Name a full block; a name already taken by an identical block keeps its first owner."""
        if self.enable_caching and block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every name (after a failed forward whose blocks may hold garbage)."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()


class KVCacheManager:
    """Which blocks each request holds. The scheduler speaks tokens; this class turns them into blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of each request already named in the pool
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # ... and found there

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a request that holds no blocks yet -> (blocks, tokens they hold).

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching or request.num_computed_tokens:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self._hashes(request)[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[KVBlock] = ()
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (and after `computed_blocks`,
        prefix-cache hits being adopted now). False, changing nothing, if the pool is short."""
        held = self._blocks.setdefault(request.request_id, [])
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(held) - len(computed_blocks)
        reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # hits waiting in the free queue
        if need > self.pool.num_free_blocks - reclaimed:
            if not held:
                del self._blocks[request.request_id]
            return False
        if self.enable_prefix_caching and not held:  # admission: count the lookup once it succeeds
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(computed_blocks) * self.block_size
        self.pool.touch(computed_blocks)
        held.extend(computed_blocks)
        if need > 0:
            held.extend(self.pool.allocate(need))
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, held, min(total, request.num_tokens) // self.block_size)
        return True

    def free(self, request: Request) -> None:
        blocks = self._blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def free_tail(self, request: Request) -> None:
        """Give back the blocks past the request's tokens, which held only rejected draft tokens. None of
        them is named: names cover full blocks of `token_ids`, and drafts are never part of those."""
        held = self._blocks.get(request.request_id, [])
        keep = cdiv(request.num_tokens, self.block_size)
        if len(held) > keep:
            self.pool.free(reversed(held[keep:]))
            del held[keep:]

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        self._num_cached.clear()

    def _cache_full_blocks(self, request: Request, held: list[KVBlock], num_full: int) -> None:
        """Name the blocks that are full once this step's tokens are written. Their K/V land during the
        step's forward, layer by layer before any attention reads them, so a request admitted in the same
        step may already hit them."""
        start = self._num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hashes(request)
        for i in range(start, num_full):
            self.pool.cache(held[i], hashes[i])
        self._num_cached[request.request_id] = num_full

    def _hashes(self, request: Request) -> list[bytes]:
        """Names of all full blocks of the request's tokens, extended as tokens are appended."""
        bs, hashes, ids = self.block_size, request.block_hashes, request.token_ids
        for i in range(len(hashes), request.num_tokens // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, ids[i * bs : (i + 1) * bs]))
        return hashes


class PagedKVCache:
    """Per layer K and V, (num_blocks, block_size, nkv, hs): the memory the block ids point into."""

    def __init__(
        self, n_layers: int, num_blocks: int, block_size: int, n_kv: int, hs: int, dtype: torch.dtype, device
    ) -> None:
        shape = (num_blocks, block_size, n_kv, hs)
        # zeros, not empty: padded decode batches read (masked) slots never written, and NaN garbage
        # would survive the mask
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, n_kv: int, hs: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * n_kv * hs * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' k, v (N, nkv, hs) at flat slots (N,)."""
        kc, vc = self.k[layer], self.v[layer]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(vc.dtype))
