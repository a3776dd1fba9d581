"""Decode rows' keys and values kept contiguous between steps, so a decode step's attention reads them in place.

Without it, a decode step's attention first gathers each row's KV blocks into ``[R, H, L, D]`` for SDPA
(``PagedKVCache.gather``): every step copies every row's whole past, and on the CPU that copy costs about
twice what SDPA over it does (2-core Xeon, bf16 190M Llama, 16 rows of ~70 tokens: 9.0 ms of gathers
against 4.3 ms of SDPA in a 48.8 ms step). The mirror keeps, per layer, ``[rows, H, width, D]`` where row
``slot`` holds the keys and values of the sequence running in that slot, in token order. A decode step writes
each row's one new token there and SDPA reads ``[:rows, :, :L]`` as it is.

The paged pool stays the truth: prompt chunks, the prefix cache and preemption only know blocks. A mirror row
is (re)filled from its sequence's blocks when it does not hold exactly the tokens before the one being
decoded: a sequence's first decode step, the first after a preemption (whose recompute may run another
adapter version), a slot's new sequence. Slots are handed out low first, so the rows a step reads are
nearly dense; rows of slots not decoding in this forward (a prompt chunk, another model's rows) attend
column 0 only and their output is dropped.

The mirror is a cache of gathers, bounded by ``max_bytes``: a step whose rows and width would not fit
gathers as before and leaves the mirror as it was. It grows by ``GROWTH``, or where that does not fit to the
most rows or the widest it may be. A growth allocates and copies every layer's keys and values: on a 2-core
Zen 3 VM, 1.1-1.7 s for 24 rows of the 193M Llama growing to 192-336 columns, mostly first-touch page faults,
and done in one step it stalls every stream for it. So the width grows ahead of need, a few tensors a step:
once the longest decode row is within ``lookahead`` tokens of the width (or half the width, where that is
less), each step grows its share of the tensors left, so that the last is grown by the step that needs it
(the 24 tensors of 12 layers: one a step, 45-70 ms beside a 150-180 ms step). Until then the grown tensors
are wider than the width every layer holds. A step that needs more than that width before then
(a long prompt's first decode, a new slot) grows the rest at once. Rows are not grown ahead: a new slot's
first decode comes when its prompt is done, which the mirror does not see coming.

With ``whole_rows`` a step reads its rows at the mirror's whole width where that is at most ``WHOLE_ROWS``
times its own: then ``[:rows]`` is contiguous, and the CPU's bf16 bmm (``decode_attention``'s matmuls)
copies a batch of rows cut shorter before multiplying (measured on a Zen 4, 16 rows of 112 keys in rows
of 192: 2 ms of copy per call, against 0.3 ms for the whole rows). SDPA reads cut rows in place. While the
width grows over steps, a step that reads whole rows reads the layers already grown at their own width (at
most ``GROWTH`` times the rest's, masked past the rows' positions), not cut at the rest's: there a cut read
is the copy this avoids.

The mirror may hold another dtype than the pool (``dtype``): float32 for a bf16 model where the CPU has no
bf16 kernels (``server.runtime.prepack.multiply_dtype``). There torch's bf16 attention is slow: on a 2-core
AMD EPYC Zen 3 (AVX2), 16 decode rows of 16 heads over 256 keys took 5.9 ms through SDPA in bf16 and 2.0 ms
in float32 (1.8 ms through the matmuls). The values are the bf16 ones, widened; the query is widened and the
output rounded back, so attention runs in float32 where bf16 SDPA also accumulates in float32. Twice the
bytes a token: the same ``max_bytes`` holds half the columns.

The mirror grows but does not shrink step by step: one that ``SHRINK_STEPS`` steps in a row needed less
than ``1 / SHRINK_WIDTH`` of its width (long chats gone, short requests now) is dropped, and grown again to
what the next step needs, its rows filled from their blocks, so short rows are not read out of rows of a
whole context (cut, or copied) for good, and the memory goes back. The bound is past what growth leaves
(a mirror grown by ``GROWTH`` from a width is at most ``GROWTH`` times it): with ``WHOLE_ROWS`` as the
bound, rows of about 1,000 tokens in a mirror grown to 2,048 were dropped and regrown over and over, each
time zeroing hundreds of MB (measured: a chat row's first turn went from 16 s to 156 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.runtime.kv_cache import KVGeometry, PagedKVCache

MIRROR_SHARE = 0.25  # of the KV pool's bytes, the most the mirror may hold
GROWTH = 2  # a mirror too small for a step grows to this many times its rows or width, where that fits
WHOLE_ROWS = 2  # whole_rows: a step reads whole rows when they are at most this many times its width
SHRINK_STEPS = 64  # a mirror over SHRINK_WIDTH times wider than this many steps in a row needed is dropped
SHRINK_WIDTH = GROWTH * WHOLE_ROWS  # past what growth from the needed width leaves, so a regrown mirror stays
LOOKAHEAD = 64  # tokens: the width grows over the steps while the longest decode row is this close to it

Owner = tuple[str, int]  # (request id, preemptions so far): who a row's tokens belong to


def decode_mask(positions: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[R, 1, 1, width] bool for one-token rows at ``positions`` [R, 1]: row ``i`` sees key columns
    ``<= positions[i]`` (and ``> positions[i] - window`` with a window)."""
    cols = torch.arange(width, device=positions.device)[None, :]
    mask = cols <= positions
    if window is not None:
        mask &= cols > positions - window
    return mask[:, None, None, :]


