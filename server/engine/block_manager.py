"""Paged KV bookkeeping and the prefix cache, without torch.

The KV memory is ``num_blocks`` blocks of ``block_size`` token positions each. Every sequence owns a block
table (block ids in order: token ``i`` lives in block ``table[i // block_size]`` at offset
``i % block_size``). Blocks are reference-counted: a full block can be shared read-only by every sequence
whose tokens up to and including that block are the same, under the same adapter version.

Prefix cache. A block whose ``block_size`` positions have all been computed gets a hash chained over the
blocks before it and keyed by the adapter version's digest::

    hash_i = H(hash_{i-1}, token_ids of block i, digest)

so two adapters never share KV, and an adapter reloaded under the same name with new weights (a new
digest) never meets the old version's blocks. A block whose last reference goes keeps its hash and joins
an LRU of free cached blocks; allocation takes never-cached free blocks first, then evicts the least
recently freed cached block (its hash is forgotten). A hit on a free cached block takes it back out of
the LRU. Only full blocks are ever shared, and a sequence writes only past its shared prefix, so no block
is written while shared.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from dataclasses import dataclass, field

BlockHash = bytes


def block_hash(parent: BlockHash | None, token_ids: list[int], digest: str) -> BlockHash:
    """The prefix-cache key of one full block: its parent's hash, its tokens and the adapter digest."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(digest.encode())
    h.update(b"\0")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class NoFreeBlocksError(RuntimeError):
    """The block pool cannot hold what was asked; the scheduler preempts or waits (never a user error)."""


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = None


@dataclass(slots=True)
class _Table:
    """One sequence's blocks and how many of them carry a prefix-cache hash."""

    digest: str
    blocks: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: BlockHash | None = None


@dataclass(slots=True)
class PrefixCacheStats:
    """Counted in tokens, as vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    """Block tables, reference counts and the prefix cache over ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: collections.deque[int] = collections.deque(range(num_blocks))  # never-cached free
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._by_hash: dict[BlockHash, int] = {}
        self._tables: dict[str, _Table] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could take now (free cached blocks count: they are evicted on demand)."""
        return len(self._free) + len(self._cached_free)

    @property
    def usage(self) -> float:
        """The share of blocks held by live sequences (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id].blocks

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def cached_prefix(self, token_ids: list[int], digest: str) -> int:
        """Tokens of ``token_ids`` an ``allocate`` now would find cached (changes nothing, counts nothing)."""
        if not self.enable_prefix_caching:
            return 0
        return len(self._lookup(token_ids, digest)) * self.block_size

    # ------------------------------------------------------------------------------------ changes

    def allocate(
        self, seq_id: str, token_ids: list[int], digest: str, num_new_tokens: int, *, lookup: bool = True
    ) -> int:
        """Give a new sequence its block table: the longest cached prefix of ``token_ids`` (full blocks,
        always leaving at least one token to compute, so the step has a logit to sample from), plus fresh
        blocks for the next ``num_new_tokens`` tokens after it (fewer if the prompt ends first). Returns
        the number of cached tokens. ``NoFreeBlocksError`` (and nothing held) if the pool is short.
        ``lookup=False``: compute every token (its blocks are still hashed for others once computed)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        table = _Table(digest)
        hits = self._lookup(token_ids, digest) if self.enable_prefix_caching and lookup else []
        cached = len(hits) * self.block_size
        num_new = min(num_new_tokens, len(token_ids) - cached)
        fresh = self.blocks_for(cached + num_new) - len(hits)
        # a hit on a free cached block takes it out of the free pool too
        reclaimed = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if fresh + reclaimed > self.num_free_blocks:
            raise NoFreeBlocksError(f"{fresh + reclaimed} blocks needed, {self.num_free_blocks} free")
        if self.enable_prefix_caching and lookup:
            self.stats.queries += len(token_ids)
            self.stats.hits += cached
        for block_id in hits:
            self._take(block_id)
        table.blocks = hits
        table.num_hashed = len(hits)
        table.last_hash = self._blocks[hits[-1]].hash if hits else None
        self._tables[seq_id] = table
        self._grow(table, fresh)
        return cached

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the sequence's table can be extended to hold ``num_tokens`` tokens now."""
        return self.blocks_for(num_tokens) - len(self._tables[seq_id].blocks) <= self.num_free_blocks

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Extend the sequence's table to hold ``num_tokens`` tokens (``NoFreeBlocksError`` if short)."""
        table = self._tables[seq_id]
        missing = self.blocks_for(num_tokens) - len(table.blocks)
        if missing > self.num_free_blocks:
            raise NoFreeBlocksError(f"{missing} blocks needed, {self.num_free_blocks} free")
        self._grow(table, missing)

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """The first ``num_computed`` tokens of the sequence have KV now: hash the blocks that became full,
        so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        full = min(num_computed // self.block_size, len(table.blocks))
        bs = self.block_size
        for i in range(table.num_hashed, full):
            h = block_hash(table.last_hash, token_ids[i * bs : (i + 1) * bs], table.digest)
            block = self._blocks[table.blocks[i]]
            if h not in self._by_hash:  # another sequence may have computed the same block first
                block.hash = h
                self._by_hash[h] = block.block_id
            table.last_hash = h
        table.num_hashed = max(table.num_hashed, full)

    def free(self, seq_id: str) -> None:
        """Drop the sequence's references; its hashed blocks stay cached (LRU) until evicted. Freed in
        reverse order, so a later sequence's eviction takes the tail of a prefix before its head."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        for block_id in reversed(table.blocks):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None:
                self._cached_free[block_id] = None
            else:
                self._free.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (free cached blocks become plain free blocks)."""
        for block_id in list(self._cached_free):
            self._forget(self._blocks[block_id])
            self._free.append(block_id)
        self._cached_free.clear()
        for block in self._blocks:
            if block.hash is not None:
                self._forget(block)
        for table in self._tables.values():
            table.num_hashed = len(table.blocks)  # never re-hash blocks the cache no longer indexes

    # ------------------------------------------------------------------------------------ internals

    def _lookup(self, token_ids: list[int], digest: str) -> list[int]:
        bs = self.block_size
        hits: list[int] = []
        parent: BlockHash | None = None
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, token_ids[i * bs : (i + 1) * bs], digest)
            block_id = self._by_hash.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._cached_free.pop(block_id, None)
        block.ref_count += 1

    def _grow(self, table: _Table, count: int) -> None:
        for _ in range(count):
            if self._free:
                block = self._blocks[self._free.popleft()]
            else:
                block_id, _ = self._cached_free.popitem(last=False)
                block = self._blocks[block_id]
                self._forget(block)
            block.ref_count = 1
            table.blocks.append(block.block_id)

    def _forget(self, block: _Block) -> None:
        if block.hash is not None and self._by_hash.get(block.hash) == block.block_id:
            del self._by_hash[block.hash]
        block.hash = None
