"""The decode mirror against attention written out by hand, over several decode steps: rows that keep
decoding read their keys from the mirror (nothing copied from the blocks), a row is filled from its blocks
when it does not hold exactly the tokens before the one decoded (first decode, a new sequence in a
freed slot even under the same request id, after a preemption, after a step that gathered), slots
not decoding in a forward leave the others' output alone, the mirror grows keeping its rows, and a step
that would not fit in its bytes gathers from the blocks as before. The mirror is read, not the blocks:
blocks overwritten after a row is filled do not change that row's attention. The width grows over steps
ahead of need, and random schedules of starts, steps and ends under tight byte limits read what attention
over the true keys reads."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.types import Batch, Sequence
from server.runtime.decode_attention import Kernel
from server.runtime.decode_mirror import DecodeMirror
from server.runtime.kv_cache import KVGeometry, PagedKVCache, PagedPlacement
from server.runtime.packing import Lane, pack_lanes
from server.runtime.varlen import varlen_segments
from tests.unit.test_packing import seq
from tests.unit.test_varlen import BS, HKV, HQ, D, attend, by_hand

GEOMETRY = KVGeometry(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
NUM_BLOCKS = 32


class Decoder:
    """Sequences decoding one token a step through varlen attention, each with the true keys and values
    of all its tokens (what the pool holds for the tokens it has seen)."""

    def __init__(
        self,
        mirror: DecodeMirror | None,
        kernel: Kernel = "sdpa",
        geometry: KVGeometry = GEOMETRY,
        num_blocks: int = NUM_BLOCKS,
    ) -> None:
        self.kv = PagedKVCache(
            geometry=geometry, num_blocks=num_blocks, block_size=BS, device=torch.device("cpu")
        )
        self.dtype = geometry.dtype  # of the pool and the queries; the truth kept here is float32
        self.mirror = mirror
        self.kernel: Kernel = kernel
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self._next_block = 0

    def add(self, prompt: int, slot: int, request_id: str | None = None) -> Sequence:
        """A sequence in ``slot`` whose ``prompt`` tokens sit in the pool, about to decode its next token."""
        s = seq(prompt + 1, prompt, [])
        s.request_id = request_id or f"s{slot}-{self._next_block}"
        s.slot = slot
        self._grow(s)
        self.keys[s.request_id] = self._random(prompt)
        self.values[s.request_id] = self._random(prompt)
        self._write(s, range(prompt))
        return s

    def step(self, seqs: list[Sequence], window: int | None = None) -> None:
        """One decode forward over ``seqs`` (one lane); checks each row against attention by hand, then
        moves every sequence on by its token."""
        for s in seqs:
            self.keys[s.request_id] = torch.cat([self.keys[s.request_id], self._random(1)], 1)
            self.values[s.request_id] = torch.cat([self.values[s.request_id], self._random(1)], 1)
        batch = Batch(seqs=seqs, num_new_tokens=[1] * len(seqs))
        lanes = [Lane("x", list(range(len(seqs))))]
        packed = pack_lanes(lanes, batch, self.kv)
        query = torch.randn(1, HQ, len(seqs), D).to(self.dtype)
        new_k = torch.stack([self.keys[s.request_id][:, -1] for s in seqs], 1)[None].to(self.dtype)
        new_v = torch.stack([self.values[s.request_id][:, -1] for s in seqs], 1)[None].to(self.dtype)
        self.kv.placement = PagedPlacement(write_slots=packed.write_slots, read_blocks=None)
        k_states, v_states = self.kv.update(new_k, new_v, 0)
        self.segments = varlen_segments(packed, lanes, batch, self.kv, self.mirror, self.kernel)
        out = attend(query, k_states, v_states, self.segments, window)
        for column, s in enumerate(seqs):
            expected = by_hand(
                query[0, :, column : column + 1].float(),
                self.keys[s.request_id],
                self.values[s.request_id],
                s.num_cached,
                window,
            )
            got = out[0, column : column + 1]
            assert got.dtype == self.dtype
            # float32 attention over the pool's values, rounded once to the pool's dtype
            tolerance = {} if self.dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-3}
            torch.testing.assert_close(got.float(), expected, msg=s.request_id, **tolerance)
        for s in seqs:
            s.num_cached += 1
            s.token_ids.append(7)
            self._grow(s)

    @property
    def filled(self) -> list[int]:
        """The mirror rows the last step filled from the blocks."""
        step = self.segments.mirror
        assert step is not None
        return [] if step.fill_slots is None else step.fill_slots.tolist()

    def overwrite_blocks(self, s: Sequence) -> None:
        """Scribble over the pool's copy of ``s``'s past tokens (not over the truth kept here)."""
        slots = self._slots(s, range(s.num_cached))
        self.kv.keys[0][:, slots] = torch.randn(HKV, len(slots), D).to(self.dtype)
        self.kv.values[0][:, slots] = torch.randn(HKV, len(slots), D).to(self.dtype)

    def _random(self, tokens: int) -> torch.Tensor:
        """Keys or values of ``tokens`` tokens, as the pool holds them (rounded to its dtype), in float32."""
        return torch.randn(HKV, tokens, D).to(self.dtype).float()

    def _grow(self, s: Sequence) -> None:
        while len(s.block_table) * BS < s.num_cached + 1:
            s.block_table.append(self._next_block)
            self._next_block += 1
        assert self._next_block <= self.kv.num_blocks

    def _slots(self, s: Sequence, tokens: range) -> torch.Tensor:
        return torch.tensor([s.block_table[p // BS] * BS + p % BS for p in tokens], dtype=torch.long)

    def _write(self, s: Sequence, tokens: range) -> None:
        slots = self._slots(s, tokens)
        self.kv.keys[0][:, slots] = self.keys[s.request_id][:, tokens.start : tokens.stop].to(self.dtype)
        self.kv.values[0][:, slots] = self.values[s.request_id][:, tokens.start : tokens.stop].to(self.dtype)


def mirror(
    max_bytes: int = 1 << 30,
    max_rows: int = 8,
    *,
    whole_rows: bool = False,
    shrink_after: int = 1000,
    geometry: KVGeometry = GEOMETRY,
    dtype: torch.dtype | None = None,
    lookahead: int = 0,
) -> DecodeMirror:
    return DecodeMirror(
        geometry=geometry,
        dtype=dtype,
        lookahead=lookahead,
        block_size=BS,
        device=torch.device("cpu"),
        max_bytes=max_bytes,
        max_rows=max_rows,
        max_width=64,
        whole_rows=whole_rows,
        shrink_after=shrink_after,
    )


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("window", [None, 3])
def test_rows_fill_once_then_read_the_mirror(window: int | None, kernel: Kernel) -> None:
    torch.manual_seed(0)
    d = Decoder(mirror(whole_rows=kernel == "matmul"), kernel)
    a, b = d.add(5, slot=0), d.add(2, slot=2)  # slot 1 is not decoding: a hole between them
    d.step([b, a], window)
    assert sorted(d.filled) == [0, 2]  # both new to the mirror
    for _ in range(3):
        d.step([a, b], window)
        assert d.filled == []  # one new token each, written in place
    d.overwrite_blocks(a)  # what a reads now comes from the mirror
    d.step([a, b], window)
    assert d.filled == []


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_a_float32_mirror_over_a_bf16_pool_attends_in_float32(kernel: Kernel) -> None:
    """What the runner keeps where the CPU has no bf16 kernels: the rows filled from bf16 blocks and the new
    bf16 tokens are held widened, the bf16 queries attend in float32, the output is rounded back once."""
    torch.manual_seed(2)
    bf16 = KVGeometry(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16)
    m = mirror(whole_rows=kernel == "matmul", geometry=bf16, dtype=torch.float32)
    d = Decoder(m, kernel, geometry=bf16)
    a, b = d.add(5, slot=0), d.add(9, slot=2)
    d.step([a, b])
    assert sorted(d.filled) == [0, 2] and m.keys[0].dtype == torch.float32
    for _ in range(3):
        d.step([b, a])
        assert d.filled == []
    rows, width = m.shape
    assert m.nbytes == rows * width * bf16.bytes_per_token * 2  # a float32 token: twice a bf16 one


def test_a_new_owner_or_a_preemption_fills_the_row_from_the_blocks() -> None:
    torch.manual_seed(1)
    m = mirror()
    d = Decoder(m)
    a, b = d.add(3, slot=0), d.add(6, slot=1)
    d.step([a, b])
    d.step([a, b])
    m.forget(1)  # b ended; c takes its slot, with fewer tokens than b had
    c = d.add(2, slot=1)
    d.step([a, c])
    assert d.filled == [1]
    m.forget(1)  # c ended; e takes its slot under c's request id, as long as c was: still not c
    e = d.add(c.num_cached, slot=1, request_id=c.request_id)
    d.step([a, e])
    assert d.filled == [1]
    c = e
    a.num_preemptions += 1  # a was recomputed into its blocks: its row is filled again from them
    d.step([a, c])
    assert d.filled == [0]
    d.step([c])  # a skips a step (say it is prefilling): its row is not touched
    d.step([a, c])
    assert d.filled == []


def test_the_mirror_grows_keeping_its_rows() -> None:
    torch.manual_seed(2)
    m = mirror()
    d = Decoder(m)
    a = d.add(3, slot=0)
    d.step([a])
    assert m.shape == (1, BS)
    d.overwrite_blocks(a)  # from here a must be read from its row, however the mirror grows
    d.step([a])
    assert m.shape == (1, 2 * BS)
    b = d.add(9, slot=3)
    d.step([a, b])
    assert d.filled == [3]
    assert m.shape == (4, 4 * BS)  # rows to slot 3 (doubling 1 -> 2 is too few); width doubled twice over
    for _ in range(4):
        d.step([a, b])
    assert d.filled == []
    # columns no row has written are read under the mask too: a NaN there would come out as NaN
    assert all(t.isfinite().all() for t in (*m.keys, *m.values))


def test_where_doubling_does_not_fit_the_mirror_grows_once_to_the_widest_that_does() -> None:
    """A row decoding past the width that doubling reaches within the bytes: the mirror grows once to the
    most whole blocks that fit, not block by block (each growth copies the whole mirror: measured on the
    Zen 3, 270-560 ms a growth of 24 rows of the 193M Llama, every 16 steps)."""
    torch.manual_seed(5)
    m = mirror(max_bytes=7 * BS * GEOMETRY.bytes_per_token, max_rows=1)  # 1 row x 7 blocks
    d = Decoder(m)
    a = d.add(1, slot=0)
    widths = []
    for _ in range(7 * BS - 1):  # to position 7 * BS - 1, the last of 7 blocks
        d.step([a])
        assert d.segments.mirror is not None  # every step fits: read from the mirror
        if not widths or widths[-1] != m.shape[1]:
            widths.append(m.shape[1])
    assert widths == [BS, 2 * BS, 4 * BS, 7 * BS]  # not 4, 5, 6, 7 blocks
    d.step([a])  # past 7 blocks: gathers, the mirror left as it was
    assert d.segments.mirror is None and m.shape == (1, 7 * BS)


def test_where_doubling_the_rows_does_not_fit_the_mirror_grows_once_to_the_most_that_do() -> None:
    """New slots one by one near ``max_bytes``: the rows grow once to the most that fit at the width, not
    one row a growth (each copies the whole mirror)."""
    torch.manual_seed(11)
    m = mirror(max_bytes=6 * BS * GEOMETRY.bytes_per_token, max_rows=8)  # 6 rows x 1 block
    d = Decoder(m)
    rows = []
    for slot in range(6):
        d.step([d.add(1, slot=slot)])  # each its first decode: 2 tokens, 1 block
        assert d.segments.mirror is not None
        rows.append(m.shape[0])
    assert rows == [1, 2, 4, 4, 6, 6]  # not 5, then 6


def test_the_width_grows_ahead_of_the_longest_row_a_share_of_the_tensors_a_step() -> None:
    """Within ``lookahead`` tokens of the width, each step grows its share of the tensors left, so the last
    is grown by the step that needs it: no step stalls for the whole growth (measured on the Zen 3: 1.7 s
    in one step for 24 rows of the 193M Llama to 336 columns). Meanwhile a layer's keys and values differ in
    width, and every step still reads the mirror (its rows are checked against attention by hand)."""
    torch.manual_seed(8)
    geometry = KVGeometry(num_layers=3, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
    m = mirror(lookahead=6, geometry=geometry)
    d = Decoder(m, geometry=geometry)
    a = d.add(2 * BS - 1, slot=0)  # its first decode fills 2 blocks: grown at once to them, then to 4
    d.step([a])
    assert m.shape == (1, 4 * BS)
    d.overwrite_blocks(a)  # from here a must be read from its row, however the mirror grows
    grown_per_step, widths = [], []
    for _ in range(12):  # to 20 tokens, 5 blocks
        before = [t.shape[2] for t in (*m.keys, *m.values)]
        d.step([a])
        assert d.segments.mirror is not None and d.filled == []
        after = [t.shape[2] for t in (*m.keys, *m.values)]
        grown_per_step.append(sum(x != y for x, y in zip(before, after, strict=True)))
        widths.append(m.shape[1])
    # from 11 tokens, 5 short of the 16 columns, the 6 tensors are grown one a step, the last by 16 tokens
    assert grown_per_step == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert widths == [4 * BS] * 7 + [8 * BS] * 5  # the width steps read: every layer's
    assert all(t.shape == (1, HKV, 8 * BS, D) for t in (*m.keys, *m.values))
    assert all(t.isfinite().all() for t in (*m.keys, *m.values))


def test_a_step_reading_whole_rows_reads_the_layers_grown_ahead_whole() -> None:
    """Where steps read whole rows (the bf16 matmuls copy rows read cut), a layer whose keys and values are
    both grown ahead of the rest is read at its own width, masked past the rows' positions; the rest, and a
    layer whose values are not grown yet, at the width every layer holds."""
    torch.manual_seed(12)
    geometry = KVGeometry(num_layers=3, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
    m = mirror(lookahead=6, geometry=geometry, whole_rows=True)
    d = Decoder(m, "matmul", geometry=geometry)
    a = d.add(2 * BS - 1, slot=0)
    d.step([a])
    d.overwrite_blocks(a)
    read = []
    for _ in range(12):
        d.step([a])  # layer 0, read at the width its step says, is checked against attention by hand
        step = d.segments.mirror
        assert step is not None and d.filled == []
        read.append([step.read_width(layer) // BS for layer in range(3)])
    # keys then values of layer 0, 1, 2 grow one a step from the third step; then all are 8 blocks
    assert read == [[4, 4, 4]] * 3 + [[8, 4, 4]] * 2 + [[8, 8, 4]] * 2 + [[8, 8, 8]] * 5


def test_a_step_past_the_width_grows_the_tensors_still_waiting_at_once() -> None:
    """A decode row that needs more than the width before the growth spread over steps is done (a long
    prompt's first decode beside rows that had not reached the width) grows the rest in that step."""
    torch.manual_seed(9)
    geometry = KVGeometry(num_layers=3, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
    m = mirror(lookahead=BS, geometry=geometry)
    d = Decoder(m, geometry=geometry)
    a = d.add(3 * BS, slot=0)  # 13 tokens: 4 blocks, 3 columns left, under the lookahead
    d.step([a])  # the 6 tensors spread over this step and the 3 left: 2 now
    d.overwrite_blocks(a)
    d.step([a])  # 2 more
    assert sorted(t.shape[2] for t in (*m.keys, *m.values)) == [4 * BS] * 2 + [8 * BS] * 4
    assert m.shape == (1, 4 * BS)
    b = d.add(5 * BS, slot=1)  # 21 tokens: 6 blocks, past the width, and a second row
    d.step([a, b])
    assert d.filled == [1] and m.shape == (2, 8 * BS)
    assert all(t.shape == (2, HKV, 8 * BS, D) for t in (*m.keys, *m.values))
    d.step([a, b])
    assert d.filled == []


def test_a_new_row_that_fits_only_without_the_growth_under_way_cuts_it_back() -> None:
    """Near ``max_bytes``, a growth spread over steps may leave no room for one more row at its width, where
    the row fits at the width steps read: the row is taken, and the tensors already grown cut back to it."""
    torch.manual_seed(10)
    geometry = KVGeometry(num_layers=3, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
    m = mirror(max_bytes=12 * BS * geometry.bytes_per_token, lookahead=BS, geometry=geometry)
    d = Decoder(m, geometry=geometry)
    a = d.add(3 * BS, slot=0)  # 13 tokens: 4 blocks, 3 columns left: growing to 1 x 8 blocks begins
    d.step([a])
    d.overwrite_blocks(a)
    d.step([a])
    assert sorted(t.shape[2] for t in (*m.keys, *m.values)) == [4 * BS] * 2 + [8 * BS] * 4
    b = d.add(1, slot=1)  # 2 rows x 8 blocks would be 16 blocks of 12; 2 x 4 fit
    d.step([a, b])
    assert d.segments.mirror is not None and d.filled == [1]
    # every tensor holds the 2 rows at 4 blocks, then half of them grow on to 6 (2 x 6 is all that fits)
    assert sorted(t.shape[2] for t in (*m.keys, *m.values)) == [4 * BS] * 3 + [6 * BS] * 3
    assert m.shape == (2, 4 * BS)
    d.step([a, b])  # a reaches the width: the rest grown
    assert d.filled == [] and m.shape == (2, 6 * BS)
    assert all(t.shape == (2, HKV, 6 * BS, D) for t in (*m.keys, *m.values))


def test_a_step_over_the_byte_limit_gathers_and_the_mirror_is_left_as_it_was() -> None:
    torch.manual_seed(3)
    m = mirror(max_bytes=2 * 2 * BS * GEOMETRY.bytes_per_token, max_rows=2)  # 2 rows x 2 blocks
    d = Decoder(m)
    a, b = d.add(1, slot=0), d.add(3, slot=1)
    d.step([a, b])
    assert m.shape == (2, BS)
    for _ in range(4):
        d.step([a, b])
        assert d.segments.mirror is not None
    assert m.shape == (2, 2 * BS)
    d.step([a, b])  # b's 9 tokens do not fit
    assert d.segments.mirror is None and d.segments.single_blocks.shape[1] > 0
    assert m.shape == (2, 2 * BS)
    d.step([a])  # a alone fits again, but its row missed the token of the step that gathered
    assert d.filled == [0]
    m.forget(1)
    c = d.add(1, slot=1)
    d.step([c])  # fits again: read from the mirror, filled from the blocks
    assert d.filled == [1]


def test_a_forward_that_failed_leaves_its_rows_to_be_filled_again() -> None:
    torch.manual_seed(4)
    d = Decoder(mirror())
    a, b = d.add(3, slot=0), d.add(4, slot=1)
    d.step([a, b])
    step = d.segments.mirror
    assert step is not None
    step.forget()  # what the runner does when the forward raised after planning
    d.step([a, b])
    assert sorted(d.filled) == [0, 1]


@pytest.mark.parametrize("window", [None, 3])
def test_whole_rows_are_read_where_the_mirror_is_at_most_twice_as_wide_as_the_step(
    window: int | None,
) -> None:
    torch.manual_seed(5)
    m = mirror(whole_rows=True)
    d = Decoder(m, "matmul")
    a = d.add(3 * BS, slot=1)  # slot 0 not decoding: its row attends column 0 only
    d.step([a], window)
    assert m.shape == (2, 4 * BS)
    m.forget(1)
    b = d.add(1, slot=1)  # 2 tokens, one block: the mirror is 4x as wide
    d.step([b], window)
    step = d.segments.mirror
    assert step is not None and step.width == BS
    for _ in range(BS):
        d.step([b], window)  # to 6 tokens, 2 blocks: the mirror is 2x as wide, so its whole rows are read
    step = d.segments.mirror
    assert step is not None and step.width == 4 * BS and m.shape == (2, 4 * BS)
    assert d.filled == []


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_a_mirror_steps_have_long_needed_far_less_of_is_dropped_and_grown_to_their_size(
    kernel: Kernel,
) -> None:
    torch.manual_seed(6)
    m = mirror(whole_rows=kernel == "matmul", shrink_after=3)
    d = Decoder(m, kernel)
    long, short = d.add(8 * BS, slot=0), d.add(1, slot=1)
    d.step([long, short])
    assert m.shape == (2, 9 * BS)  # 33 tokens: 9 blocks
    m.forget(0)  # the long one ended
    for _ in range(2):
        d.step([short])  # needs 1 block of 9
        assert m.shape == (2, 9 * BS) and d.filled == []
    d.step([short])  # the third step in a row: dropped, and grown to what it needs
    assert m.shape == (2, 2 * BS) and d.filled == [1]  # 5 tokens: 2 blocks
    d.step([short])
    assert d.filled == []


def test_rows_a_quarter_of_the_mirror_width_or_more_keep_it() -> None:
    torch.manual_seed(7)
    m = mirror(shrink_after=3)
    d = Decoder(m)
    long = d.add(16 * BS - 1, slot=0)
    d.step([long])
    assert m.shape == (1, 16 * BS)  # a whole test context
    m.forget(0)
    mid = d.add(4 * BS, slot=0)  # 17 tokens: 5 blocks, under half the width but over a quarter
    for _ in range(6):
        d.step([mid])
        assert m.shape == (1, 16 * BS)
    assert d.filled == []  # filled once, then never dropped


@pytest.mark.parametrize(
    ("kernel", "blocks", "lookahead", "shrink_after"),
    [
        ("sdpa", 16, 64, 1000),  # steps gather, and once a growth is cut back
        ("matmul", 24, 64, 3),
        ("matmul", 32, 8, 3),
        ("sdpa", 40, 16, 1000),  # a growth cut back
        ("sdpa", 1 << 10, 8, 1000),
        ("matmul", 1 << 10, 0, 3),  # grown at once by the step that needs it
    ],
)
def test_random_schedules_read_what_attention_over_the_true_keys_reads(
    kernel: Kernel, blocks: int, lookahead: int, shrink_after: int
) -> None:
    """Sequences start in free slots, decode in random subsets, end and leave their slot to the next, under
    byte limits (``blocks`` of every token's keys and values) that make the mirror gather, cut growths back
    or drop; every step of every row is checked against attention by hand over the true keys and values."""
    rng = random.Random(blocks + lookahead)
    torch.manual_seed(blocks + lookahead)
    geometry = KVGeometry(num_layers=2, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
    m = mirror(
        max_bytes=blocks * BS * geometry.bytes_per_token,
        max_rows=4,
        whole_rows=kernel == "matmul",
        shrink_after=shrink_after,
        geometry=geometry,
        lookahead=lookahead,
    )
    d = Decoder(m, kernel, geometry=geometry, num_blocks=1024)
    live: dict[int, Sequence] = {}
    staged = gathered = 0
    for _ in range(150):
        for slot in [s for s, seq_ in live.items() if seq_.num_cached >= 40 or rng.random() < 0.02]:
            del live[slot]  # ended
            m.forget(slot)
        free = [slot for slot in range(4) if slot not in live]
        if free and rng.random() < 0.2:
            slot = rng.choice(free)
            live[slot] = d.add(rng.randint(1, 20), slot=slot)
        if live:
            d.step(rng.sample(list(live.values()), rng.randint(1, len(live))), rng.choice([None, 5]))
            gathered += d.segments.mirror is None
            staged += m._staged is not None
    assert (staged > 0) == (lookahead > 0)  # the schedules do reach what they are here for
    assert (gathered > 0) == (blocks < 40)