@dataclass(slots=True, frozen=True)
class DecodeRow:
    """One decode row of a forward: the sequence in ``slot`` (``owner``) computes the token at
    ``position``, whose blocks are ``blocks`` (covering tokens ``0 .. position``)."""

    slot: int
    owner: Owner
    position: int
    blocks: list[int]


@dataclass(slots=True)
class MirrorStep:
    """One forward's use of the mirror: ``slots`` [R] the mirror row of each decode row, at ``positions``
    [R]; attention reads rows ``0 .. rows`` and columns ``0 .. width``; ``fill_slots`` [F] rows to copy from
    ``fill_blocks`` [F, N] first (None: none)."""

    mirror: DecodeMirror
    kv: PagedKVCache
    rows: int
    width: int
    slots: torch.Tensor
    positions: torch.Tensor
    fill_slots: torch.Tensor | None
    fill_blocks: torch.Tensor | None
    whole: bool = False  # the step reads whole rows: a layer grown ahead of the rest, at its own width
    _masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)
    _write_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # by the mirror's width: [R * Hkv]

    def mask(self, window: int | None, width: int) -> torch.Tensor:
        """[rows, 1, 1, width] bool, ``width`` the layer's ``read_width``: each decode row sees its own keys
        (within ``window``); the rows of other slots see column 0 (their position counts as 0), so none is
        all -inf. Built once per forward and width."""
        if (window, width) not in self._masks:
            position = torch.zeros(self.rows, dtype=torch.long, device=self.slots.device)
            position[self.slots] = self.positions
            self._masks[window, width] = decode_mask(position[:, None], width, window)
        return self._masks[window, width]

    def keys_values(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the decode rows' new ``key``/``value`` [R, Hkv, D] of ``layer`` (after filling the rows
        that need it) -> what attention reads, ``[rows, Hkv, width, D]`` views of the mirror (``mask``
        of their width)."""
        keys, values = self.mirror.keys[layer], self.mirror.values[layer]
        if self.fill_slots is not None and self.fill_blocks is not None:
            k, v = self.kv.gather(layer, self.fill_blocks)  # the pool already holds this step's tokens
            keys[self.fill_slots, :, : k.shape[2]] = k.to(keys.dtype)
            values[self.fill_slots, :, : v.shape[2]] = v.to(values.dtype)
        for mirror, new in ((keys, key), (values, value)):  # a growing layer's may differ in width
            rows = self._rows_written(mirror)
            mirror.view(-1, mirror.shape[-1]).index_copy_(
                0, rows, new.reshape(rows.shape[0], -1).to(mirror.dtype)
            )
        width = self.read_width(layer)
        return keys[: self.rows, :, :width], values[: self.rows, :, :width]

    def read_width(self, layer: int) -> int:
        """The columns of ``layer`` this step reads: its width, or where it reads whole rows, the layer's
        own (a layer grown ahead of the rest is read whole, not cut to the rest's width)."""
        keys, values = self.mirror.keys[layer], self.mirror.values[layer]
        return keys.shape[2] if self.whole and keys.shape[2] == values.shape[2] else self.width

    def _rows_written(self, mirror: torch.Tensor) -> torch.Tensor:
        """The rows of ``mirror`` [slots, Hkv, W, D], seen as [slots * Hkv * W, D], that the decode rows'
        new keys (or values) [R, Hkv, D] go to, in their order: one index per (row, head), each a whole
        contiguous D, where indexing slots and positions copied element by element. While the mirror grows
        (``DecodeMirror._stage``) its layers (and a layer's keys and values) differ in width."""
        heads, width = mirror.shape[1], mirror.shape[2]
        if width not in self._write_rows:
            head = torch.arange(heads, device=self.slots.device)
            rows = (self.slots[:, None] * heads + head[None, :]) * width + self.positions[:, None]
            self._write_rows[width] = rows.reshape(-1)
        return self._write_rows[width]

    def scatter_queries(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` [R, Hq, 1, D] in decode-row order -> [rows, Hq, 1, D] in mirror-row order (zeros
        elsewhere)."""
        full = query.new_zeros(self.rows, *query.shape[1:])
        return full.index_copy_(0, self.slots, query)

    def forget(self) -> None:
        """The forward did not finish: its rows' contents are unknown."""
        for slot in self.slots.tolist():
            self.mirror.forget(slot)


class DecodeMirror:
    """Per layer ``[rows, kv_heads, width, head_dim]`` keys and values; row ``slot`` holds the first
    ``filled`` tokens of the sequence ``owner`` names. At most ``max_rows`` x ``max_width`` and
    ``max_bytes``; ``whole_rows``: steps read rows at the whole width where it is near theirs; ``dtype``:
    of the keys and values held (default: the pool's); ``lookahead``: tokens before the width is needed that
    its growth starts, spread over the steps (0: grown at once by the step that needs it)."""

    def __init__(
        self,
        *,
        geometry: KVGeometry,
        block_size: int,
        device: torch.device,
        max_bytes: int,
        max_rows: int,
        max_width: int,
        whole_rows: bool = False,
        shrink_after: int = SHRINK_STEPS,
        dtype: torch.dtype | None = None,
        lookahead: int = LOOKAHEAD,
    ) -> None:
        self.geometry = geometry
        self.lookahead = lookahead
        self.dtype = geometry.dtype if dtype is None else dtype
        self.whole_rows = whole_rows
        self.shrink_after = shrink_after
        self._narrow_steps = 0  # steps in a row that needed under 1 / SHRINK_WIDTH of the width
        self.block_size = block_size
        self.device = device
        self.max_bytes = max_bytes
        self.max_rows = max_rows  # the slots there are
        self.max_width = -(-max_width // block_size) * block_size  # a whole context, in whole blocks
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = 0  # what every layer's tensors hold at least
        self._width = 0
        self._staged: tuple[int, int] | None = None  # (rows, width) some tensors are grown to ahead of need
        self._owner: list[Owner | None] = []
        self._filled: list[int] = []

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width) every layer holds: what steps may read."""
        return self._rows, self._width

    def forget(self, slot: int) -> None:
        """``slot``'s sequence ended (or its row's contents are unknown): the row is filled again before use."""
        if slot < self._rows:
            self._owner[slot] = None

    def plan(self, rows: list[DecodeRow], kv: PagedKVCache) -> MirrorStep | None:
        """The mirror's part in a forward with these decode rows, growing it as needed; None when it would
        not fit in ``max_bytes`` (the forward gathers)."""
        if not rows:
            return None
        bs = self.block_size
        needed_rows = max(r.slot for r in rows) + 1
        longest = max(r.position for r in rows) + 1
        width = -(-longest // bs) * bs
        self._narrow_steps = self._narrow_steps + 1 if self._width > SHRINK_WIDTH * width else 0
        if self._narrow_steps >= self.shrink_after:
            self._drop()
        if not self._reserve(needed_rows, width):
            return None
        self._stage(longest)
        fills = [r for r in rows if self._owner[r.slot] != r.owner or self._filled[r.slot] != r.position]
        for r in rows:
            self._owner[r.slot] = r.owner
            self._filled[r.slot] = r.position + 1
        whole = self.whole_rows and self._width <= WHOLE_ROWS * width
        if whole:
            width = self._width  # the columns past a row's position are masked
        fill_slots = fill_blocks = None
        if fills:
            count = max(len(r.blocks) for r in fills)
            table = [r.blocks + [kv.scratch_block] * (count - len(r.blocks)) for r in fills]
            fill_slots = self._tensor([r.slot for r in fills])
            fill_blocks = self._tensor(table).reshape(len(fills), count)
        return MirrorStep(
            mirror=self,
            kv=kv,
            rows=needed_rows,
            width=width,
            slots=self._tensor([r.slot for r in rows]),
            positions=self._tensor([r.position for r in rows]),
            fill_slots=fill_slots,
            fill_blocks=fill_blocks,
            whole=whole,
        )

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device)

    def _drop(self) -> None:
        """Free every row: the next reservation allocates what it needs and every row is filled again."""
        self.keys, self.values = [], []
        self._rows = self._width = 0
        self._staged = None
        self._owner, self._filled = [], []
        self._narrow_steps = 0

    def _bytes(self, rows: int, width: int) -> int:
        g = self.geometry
        return rows * width * g.bytes_per_token * self.dtype.itemsize // g.dtype.itemsize

    def _widest(self, rows: int) -> int:
        """The most columns, in whole blocks and at most ``max_width``, that ``rows`` rows hold within
        ``max_bytes``."""
        blocks = self.max_bytes // self._bytes(rows, self.block_size)
        return min(blocks * self.block_size, self.max_width)

    def _tallest(self, width: int) -> int:
        """The most rows, at most ``max_rows``, that hold ``width`` columns within ``max_bytes``."""
        return min(self.max_bytes // self._bytes(1, width), self.max_rows)

    def _target(self, rows: int, width: int) -> tuple[int, int] | None:
        """The shape a mirror that must hold ``rows`` x ``width`` grows to, keeping a growth under way where
        that fits (else cutting it back); None if even ``rows`` x ``width`` is over ``max_bytes``."""
        floors = (
            [(self._rows, self._width)] if self._staged is None else [self._staged, (self._rows, self._width)]
        )
        for floor_rows, floor_width in floors:
            need_rows, need_width = max(rows, floor_rows), max(width, floor_width)
            if self._bytes(need_rows, need_width) <= self.max_bytes:
                break
        else:
            return None
        # grow by a factor where that fits, so slots and lengths coming one at a time reallocate rarely;
        # where it does not, the most that fits: growing to what the step needs would reallocate and copy
        # the whole mirror again at every new slot, or every new block of the longest row
        if need_rows > self._rows:
            grown = min(max(need_rows, self._rows * GROWTH), self.max_rows)
            fits = self._bytes(grown, need_width) <= self.max_bytes
            need_rows = grown if fits else self._tallest(need_width)
        if need_width > self._width:
            grown = min(max(need_width, self._width * GROWTH), self.max_width)
            fits = self._bytes(need_rows, grown) <= self.max_bytes
            need_width = grown if fits else self._widest(need_rows)
        return need_rows, need_width

    def _reserve(self, rows: int, width: int) -> bool:
        """Make the mirror at least ``rows`` x ``width`` now, keeping what its rows hold; False if that is
        over ``max_bytes`` (the mirror is left as it was)."""
        if rows <= self._rows and width <= self._width:
            return True
        target = self._target(rows, width)
        if target is None:
            return False
        self._staged = target
        self._grow(steps=0)
        return True

    def _stage(self, longest: int) -> None:
        """Grow the width ahead of the longest decode row (``longest`` tokens), this step's share of the
        tensors left: all of them grown by the step the row reaches the width. Growth starts within
        ``lookahead`` tokens of the width, or half of it where that is less (a mirror a few blocks wide
        would otherwise grow twice over before its rows are all there)."""
        left = self._width - longest  # steps after this one the width still holds
        if self._staged is None:
            if not self.keys or left >= min(self.lookahead, self._width // 2):
                return
            target = self._target(self._rows, self._width + 1)
            if target is None or target == (self._rows, self._width):
                return  # as wide as it may be
            self._staged = target
        self._grow(steps=left)

    def _waiting(self) -> list[tuple[list[torch.Tensor], int]]:
        """(pool, layer) of each tensor not yet at the staged shape (or not allocated), a layer's keys then
        its values: at most one layer's differ in width after a step."""
        assert self._staged is not None
        rows, width = self._staged
        return [
            (pool, layer)
            for layer in range(self.geometry.num_layers)
            for pool in (self.keys, self.values)
            if layer >= len(pool) or pool[layer].shape[0] != rows or pool[layer].shape[2] != width
        ]

    def _grow(self, steps: int) -> None:
        """Grow this step's share of the tensors waiting for the staged shape, leaving the rest to ``steps``
        more steps (0: all of them now); once none waits, that is the mirror's shape."""
        assert self._staged is not None
        rows, width = self._staged
        g = self.geometry
        waiting = self._waiting()
        count = -(-len(waiting) // (steps + 1))
        for pool, layer in waiting[:count]:
            # zeros, not empty: SDPA multiplies masked columns by 0, and 0 x NaN (uninitialised memory) is
            # NaN, so every column a row has not written must hold a finite value
            new = torch.zeros((rows, g.num_kv_heads, width, g.head_dim), dtype=self.dtype, device=self.device)
            if layer < len(pool):
                # a growth cut back may leave a tensor wider than the new shape: no row wrote past the width
                # every layer holds, which is at most this one
                r, w = min(rows, pool[layer].shape[0]), min(width, pool[layer].shape[2])
                new[:r, :, :w] = pool[layer][:r, :, :w]
                pool[layer] = new
            else:
                pool.append(new)
        if len(waiting) > count:
            return
        self._owner += [None] * (rows - self._rows)
        self._filled += [0] * (rows - self._rows)
        self._rows, self._width = rows, width
        self._staged = None
