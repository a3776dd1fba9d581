"""A step's rows packed into lanes: the host-side layout of one packed (varlen) forward.

A lane is one batch row of the forward: sequences on one adapter, their new tokens one after the other
(no padding inside a lane), each with its position, attending over the blocks that hold its own tokens:
per sequence (``server.runtime.varlen``), or under the block-diagonal causal mask built here for eager
attention. Lanes are padded to the widest lane only. With slot LoRA one lane may
hold sequences of several adapters (``MIXED``): its tokens are routed to their adapters' slots one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.types import Batch
from server.runtime.kv_cache import PagedKVCache

MIXED = "__mixed__"  # a lane's adapter when its rows name theirs in ``row_adapters``


@dataclass(slots=True)
class Lane:
    """One batch row of a packed forward: sequences (batch rows) on one adapter, one after the other."""

    adapter: str  # the adapter version's name, BASE_ADAPTER, or MIXED
    rows: list[int]
    row_adapters: list[str] | None = None  # a MIXED lane: each row's adapter version (or BASE_ADAPTER)


@dataclass(slots=True)
class PackedStep:
    """The host tensors of one packed forward: ``B`` lanes, ``S`` query columns, ``N`` blocks read per lane
    (``L = N * block_size`` key columns)."""

    input_ids: torch.Tensor  # [B, S]
    positions: torch.Tensor  # [B, S] each token's position in its sequence
    segments: torch.Tensor  # [B, S] which sequence of the lane a query is (-1: padding)
    write_slots: torch.Tensor  # [B, S] flat KV slot each token writes (scratch: padding)
    read_blocks: torch.Tensor  # [B, N] blocks the lane reads, its sequences' tables one after the other
    key_segments: torch.Tensor  # [B, L] (-2: padding)
    key_positions: torch.Tensor  # [B, L]
    starts: list[list[int]]  # per lane, the first column of each of its rows

    def mask(self) -> torch.Tensor:
        """[B, 1, S, L] bool: a query sees its own sequence's keys up to its position (block-diagonal
        causal; a block's columns past the sequence's end sit at later positions, so causality hides
        them); padding queries see column 0 only, so no row is all -inf."""
        same = self.segments[:, :, None] == self.key_segments[:, None, :]
        causal = self.key_positions[:, None, :] <= self.positions[:, :, None]
        pad = (self.segments < 0)[:, :, None] & (torch.arange(self.key_positions.shape[1]) == 0)[
            None, None, :
        ]
        return ((same & causal) | pad)[:, None]

    def keep_columns(self, batch: Batch, lanes: list[Lane], sampling: list[int]) -> torch.Tensor:
        """The query columns whose logits the step needs: each sampling row's last token, every column of
        a row asking for prompt logprobs."""
        wanted: set[int] = set()
        sampled = set(sampling)
        for lane, starts in zip(lanes, self.starts, strict=True):
            for row, start in zip(lane.rows, starts, strict=True):
                n = batch.num_new_tokens[row]
                if batch.seqs[row].sampling.prompt_logprobs is not None and batch.is_prefill(row):
                    wanted.update(range(start, start + n))
                elif row in sampled:
                    wanted.add(start + n - 1)
        return torch.tensor(sorted(wanted) or [0], dtype=torch.long)

    def token_adapters(self, lanes: list[Lane], batch: Batch, pad: str) -> list[list[str]]:
        """[B][S]: the adapter of every query column (``pad`` for padding), for per-token routing."""
        width = self.input_ids.shape[1]
        out = []
        for lane, starts in zip(lanes, self.starts, strict=True):
            names = [pad] * width
            for j, (row, start) in enumerate(zip(lane.rows, starts, strict=True)):
                name = lane.row_adapters[j] if lane.row_adapters is not None else lane.adapter
                names[start : start + batch.num_new_tokens[row]] = [name] * batch.num_new_tokens[row]
            out.append(names)
        return out


def attention_size(lanes: list[Lane], batch: Batch, block_size: int) -> int:
    """Attention scores per head of a packed forward over ``lanes`` (padded to the widest lane)."""
    ends = {r: batch.seqs[r].num_cached + batch.num_new_tokens[r] for lane in lanes for r in lane.rows}
    width = max(sum(batch.num_new_tokens[r] for r in lane.rows) for lane in lanes)
    keys = max(sum(-(-ends[r] // block_size) * block_size for r in lane.rows) for lane in lanes)
    return len(lanes) * width * keys


def pack_lanes(lanes: list[Lane], batch: Batch, kv: PagedKVCache) -> PackedStep:
    """Lay out each lane's rows one after the other: tokens ``num_cached .. num_cached + n`` of each
    sequence as queries, the blocks holding its tokens ``0 .. num_cached + n`` as keys. Built as lists and
    made tensors once: a decode step packs a lane per row, and torch calls per row cost more than the lists
    (16 decode rows: 0.2 ms against 1.5 ms on a 2-core AMD EPYC Zen 3)."""
    bs = kv.block_size
    ends = [batch.seqs[r].num_cached + batch.num_new_tokens[r] for r in range(len(batch.seqs))]
    widths = [sum(batch.num_new_tokens[r] for r in lane.rows) for lane in lanes]
    num_blocks = [sum(-(-ends[r] // bs) for r in lane.rows) for lane in lanes]
    b, s, nb = len(lanes), max(widths), max(num_blocks)
    queries, blocks_read = b * s, b * nb  # lane i's queries start at i * s, its blocks at i * nb
    input_ids, positions = [0] * queries, [0] * queries
    segments, write_slots = [-1] * queries, [kv.scratch] * queries
    read_blocks = [kv.scratch_block] * blocks_read
    # each block read: its sequence's row in the lane (-2: padding), its index in that sequence's table
    block_segments, block_index = [-2] * blocks_read, [0] * blocks_read
    starts: list[list[int]] = []
    for i, lane in enumerate(lanes):
        q, k = i * s, i * nb
        lane_starts: list[int] = []
        for j, row in enumerate(lane.rows):
            seq, end = batch.seqs[row], ends[row]
            begin, n, blocks = seq.num_cached, batch.num_new_tokens[row], -(-end // bs)
            table = seq.block_table[:blocks]
            input_ids[q : q + n] = seq.token_ids[begin:end]
            positions[q : q + n] = range(begin, end)
            segments[q : q + n] = [j] * n
            write_slots[q : q + n] = [table[p // bs] * bs + p % bs for p in range(begin, end)]
            read_blocks[k : k + blocks] = table
            block_segments[k : k + blocks] = [j] * blocks
            block_index[k : k + blocks] = range(blocks)
            lane_starts.append(q - i * s)
            q += n
            k += blocks
        starts.append(lane_starts)
    block_segment = torch.tensor(block_segments, dtype=torch.long).view(b, nb, 1)
    # a block's keys sit at positions index * bs .. index * bs + bs - 1 of its sequence (padding: 0)
    key_positions = torch.tensor(block_index, dtype=torch.long).view(b, nb, 1) * bs + torch.arange(bs)
    return PackedStep(
        input_ids=torch.tensor(input_ids, dtype=torch.long).view(b, s),
        positions=torch.tensor(positions, dtype=torch.long).view(b, s),
        segments=torch.tensor(segments, dtype=torch.long).view(b, s),
        write_slots=torch.tensor(write_slots, dtype=torch.long).view(b, s),
        read_blocks=torch.tensor(read_blocks, dtype=torch.long).view(b, nb),
        key_segments=block_segment.expand(b, nb, bs).reshape(b, nb * bs),
        key_positions=key_positions.masked_fill_(block_segment < 0, 0).view(b, nb * bs),
        starts=starts,
    )
