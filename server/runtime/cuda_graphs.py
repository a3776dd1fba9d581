"""Decode steps replayed as CUDA graphs: one graph per (rows, kv_len, sampling features) bucket, captured on
first use over static input buffers that each step updates in place.

A decode step has fixed shapes per bucket (row i is sequence slot i, attention reads ``kv_len`` columns
through the row's block table, ``PagedKVCache.place_decode``), and the adapter of each row is an index into
slot tensors (``server.runtime.slot_lora``), so the whole step, sampling included, is device work with no
host decision in it. Per step the host writes one small int64 table (``[5, rows]``: token, position,
active, sampler slot, LoRA slot) and the rows' block tables (``[rows, max_blocks]``) to pinned buffers,
copies them to the device without a sync, replays the graph, and reads the sampled tokens back: that
``.tolist()`` is the step's only host sync.

Capture runs the step eagerly twice on a side stream first (lazy initializations, cuBLAS workspaces), with
every row inactive: keys and values go to the scratch slot, samples to the sampler's scratch slot, so a
capture never touches a running sequence's state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from server.runtime.kv_cache import PagedKVCache
from server.runtime.sampler import Sampler, SamplingFeatures

if TYPE_CHECKING:
    from server.runtime.slot_lora import SlotLoRA

log = logging.getLogger("loraserve.runtime")

# rows of the static input table
_TOKEN, _POSITION, _ACTIVE, _SAMPLE_SLOT, _LORA_SLOT = range(5)


@dataclass(slots=True, frozen=True)
class DecodeRow:
    """One running sequence of a decode step, as the graph's input table holds it."""

    slot: int  # sequence slot == batch row
    token: int  # the last token, whose successor is sampled
    position: int  # its position (its KV goes to block blocks[position // block_size])
    lora_slot: int  # SlotLoRA slot (its base slot for base rows)
    blocks: tuple[int, ...] = ()  # its block table


@dataclass(slots=True, frozen=True)
class GraphKey:
    rows: int
    kv_len: int
    features: SamplingFeatures


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None off CUDA: the step then runs eagerly over the same buffers
    tokens: torch.Tensor  # [rows] int64, the graph's output buffer


