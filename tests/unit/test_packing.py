"""Packed lanes without a model: queries see their own sequence's keys up to their position, writes go
to each token's block slot, padding writes to scratch and sees column 0 only."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.types import Batch, SamplingParams, Sequence
from server.runtime.kv_cache import KVGeometry, PagedKVCache
from server.runtime.packing import Lane, attention_size, pack_lanes

BS = 4


def kv() -> PagedKVCache:
    geometry = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    return PagedKVCache(geometry=geometry, num_blocks=8, block_size=BS, device=torch.device("cpu"))


def seq(n: int, cached: int, table: list[int]) -> Sequence:
    q = Sequence(
        request_id=f"r{n}{cached}{table}",
        token_ids=list(range(100, 100 + n)),
        num_prompt_tokens=n,
        sampling=SamplingParams(),
        adapter=None,
        seed=0,
    )
    q.num_cached = cached
    q.block_table = table
    return q


def test_two_sequences_in_one_lane_see_only_their_own_keys() -> None:
    a = seq(3, 2, [5])  # decode-like: computes token 2 at position 2
    b = seq(6, 0, [1, 7])  # a prompt chunk of 6 tokens
    batch = Batch(seqs=[a, b], num_new_tokens=[1, 6])
    packed = pack_lanes([Lane("x", [0, 1])], batch, kv())
    assert packed.input_ids.tolist() == [[102, 100, 101, 102, 103, 104, 105]]
    assert packed.positions.tolist() == [[2, 0, 1, 2, 3, 4, 5]]
    assert packed.write_slots.tolist() == [[5 * BS + 2, 4, 5, 6, 7, 7 * BS, 7 * BS + 1]]
    assert packed.read_blocks.tolist() == [[5, 1, 7]]
    mask = packed.mask()[0, 0]  # [S, L]
    assert mask[0].tolist() == [True] * 3 + [False] * 9  # a: its 3 tokens, nothing of b
    assert mask[1].tolist() == [False] * 4 + [True] + [False] * 7  # b's first token: itself
    assert mask[6].tolist() == [False] * 4 + [True] * 6 + [False] * 2  # b's last: all of b, no tail
    assert packed.starts == [[0, 1]]


def test_lanes_pad_to_the_widest_and_padding_writes_scratch() -> None:
    cache = kv()
    a, b = seq(3, 2, [5]), seq(4, 0, [1])
    batch = Batch(seqs=[a, b], num_new_tokens=[1, 4])
    packed = pack_lanes([Lane("x", [0]), Lane("y", [1])], batch, cache)
    assert packed.write_slots[0].tolist() == [5 * BS + 2] + [cache.scratch] * 3
    assert packed.read_blocks.tolist() == [[5], [1]]
    mask = packed.mask()[0, 0]
    assert mask[1:].tolist() == [[True, False, False, False]] * 3  # padding queries: column 0 only


def test_attention_size_counts_lanes_queries_and_key_columns() -> None:
    a, b = seq(3, 2, [5]), seq(8, 0, [1, 2])
    assert attention_size([Lane("x", [0])], Batch(seqs=[a], num_new_tokens=[1]), BS) == 1 * 1 * BS
    batch = Batch(seqs=[a, b], num_new_tokens=[1, 5])
    assert attention_size([Lane("x", [0, 1])], batch, BS) == 1 * 6 * (BS + 2 * BS)  # 1 lane, 6 queries
    assert attention_size([Lane("x", [0]), Lane("y", [1])], batch, BS) == 2 * 5 * (2 * BS)


@pytest.mark.parametrize("seed", range(10))
def test_random_packings_read_exactly_the_slots_their_tokens_wrote(seed: int) -> None:
    # lanes of random sequences (decode rows and prompt chunks, block tables with spare blocks): each query
    # token must write its own position's pool slot and see, through the mask and the lane's read blocks,
    # the slots of its sequence's positions 0 .. its own, and nothing else
    rng = random.Random(seed)
    cache = PagedKVCache(
        geometry=KVGeometry(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32),
        num_blocks=64,
        block_size=BS,
        device=torch.device("cpu"),
    )
    seqs, new = [], []
    for _ in range(rng.randint(1, 6)):
        n = rng.randint(1, 20)
        cached = rng.randint(0, n - 1)
        blocks = rng.sample(range(63), -(-n // BS) + rng.randint(0, 2))
        seqs.append(seq(n, cached, blocks))
        new.append(1 if rng.random() < 0.5 else n - cached)
    batch = Batch(seqs=seqs, num_new_tokens=new)
    rows = list(range(len(seqs)))
    rng.shuffle(rows)
    cut = rng.randint(1, len(rows))
    lanes = [Lane("x", rows[:cut])] + ([Lane("y", rows[cut:])] if rows[cut:] else [])
    packed = pack_lanes(lanes, batch, cache)
    mask = packed.mask()[:, 0]  # [B, S, L]
    for i, lane in enumerate(lanes):
        # the pool slot of each of the lane's key columns
        columns = [block * BS + offset for block in packed.read_blocks[i].tolist() for offset in range(BS)]
        for row, start in zip(lane.rows, packed.starts[i], strict=True):
            s = seqs[row]

            def slot(position: int, s: Sequence = s) -> int:
                return s.block_table[position // BS] * BS + position % BS

            for q in range(new[row]):
                position = s.num_cached + q
                assert packed.input_ids[i, start + q] == s.token_ids[position]
                assert packed.positions[i, start + q] == position
                assert packed.write_slots[i, start + q] == slot(position)
                seen = [columns[c] for c in mask[i, start + q].nonzero().flatten().tolist()]
                assert sorted(seen) == sorted(slot(p) for p in range(position + 1))
        for q in range(sum(new[r] for r in lane.rows), packed.input_ids.shape[1]):  # padding
            assert packed.write_slots[i, q] == cache.scratch
            assert mask[i, q].nonzero().flatten().tolist() == [0]
