"""Attention per sequence inside a packed forward, each sequence reading its own KV blocks.

A packed forward holds several sequences' new tokens in one batch row (``server.runtime.packing``). One
SDPA call over such a row under a block-diagonal mask scores every query against every sequence's keys and
masks most of it away: a step that admits a 160-token prompt beside 12 decode rows scored 172 queries x
~1,400 keys per head where 12 x ~100 + 160 x 160 are needed (measured: 149 ms for that step against 54 ms
for the decode rows alone). This module registers an attention implementation with transformers
(``VARLEN``) that attends each sequence on its own:

- the one-token segments (decode rows, one-token chunks) together: one SDPA under a mask of each row's
  length, over their rows of the decode mirror (``server.runtime.decode_mirror``, the CPU) or their blocks
  gathered into ``[R, H, L, D]``;
- a prompt chunk with nothing cached: over its own new keys, causal, with no gather;
- a chunk after cached tokens (a prefix-cache hit, the next chunk of a long prompt): its blocks gathered,
  under a causal mask offset by what is cached.

Sliding windows come from the ``sliding_window`` keyword transformers' attention layers pass. The segments
travel as the ``varlen`` keyword of the model's forward: transformers hands unknown keywords down to every
attention call. A forward without it (CUDA decode graphs, ``generate`` on the same model) runs transformers'
SDPA unchanged, under the masks transformers' SDPA would build. Families that need eager attention
(Gemma-2's logit soft-capping) keep the masked path (``server.runtime.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.types import Batch
from server.runtime.decode_attention import Kernel, attend
from server.runtime.decode_mirror import DecodeMirror, DecodeRow, MirrorStep, decode_mask
from server.runtime.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from server.runtime.packing import Lane, PackedStep

VARLEN = "loraserve_varlen"


@dataclass(slots=True, frozen=True)
class Chunk:
    """A segment of two or more query columns: ``length`` tokens from column ``column`` of batch row
    ``lane``, at positions ``cached ..``; ``blocks`` [N] (device) the blocks of its tokens ``0 .. cached +
    length`` (None when nothing is cached: it attends over its own new keys)."""

    lane: int
    column: int
    length: int
    cached: int
    blocks: torch.Tensor | None


@dataclass(slots=True)
class VarlenSegments:
    """The sequences of one packed forward. One-token segments: query ``(single_lanes[i],
    single_columns[i])`` at ``single_positions[i]``, reading blocks ``single_blocks[i]`` (scratch past its
    own), or with ``mirror`` its slot's row of the decode mirror, through ``kernel``
    (``server.runtime.decode_attention``); the others: ``chunks``. Query columns in neither are padding
    (their output is zero)."""

    kv: PagedKVCache
    single_lanes: torch.Tensor  # [R]
    single_columns: torch.Tensor  # [R]
    single_positions: torch.Tensor  # [R, 1]
    single_blocks: torch.Tensor  # [R, N]
    chunks: list[Chunk]
    mirror: MirrorStep | None = None
    kernel: Kernel = "sdpa"
    # where the one-token segments lie as a plain slice of the forward (``singles_slice``), or None
    single_slice: tuple[slice, int] | tuple[int, slice] | None = None
    _masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    @property
    def num_singles(self) -> int:
        return int(self.single_lanes.shape[0])

    def singles(self, states: torch.Tensor) -> torch.Tensor:
        """The one-token segments' rows of ``states`` [B, H, S, D] -> [R, H, D]: a view where they lie as a
        slice (a step of decode rows alone: lanes ``0 .. R`` at column 0; or one lane's columns), else a
        gather (on the CPU, indexing two dimensions copies element by element: several times a strided
        view's cost, four times a layer)."""
        where = self.single_slice
        if where is None:
            return states[self.single_lanes, :, self.single_columns]
        lane, columns = where
        picked = states[lane, :, columns]
        return picked if isinstance(lane, slice) else picked.transpose(0, 1)

    def place_singles(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """Write the one-token segments' attention ``rows`` [R, H, D] into ``out`` [B, S, H, D]."""
        if self.single_slice is None:
            out[self.single_lanes, self.single_columns] = rows
        else:
            out[self.single_slice] = rows

    def single_mask(self, window: int | None) -> torch.Tensor:
        """[R, 1, 1, L] bool: each one-token row sees its own keys (within ``window``): the same for every
        layer, so built once per forward and window."""
        key = (-1, window)
        if key not in self._masks:
            width = self.single_blocks.shape[1] * self.kv.block_size
            self._masks[key] = decode_mask(self.single_positions, width, window)
        return self._masks[key]

    def chunk_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """[1, 1, n, L] bool for chunk ``index`` (query ``i`` at ``cached + i`` sees keys ``<=`` it, within
        ``window``); None where plain causal attention over the chunk's own keys is exact."""
        chunk = self.chunks[index]
        if chunk.blocks is None and window is None:
            return None
        key = (index, window)
        if key not in self._masks:
            width = chunk.length if chunk.blocks is None else chunk.blocks.shape[0] * self.kv.block_size
            cols = torch.arange(width, device=self.kv.device)[None, :]
            rows = torch.arange(chunk.length, device=self.kv.device)[:, None] + chunk.cached
            mask = cols <= rows
            if window is not None:
                mask &= cols > rows - window
            self._masks[key] = mask[None, None]
        return self._masks[key]


def varlen_segments(
    packed: PackedStep,
    lanes: list[Lane],
    batch: Batch,
    kv: PagedKVCache,
    mirror: DecodeMirror | None = None,
    kernel: Kernel = "sdpa",
) -> VarlenSegments:
    """The segments of a forward over ``lanes`` as ``pack_lanes`` laid them out; the one-token segments
    read ``mirror`` where it has room for them, and attend through ``kernel``."""
    bs, device = kv.block_size, kv.device
    single_lanes: list[int] = []
    single_columns: list[int] = []
    single_positions: list[int] = []
    single_tables: list[list[int]] = []
    chunks: list[Chunk] = []
    decode_rows: list[DecodeRow] = []
    for lane_idx, lane in enumerate(lanes):
        for row, start in zip(lane.rows, packed.starts[lane_idx], strict=True):
            seq, n = batch.seqs[row], batch.num_new_tokens[row]
            cached = seq.num_cached
            blocks = seq.block_table[: -(-(cached + n) // bs)]
            if n == 1:
                single_lanes.append(lane_idx)
                single_columns.append(start)
                single_positions.append(cached)
                single_tables.append(blocks)
                decode_rows.append(DecodeRow(seq.slot, (seq.request_id, seq.num_preemptions), cached, blocks))
                continue
            table = torch.tensor(blocks, dtype=torch.long, device=device) if cached else None
            chunks.append(Chunk(lane_idx, start, n, cached, table))
    step = mirror.plan(decode_rows, kv) if mirror is not None else None
    # the mirror's rows need no block tables
    width = 0 if step is not None else max((len(t) for t in single_tables), default=0)
    padded = [t[:width] + [kv.scratch_block] * (width - len(t)) for t in single_tables]

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device)

    return VarlenSegments(
        kv=kv,
        single_lanes=tensor(single_lanes),
        single_columns=tensor(single_columns),
        single_positions=tensor(single_positions).reshape(-1, 1),
        single_blocks=tensor(padded).reshape(len(padded), width),
        chunks=chunks,
        mirror=step,
        kernel=kernel,
        single_slice=singles_slice(single_lanes, single_columns),
    )


def singles_slice(lanes: list[int], columns: list[int]) -> tuple[slice, int] | tuple[int, slice] | None:
    """``(lanes, column)`` or ``(lane, columns)`` where the one-token segments at ``lanes[i], columns[i]``
    are lanes ``0 .. R`` at one column, or one lane's consecutive columns (in order); else None."""
    if not lanes:
        return None
    n, first_lane, first_column = len(lanes), lanes[0], columns[0]
    if lanes == list(range(first_lane, first_lane + n)) and columns == [first_column] * n:
        return slice(first_lane, first_lane + n), first_column
    if lanes == [first_lane] * n and columns == list(range(first_column, first_column + n)):
        return first_lane, slice(first_column, first_column + n)
    return None


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    varlen: VarlenSegments | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: ``query`` [B, Hq, S, D]; ``key``/``value`` [B, Hkv, S, D]
    (this forward's new keys: the cache wrote them and gathered nothing) -> [B, S, Hq, D]. Without
    ``varlen``: transformers' SDPA over what the cache returned."""
    if varlen is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    layer = cast(int, module.layer_idx)  # every transformers attention layer has its index
    if varlen.num_singles:
        q = varlen.singles(query).unsqueeze(2)  # [R, Hq, 1, D]
        step = varlen.mirror
        if step is None:
            k, v = varlen.kv.gather(layer, varlen.single_blocks)
            res = attend(varlen.kernel, module, q, k, v, varlen.single_mask(sliding_window), scaling)
        else:
            new_k, new_v = varlen.singles(key), varlen.singles(value)  # [R, Hkv, D]
            k, v = step.keys_values(layer, new_k, new_v)
            # the mirror may be wider than the model's dtype (float32 for bf16 where the CPU has no bf16
            # kernels): the query is widened and the output rounded back
            q, mask = step.scatter_queries(q).to(k.dtype), step.mask(sliding_window, k.shape[2])
            res = attend(varlen.kernel, module, q, k, v, mask, scaling).index_select(0, step.slots)
            res = res.to(query.dtype)
        varlen.place_singles(out, res[:, 0])
    for index, chunk in enumerate(varlen.chunks):
        lane, cols = chunk.lane, slice(chunk.column, chunk.column + chunk.length)
        q = query[lane : lane + 1, :, cols]
        if chunk.blocks is None:
            k, v = key[lane : lane + 1, :, cols], value[lane : lane + 1, :, cols]
        else:
            k, v = varlen.kv.gather(layer, chunk.blocks[None])
        chunk_mask = varlen.chunk_mask(index, sliding_window)
        res, _ = sdpa_attention_forward(
            module, q, k, v, chunk_mask, scaling=scaling, is_causal=chunk_mask is None
        )
        out[lane, cols] = res[0]
    return out, None


AttentionInterface.register(VARLEN, varlen_attention)
# forwards without segments (decode graphs, generate) get the masks transformers builds for SDPA
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def use_varlen(model: torch.nn.Module) -> bool:
    """Switch ``model`` to ``VARLEN`` attention if it runs transformers' SDPA (eager families keep theirs);
    True when it runs ``VARLEN``."""
    config: Any = model.config
    if config._attn_implementation == "sdpa":
        config._attn_implementation = VARLEN
    return bool(config._attn_implementation == VARLEN)
