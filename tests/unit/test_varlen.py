"""Varlen attention against attention written out by hand: each sequence of a packed forward (decode rows,
a fresh prompt chunk, a chunk after cached tokens, a second lane) attends exactly its own keys, causal,
within a sliding window when there is one, with grouped-query heads; padding columns come out zero."""

from __future__ import annotations

import pytest
import torch

from server.engine.types import Batch
from server.runtime.decode_attention import Kernel
from server.runtime.kv_cache import KVGeometry, PagedKVCache, PagedPlacement
from server.runtime.packing import Lane, pack_lanes
from server.runtime.varlen import VarlenSegments, singles_slice, varlen_attention, varlen_segments
from tests.unit.test_packing import seq

BS, HQ, HKV, D = 4, 4, 2, 8


class Attention(torch.nn.Module):
    """What varlen attention reads of transformers' attention layers."""

    layer_idx = 0
    num_key_value_groups = HQ // HKV
    is_causal = True


def by_hand(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, window: int | None
) -> torch.Tensor:
    """q [HQ, n, D] at positions first.., k/v [HKV, end, D] -> [n, HQ, D]."""
    k, v = k.repeat_interleave(HQ // HKV, 0), v.repeat_interleave(HQ // HKV, 0)
    scores = q @ k.transpose(1, 2) / D**0.5
    rows = torch.arange(q.shape[1])[:, None] + first
    cols = torch.arange(k.shape[1])[None, :]
    seen = cols <= rows
    if window is not None:
        seen &= cols > rows - window
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: VarlenSegments,
    window: int | None,
) -> torch.Tensor:
    """Varlen attention of ``Attention()`` over ``segments``, as a model's layer calls it."""
    out, _ = varlen_attention(
        Attention(), query, key, value, None, scaling=D**-0.5, varlen=segments, sliding_window=window
    )
    return out


# how rows 0 .. 3 below (decode, chunk, chunk, decode) sit in lanes, and where the decode rows then lie:
# lanes 0 .. R at one column, one lane's consecutive columns (both read as views), or anywhere (gathered)
LAYOUTS = {
    "lanes": ([Lane("x", [0, 1, 2]), Lane("y", [3])], (slice(0, 2), 0)),
    "columns": ([Lane("x", [0, 3]), Lane("y", [1, 2])], (0, slice(0, 2))),
    "scattered": ([Lane("x", [1, 0]), Lane("y", [3, 2])], None),
}


def test_the_one_token_segments_are_a_view_where_they_lie_as_a_slice() -> None:
    assert singles_slice([], []) is None
    assert singles_slice([0, 1, 2], [0, 0, 0]) == (slice(0, 3), 0)
    assert singles_slice([2, 2], [5, 6]) == (2, slice(5, 7))
    assert singles_slice([0], [4]) == (slice(0, 1), 4)
    assert singles_slice([0, 2], [0, 0]) is None  # a lane between
    assert singles_slice([1, 0], [0, 0]) is None  # out of order
    assert singles_slice([0, 0], [1, 3]) is None  # a column between
    assert singles_slice([0, 1], [0, 1]) is None


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("window", [None, 3])
def test_each_sequence_attends_its_own_keys(window: int | None, kernel: Kernel, layout: str) -> None:
    torch.manual_seed(0)
    kv = PagedKVCache(
        geometry=KVGeometry(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32),
        num_blocks=16,
        block_size=BS,
        device=torch.device("cpu"),
    )
    seqs = [
        seq(9, 8, [3, 5, 6]),  # a decode row
        seq(6, 0, [1, 7]),  # a fresh prompt chunk
        seq(9, 5, [2, 4, 8]),  # a chunk after cached tokens
        seq(3, 2, [9]),  # a decode row in a second lane
    ]
    batch = Batch(seqs=seqs, num_new_tokens=[1, 6, 4, 1])
    lanes, single_slice = LAYOUTS[layout]
    packed = pack_lanes(lanes, batch, kv)
    keys = [torch.randn(HKV, s.num_tokens, D) for s in seqs]
    values = [torch.randn(HKV, s.num_tokens, D) for s in seqs]
    for s, k, v in zip(seqs, keys, values, strict=True):  # what earlier steps cached
        slots = torch.tensor(
            [s.block_table[p // BS] * BS + p % BS for p in range(s.num_cached)], dtype=torch.long
        )
        kv.keys[0][:, slots] = k[:, : s.num_cached]
        kv.values[0][:, slots] = v[:, : s.num_cached]

    b, width = packed.input_ids.shape
    query = torch.randn(b, HQ, width, D)
    new_k, new_v = torch.zeros(b, HKV, width, D), torch.zeros(b, HKV, width, D)
    for lane_idx, lane in enumerate(lanes):
        for row, start in zip(lane.rows, packed.starts[lane_idx], strict=True):
            s, n = seqs[row], batch.num_new_tokens[row]
            new_k[lane_idx, :, start : start + n] = keys[row][:, s.num_cached :]
            new_v[lane_idx, :, start : start + n] = values[row][:, s.num_cached :]
    kv.placement = PagedPlacement(write_slots=packed.write_slots, read_blocks=None)
    k_states, v_states = kv.update(new_k, new_v, 0)

    segments = varlen_segments(packed, lanes, batch, kv, kernel=kernel)
    assert segments.single_slice == single_slice
    out = attend(query, k_states, v_states, segments, window)

    assert out.shape == (b, width, HQ, D)
    covered = torch.zeros(b, width, dtype=torch.bool)
    for lane_idx, lane in enumerate(lanes):
        for row, start in zip(lane.rows, packed.starts[lane_idx], strict=True):
            s, n = seqs[row], batch.num_new_tokens[row]
            expected = by_hand(
                query[lane_idx, :, start : start + n], keys[row], values[row], s.num_cached, window
            )
            torch.testing.assert_close(out[lane_idx, start : start + n], expected, msg=s.request_id)
            covered[lane_idx, start : start + n] = True
    assert not out[~covered].any()  # padding columns
    assert (~covered).any()


def test_without_segments_it_is_transformers_sdpa_over_what_the_cache_returned() -> None:
    torch.manual_seed(1)
    query, key, value = torch.randn(2, HQ, 5, D), torch.randn(2, HKV, 7, D), torch.randn(2, HKV, 7, D)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(diagonal=2)
    out, _ = varlen_attention(Attention(), query, key, value, mask, scaling=D**-0.5)
    for row in range(2):
        expected = by_hand(query[row], key[row], value[row], 2, None)
        torch.testing.assert_close(out[row], expected)
