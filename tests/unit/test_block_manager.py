"""Block manager without a model: tables, reference counts, prefix hashing keyed by adapter digest, LRU."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, NoFreeBlocksError, block_hash

BS = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def computed(bm: BlockManager, seq_id: str, ids: list[int]) -> None:
    """The sequence's whole ``ids`` were computed: hash its full blocks."""
    bm.commit(seq_id, ids, len(ids))


@pytest.mark.parametrize(
    ("num_tokens", "blocks"),
    [(1, 1), (BS - 1, 1), (BS, 1), (BS + 1, 2), (3 * BS, 3)],
)
def test_allocate_takes_enough_blocks_for_the_chunk(num_tokens: int, blocks: int) -> None:
    bm = BlockManager(8, BS)
    assert bm.allocate("a", tokens(num_tokens), "base", num_tokens) == 0
    assert len(bm.block_table("a")) == blocks
    assert bm.num_free_blocks == 8 - blocks


def test_allocate_only_the_first_chunk_then_grow() -> None:
    bm = BlockManager(8, BS)
    bm.allocate("a", tokens(20), "base", 5)
    assert len(bm.block_table("a")) == 2
    bm.grow("a", 20)
    assert len(bm.block_table("a")) == 5
    assert bm.can_grow("a", 21) is True
    bm.grow("a", 21)
    assert len(bm.block_table("a")) == 6


def test_short_pool_refuses_and_holds_nothing() -> None:
    bm = BlockManager(2, BS)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("a", tokens(3 * BS), "base", 3 * BS)
    assert bm.num_free_blocks == 2 and not bm.has("a")
    bm.allocate("a", tokens(2 * BS), "base", 2 * BS)
    assert bm.can_grow("a", 2 * BS + 1) is False
    with pytest.raises(NoFreeBlocksError):
        bm.grow("a", 2 * BS + 1)


def test_free_returns_blocks() -> None:
    bm = BlockManager(4, BS)
    bm.allocate("a", tokens(2 * BS), "base", 2 * BS)
    bm.free("a")
    bm.free("a")  # idempotent
    assert bm.num_free_blocks == 4 and bm.usage == 0.0


def test_repeated_prompt_hits_its_full_blocks_and_leaves_one_token_to_compute() -> None:
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS + 2)
    bm.allocate("a", prompt, "base", len(prompt))
    computed(bm, "a", prompt)
    assert bm.allocate("b", prompt, "base", len(prompt)) == 3 * BS
    assert bm.block_table("b")[:3] == bm.block_table("a")[:3]
    assert bm.block_table("b")[3] != bm.block_table("a")[3]
    assert [bm.ref_count(b) for b in bm.block_table("a")] == [2, 2, 2, 1]
    assert bm.stats.queries == 2 * len(prompt) and bm.stats.hits == 3 * BS


def test_a_prompt_of_whole_blocks_recomputes_its_last_block() -> None:
    bm = BlockManager(16, BS)
    prompt = tokens(2 * BS)
    bm.allocate("a", prompt, "base", len(prompt))
    computed(bm, "a", prompt)
    assert bm.allocate("b", prompt, "base", len(prompt)) == BS


def test_two_adapters_never_share_blocks() -> None:
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS)
    bm.allocate("a", prompt, "digest-a", len(prompt))
    computed(bm, "a", prompt)
    assert bm.allocate("b", prompt, "digest-b", len(prompt)) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    assert bm.allocate("base", prompt, "base", len(prompt)) == 0


def test_a_reloaded_adapter_misses_the_old_versions_blocks() -> None:
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS)
    bm.allocate("v1", prompt, "sha-old", len(prompt))
    computed(bm, "v1", prompt)
    bm.free("v1")
    assert bm.allocate("v2", prompt, "sha-new", len(prompt)) == 0
    computed(bm, "v2", prompt)
    assert bm.allocate("v2-again", prompt, "sha-new", len(prompt)) == 2 * BS


def test_a_different_token_breaks_the_chain_from_that_block_on() -> None:
    bm = BlockManager(16, BS)
    prompt = tokens(4 * BS)
    bm.allocate("a", prompt, "base", len(prompt))
    computed(bm, "a", prompt)
    other = prompt.copy()
    other[BS + 1] = 999  # inside block 1
    assert bm.allocate("b", other, "base", len(other)) == BS


def test_freed_cached_blocks_are_reused_until_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    first = tokens(2 * BS + 1)
    bm.allocate("a", first, "base", len(first))
    computed(bm, "a", first)
    bm.free("a")
    assert bm.num_free_blocks == 4  # cached blocks count as free
    assert bm.allocate("b", first, "base", len(first)) == 2 * BS  # back from the LRU
    bm.free("b")
    # a different prompt needs all 4 blocks: the cached ones are evicted, and forgotten
    other = tokens(4 * BS, start=100)
    bm.allocate("c", other, "base", len(other))
    bm.free("c")
    assert bm.allocate("d", first, "base", len(first)) == 0


def test_eviction_takes_never_cached_blocks_first() -> None:
    bm = BlockManager(4, BS)
    first = tokens(BS + 1)
    bm.allocate("a", first, "base", len(first))
    computed(bm, "a", first)
    bm.free("a")  # one cached block, one plain free block back
    bm.allocate("b", tokens(2 * BS, start=50), "base", 2 * BS)  # takes the 2 never-cached blocks
    assert bm.allocate("c", first, "base", 1) == BS


def test_commit_hashes_only_computed_full_blocks() -> None:
    bm = BlockManager(8, BS)
    prompt = tokens(3 * BS)
    bm.allocate("a", prompt, "base", len(prompt))
    bm.commit("a", prompt, BS + 2)  # a chunk: one full block computed
    assert bm.allocate("b", prompt, "base", len(prompt)) == BS


def test_same_block_computed_twice_keeps_one_entry() -> None:
    bm = BlockManager(8, BS)
    prompt = tokens(2 * BS + 1)
    bm.allocate("a", prompt, "base", len(prompt))
    bm.allocate("b", prompt, "base", len(prompt))  # before a's blocks were hashed: no hit
    computed(bm, "a", prompt)
    computed(bm, "b", prompt)
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8
    assert bm.allocate("c", prompt, "base", len(prompt)) == 2 * BS


def test_prefix_caching_off_never_hits_or_counts() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = tokens(3 * BS)
    bm.allocate("a", prompt, "base", len(prompt))
    computed(bm, "a", prompt)
    assert bm.allocate("b", prompt, "base", len(prompt)) == 0
    assert bm.stats.queries == 0 and bm.stats.hits == 0


def test_reset_prefix_cache_forgets_every_hash() -> None:
    bm = BlockManager(8, BS)
    prompt = tokens(2 * BS + 1)
    bm.allocate("a", prompt, "base", len(prompt))
    computed(bm, "a", prompt)
    bm.reset_prefix_cache()
    assert bm.allocate("b", prompt, "base", len(prompt)) == 0


def test_block_hash_depends_on_parent_tokens_and_digest() -> None:
    h = block_hash(None, [1, 2], "x")
    assert h == block_hash(None, [1, 2], "x")
    assert (
        len({h, block_hash(h, [1, 2], "x"), block_hash(None, [1, 3], "x"), block_hash(None, [1, 2], "y")})
        == 4
    )