class DecodeGraphs:
    """Captured decode steps over ``model`` (the shared model; its identity and ``slot_lora.generation`` are
    checked each step: a change drops every graph, since graphs hold tensor addresses)."""

    def __init__(
        self,
        *,
        model: Callable[[], torch.nn.Module],
        kv: PagedKVCache,
        sampler: Sampler,
        slot_lora: SlotLoRA | None,
        num_slots: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self._model = model
        self._kv = kv
        self._sampler = sampler
        self._slot_lora = slot_lora
        self._num_slots = num_slots
        self._device = device
        self._base_lora_slot = slot_lora.base_slot if slot_lora is not None else 0
        self._inputs = torch.zeros(5, num_slots, dtype=torch.int64, device=device)  # static, [5, S]
        self._staging = torch.zeros(5, num_slots, dtype=torch.int64, pin_memory=device.type == "cuda")
        # block tables, static [S, T]; padding entries name block 0, whose columns the mask hides
        self._tables = torch.zeros(num_slots, max_blocks_per_seq, dtype=torch.int64, device=device)
        self._tables_staging = torch.zeros(
            num_slots, max_blocks_per_seq, dtype=torch.int64, pin_memory=device.type == "cuda"
        )
        self._graphs: dict[GraphKey, _Captured] = {}
        self._pool: Any = None  # torch.cuda graph memory pool handle, shared by every graph
        self._captured_for: tuple[int, int] = (-1, -1)  # (id(model), slot_lora.generation)
        self.capture_seconds = 0.0
        self.failed = False  # a capture failed: the runner stops using graphs

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(
        self, rows: int, kv_len: int, decode_rows: list[DecodeRow], features: SamplingFeatures
    ) -> list[int]:
        """One decode step over batch rows ``[0, rows)``; returns the sampled token of each row (padding rows
        included: the caller picks its sequences' rows)."""
        self._check_validity()
        key = GraphKey(rows, kv_len, features)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._graphs[key] = self._capture(key)
            except Exception:
                # a failed capture can leave its memory pool half-recorded: never capture again, run eager
                log.exception("capturing decode graph %s failed; decode runs eagerly from now on", key)
                self.failed = True
                self._graphs.clear()
                self._pool = None
                raise
        table = [[0] * rows, [0] * rows, [0] * rows, [self._num_slots] * rows, [self._base_lora_slot] * rows]
        for row in decode_rows:
            table[_TOKEN][row.slot] = row.token
            table[_POSITION][row.slot] = row.position
            table[_ACTIVE][row.slot] = 1
            table[_SAMPLE_SLOT][row.slot] = row.slot
            table[_LORA_SLOT][row.slot] = row.lora_slot
        self._staging[:, :rows].copy_(torch.tensor(table, dtype=torch.int64))
        self._inputs[:, :rows].copy_(self._staging[:, :rows], non_blocking=True)
        tables = self._tables_staging[:rows]
        tables.zero_()
        for row in decode_rows:
            tables[row.slot, : len(row.blocks)] = torch.tensor(row.blocks, dtype=torch.int64)
        self._tables[:rows].copy_(tables, non_blocking=True)
        if captured.graph is not None:
            captured.graph.replay()
            tokens: list[int] = captured.tokens.tolist()  # the step's one host sync
        else:
            tokens = self._step(key).tolist()
        return tokens

    # ------------------------------------------------------------------------------------ internals
    def _check_validity(self) -> None:
        generation = self._slot_lora.generation if self._slot_lora is not None else 0
        current = (id(self._model()), generation)
        if current != self._captured_for:
            if self._graphs:
                log.info("dropping %d decode graphs (model or LoRA slot tensors changed)", len(self._graphs))
            self._graphs.clear()
            self._pool = None  # a pool whose graphs are all gone is released: never capture into it again
            self._captured_for = current

    def _step(self, key: GraphKey) -> torch.Tensor:
        """The captured work: inputs from the static table -> forward -> sampling. Shapes per ``key``."""
        inputs = self._inputs[:, : key.rows]
        token_ids = inputs[_TOKEN, :, None]  # [R, 1]
        positions = inputs[_POSITION, :, None]  # [R, 1]
        active = inputs[_ACTIVE, :, None] != 0  # [R, 1]
        mask = self._kv.place_decode(self._tables[: key.rows], positions, active, key.kv_len)  # [R, L]
        routing = (
            self._slot_lora.routing(inputs[_LORA_SLOT])
            if self._slot_lora is not None
            else contextlib.nullcontext()
        )
        with routing:
            out = self._model()(
                input_ids=token_ids,
                position_ids=positions,
                attention_mask=mask[:, None, None, :],
                past_key_values=self._kv,
                use_cache=True,
                logits_to_keep=1,
            )
        return self._sampler(out.logits[:, -1, :], inputs[_SAMPLE_SLOT], key.features)

    def _capture(self, key: GraphKey) -> _Captured:
        if self._device.type != "cuda":  # tests on the CPU exercise the buffers and the step, not the capture
            return _Captured(None, torch.empty(0))
        t0 = time.perf_counter()
        # harmless inputs for the eager warm-up: all rows inactive, sampled into the scratch slot, no LoRA
        self._inputs.zero_()
        self._tables.zero_()
        self._inputs[_SAMPLE_SLOT].fill_(self._num_slots)
        self._inputs[_LORA_SLOT].fill_(self._base_lora_slot)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(key)
        torch.cuda.current_stream(self._device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader thread pins host memory (cudaHostAlloc) while we capture; in the
        # default global mode that call invalidates this capture and fails the loader too (seen on an H100
        # with 32 adapters loading cold)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            tokens = self._step(key)
        elapsed = time.perf_counter() - t0
        self.capture_seconds += elapsed
        log.info(
            "captured decode graph rows=%d kv_len=%d %s in %.2f s",
            key.rows,
            key.kv_len,
            key.features,
            elapsed,
        )
        return _Captured(graph, tokens)
