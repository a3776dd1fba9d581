"""The only place that runs the model: one forward per step over every row's new tokens (decode tokens and
prompt chunks together), each sequence with its own adapter, its own positions and its own KV blocks.

A step packs its sequences into *lanes*, one batch row per adapter: the lane holds its sequences' new
tokens one after the other (varlen, no padding inside a lane) with per-token positions. Models on SDPA
attend each sequence on its own (``server.runtime.varlen``: decode rows together over their gathered KV
blocks, prompt chunks over their own keys); eager families read the lane's sequences' KV blocks
(``server.runtime.kv_cache``) under a block-diagonal causal mask. Lanes keep PEFT's per-row
``adapter_names`` (and slot LoRA's per-row slots) routing as they are.

A decode step on CUDA replays a captured graph instead (``server.runtime.cuda_graphs``): row ``i`` is slot
``i``, ``rows`` a power of two, attention reads ``kv_len`` columns (a power of two) through the rows'
block tables, so its shapes are fixed per bucket.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from adapter_store.store import Lease, ServingStore
from adapter_store.torch_threads import own_torch_threads
from server.engine.types import (
    AdapterLease,
    AdapterUnavailableError,
    Batch,
    KVBlocks,
    PositionLogprobs,
    Sequence,
    StepOutput,
    UnknownModelError,
)
from server.runtime.attention import MaskLayout
from server.runtime.cuda_graphs import DecodeGraphs, DecodeRow
from server.runtime.decode_attention import DecodeAttention, choose_kernel
from server.runtime.decode_mirror import MIRROR_SHARE, DecodeMirror
from server.runtime.kv_cache import KVGeometry, PagedKVCache, PagedPlacement
from server.runtime.packing import MIXED, Lane, PackedStep, attention_size, pack_lanes
from server.runtime.prepack import CpuPrepack, multiply_dtype, prepack
from server.runtime.sampler import LogprobsMode, Sampler, SamplerOutput, position_logprobs
from server.runtime.slot_lora import SlotLoRA
from server.runtime.token_bitmask import fill_token_bitmask
from server.runtime.tokenizer import HFTokenizer
from server.runtime.varlen import VarlenSegments, use_varlen, varlen_segments

log = logging.getLogger("loraserve.runtime")

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIN_KV_BUCKET = 32
BLOCK_SIZE = 16
# a packed forward's attention scores per head (lanes x query columns x key columns) above which a step's
# decode rows run in a forward of their own (their lanes would otherwise attend over every prompt's keys)
PACKED_ATTENTION_LIMIT = 1 << 20
PADDING_SPLIT = 1.5  # packed (padded) tokens over the split forwards' tokens above which a step splits
GPU_KV_FRACTION = 0.8  # of the device memory free after loading, when no --kv-cache-memory is given


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The smallest power of two >= n (at least ``floor``), capped at ``cap``."""
    size = floor
    while size < n:
        size *= 2
    return min(size, cap)


@dataclass(slots=True)
class _Group:
    """Rows of one step that run through the same model (the shared PEFT model or one snapshot)."""

    model: torch.nn.Module
    rows: list[int]


class ModelRunner:
    """Implements ``server.engine.types.ModelRunner`` over a transformers causal LM and an adapter store."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        tokenizer: HFTokenizer,
        model_id: str,
        num_slots: int,
        max_model_len: int,
        store: ServingStore | None = None,
        cuda_graphs: bool = True,
        cpu_prepack: CpuPrepack = "auto",
        decode_attention: DecodeAttention = "auto",
        slot_lora: bool | None = None,
        max_lora_rank: int = 16,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        kv_cache_memory: int | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = getattr(text_config, "max_position_embeddings", max_model_len)
        if max_model_len > context:
            log.warning(
                "max_model_len %d exceeds the model's context %d; using %d", max_model_len, context, context
            )
            max_model_len = context
        self.base_model = model
        self.device = next(model.parameters()).device
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._num_slots = num_slots
        self._max_model_len = max_model_len
        self._vocab_size = int(text_config.vocab_size)
        self.store = store
        num_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        self.dtype = _compute_dtype(model)
        geometry = KVGeometry(
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            dtype=self.dtype,
        )
        budget = self._kv_budget(kv_cache_memory, geometry)
        # at least one whole context: a sequence the engine admits always fits once the others are preempted
        num_blocks = max(geometry.num_blocks(budget, block_size), -(-max_model_len // block_size))
        self.kv = PagedKVCache(
            geometry=geometry, num_blocks=num_blocks, block_size=block_size, device=self.device
        )
        # decode rows' keys in the dtype the CPU multiplies fastest (float32 for bf16 without bf16 kernels)
        mirror_dtype = multiply_dtype(self.dtype) if self.device.type == "cpu" else self.dtype
        # how decode rows attend in packed forwards (server/runtime/decode_attention.py): timed at load
        self.decode_kernel = choose_kernel(
            decode_attention,
            self.device,
            num_heads=num_heads,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=head_dim,
            dtype=mirror_dtype,
            rows=num_slots,
            width=max_model_len,
        )
        # decode rows read their keys in place on the CPU (on CUDA, graphs read the blocks)
        self.mirror = (
            DecodeMirror(
                geometry=geometry,
                block_size=block_size,
                device=self.device,
                max_bytes=int(self.kv.nbytes * MIRROR_SHARE),
                max_rows=num_slots,
                max_width=max_model_len,
                whole_rows=self.decode_kernel == "matmul",
                dtype=mirror_dtype,
            )
            if self.device.type == "cpu"
            else None
        )
        self.sampler = Sampler(
            self._vocab_size, num_slots, self.device, logprobs_mode, num_valid_ids=tokenizer.num_ids
        )
        self._started: set[int] = set()  # slots whose sampling state is set (kept across a preemption)
        self._masks = MaskLayout.of(model, self.dtype)
        self._init_fast_path(cuda_graphs and self._masks.is_plain, slot_lora, max_lora_rank)
        # bf16 linears packed for oneDNN (CPU): the shared model now, each snapshot when it first runs
        self._cpu_prepack: CpuPrepack = cpu_prepack
        self._prepacked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._prepack(self._shared_model)
        log.info(
            "KV memory: %d blocks x %d tokens (%d tokens) = %.1f MiB on %s, up to %d sequences",
            num_blocks,
            block_size,
            self.kv.num_tokens,
            self.kv.nbytes / 2**20,
            self.device,
            num_slots,
        )

    def _kv_budget(self, kv_cache_memory: int | None, geometry: KVGeometry) -> int:
        """Bytes for the KV pool: the flag; else a share of the free device memory on CUDA; else (CPU) the
        static slot cache's old footprint, ``num_slots`` whole contexts."""
        if kv_cache_memory is not None:
            return kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_KV_FRACTION)
        return self._num_slots * self._max_model_len * geometry.bytes_per_token

    # ------------------------------------------------------------------------------------ protocol

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def kv_blocks(self) -> KVBlocks:
        return KVBlocks(self.kv.num_blocks, self.kv.block_size, base_digest=f"base:{self._model_id}")

    def adapter_names(self) -> list[str]:
        return [] if self.store is None else sorted(self.store.registry.names())

    def has_adapter(self, name: str) -> bool:
        return self.store is not None and self.store.registry.get(name) is not None

    def acquire_adapter(self, name: str) -> AdapterLease | None:
        if self.store is None:
            raise UnknownModelError(f"the model {name!r} does not exist", param="model")
        from adapter_store import AdapterLoadError, AdapterRefusedError

        try:
            return self.store.acquire(name)
        except AdapterRefusedError as exc:
            if exc.status == 404:
                raise UnknownModelError(f"the model {name!r} does not exist", param="model") from exc
            raise AdapterUnavailableError(str(exc), status=exc.status) from exc
        except AdapterLoadError as exc:
            raise AdapterUnavailableError(str(exc), status=exc.status) from exc

    def release_adapter(self, lease: AdapterLease) -> None:
        if self.store is not None:
            self.store.release(_store_lease(lease))

    def housekeeping(self) -> None:
        if self.store is not None:
            self.store.sync()

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        if self.store is not None:
            self.store.set_wakeup(wake)

    def bind_thread(self) -> None:
        threads = own_torch_threads()
        log.info("torch intra-op threads on the engine thread: %d", threads)

    def free_slot(self, slot: int) -> None:
        self.sampler.free(slot)
        if self.mirror is not None:
            self.mirror.forget(slot)
        self._started.discard(slot)

    @torch.inference_mode()
    def step(self, batch: Batch) -> StepOutput:
        seqs = batch.seqs
        for seq in seqs:
            if seq.slot not in self._started:
                stop_ids = self._tokenizer.eos_token_ids | set(seq.sampling.stop_token_ids)
                prompt = seq.token_ids[: seq.num_prompt_tokens]
                self.sampler.start(seq.slot, prompt, seq.sampling, seq.seed, sorted(stop_ids))
                self._started.add(seq.slot)
        graphs = self.graphs
        if batch.kind == "decode" and graphs is not None and not graphs.failed and self._graphable(seqs):
            return self._decode_graph(graphs, seqs)
        return self._packed_step(batch)

    # ------------------------------------------------------------------------------------ steps

    def _packed_step(self, batch: Batch) -> StepOutput:
        """Batch -> StepOutput: every row's new tokens (a decode token or a prompt chunk) in one forward per
        model (two when packing would make attention too wide, see ``_plans``), packed one sequence after
        another into lanes (no padding inside a lane), with per-token positions; each lane's attention
        reads its sequences' blocks."""
        seqs = batch.seqs
        sampling = [i for i in range(len(seqs)) if batch.samples(i)]
        logits = torch.empty(len(sampling), self._vocab_size, dtype=torch.float32, device=self.device)
        logit_row = {row: k for k, row in enumerate(sampling)}  # batch row -> row of ``logits``
        prompt_logprobs: list[tuple[PositionLogprobs, ...] | None] = [None] * len(seqs)
        for group in self._groups(seqs, range(len(seqs))):
            for lanes in self._plans(group, batch):
                packed = pack_lanes(lanes, batch, self.kv)
                keep = packed.keep_columns(batch, lanes, sampling)  # [K] columns whose logits are read
                out = self._forward_packed(group.model, packed, lanes, batch, keep)  # [B, K, V]
                column = {int(c): k for k, c in enumerate(keep.tolist())}
                for lane_idx, lane in enumerate(lanes):
                    for row, start in zip(lane.rows, packed.starts[lane_idx], strict=True):
                        n = batch.num_new_tokens[row]
                        if row in logit_row:
                            logits[logit_row[row]] = out[lane_idx, column[start + n - 1]]
                        if seqs[row].sampling.prompt_logprobs is not None and batch.is_prefill(row):
                            cols = [column[c] for c in range(start, start + n)]
                            prompt_logprobs[row] = self._prompt_logprobs(seqs[row], out[lane_idx, cols], n)
        slots = torch.tensor([seqs[i].slot for i in sampling], dtype=torch.long, device=self.device)
        output = self._sample([seqs[i] for i in sampling], logits, slots, list(range(len(sampling))))
        output.prompt_logprobs = prompt_logprobs if any(p is not None for p in prompt_logprobs) else []
        return output

    def _forward_packed(
        self, model: torch.nn.Module, packed: PackedStep, lanes: list[Lane], batch: Batch, keep: torch.Tensor
    ) -> torch.Tensor:
        write_slots = packed.write_slots.to(self.device)
        varlen: VarlenSegments | None = None
        if self._runs_varlen(model):
            varlen = varlen_segments(packed, lanes, batch, self.kv, self.mirror, self.decode_kernel)
            self.kv.placement = PagedPlacement(write_slots=write_slots, read_blocks=None)
            # transformers passes a 4D mask through untouched; varlen attention reads the segments instead
            mask: torch.Tensor | dict[str, torch.Tensor] = torch.ones(
                (*packed.input_ids.shape[:1], 1, packed.input_ids.shape[1], 1),
                dtype=torch.bool,
                device=self.device,
            )
        else:
            mask = self._masks.build(
                packed.mask().to(self.device),
                packed.positions.to(self.device),
                packed.key_positions.to(self.device),
            )
            self.kv.placement = PagedPlacement(
                write_slots=write_slots, read_blocks=packed.read_blocks.to(self.device)
            )
        mixed = any(lane.adapter == MIXED for lane in lanes)
        try:
            return self._forward(
                model,
                packed.input_ids,
                packed.positions,
                mask,
                [lane.adapter for lane in lanes],
                keep=keep,
                token_adapters=packed.token_adapters(lanes, batch, BASE_ADAPTER) if mixed else None,
                varlen=varlen,
            )
        except BaseException:
            if varlen is not None and varlen.mirror is not None:
                varlen.mirror.forget()  # its rows may be half written
            raise

    def _prompt_logprobs(
        self, seq: Sequence, logits: torch.Tensor, length: int
    ) -> tuple[PositionLogprobs, ...]:
        """Raw logprobs of the prompt tokens this step computed, after the first: ``logits`` ``[length, V]``
        holds the columns of tokens ``num_cached..num_cached+length-1``."""
        k = seq.sampling.prompt_logprobs or 0
        start = seq.num_cached
        end = min(start + length, seq.num_prompt_tokens)
        targets = seq.token_ids[start + 1 : end]  # each predicted by the column before it
        if not targets:
            return ()
        predicting = logits[: len(targets)]  # [T, V]
        ids = torch.tensor(targets, dtype=torch.long, device=self.device)
        return tuple(position_logprobs(predicting, ids, k).to_host([k] * len(targets)))

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor, slots: torch.Tensor, rows: list[int]
    ) -> StepOutput:
        """Sample every row of ``logits`` (``seqs[i]`` is row ``rows[i]``; other rows are padding that samples
        into the scratch slot); rows of requests that asked for logprobs get them, top-k on the device. Rows
        of constrained requests sample only what their grammar allows next (a bitmask filled on the host)."""
        asking = [i for i, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
        ks = [seqs[i].sampling.logprobs or 0 for i in asking]
        logprob_rows = torch.tensor([rows[i] for i in asking], dtype=torch.long, device=self.device)
        constrained = [(rows[i], seq.constraint) for i, seq in enumerate(seqs) if seq.constraint is not None]
        bitmask = None
        if constrained:
            bitmask = fill_token_bitmask(logits.shape[0], self._vocab_size, constrained).to(self.device)
        sampled: SamplerOutput = self.sampler.sample(
            logits,
            slots,
            logprob_rows=logprob_rows if asking else None,
            num_logprobs=max(ks, default=0),
            token_bitmask=bitmask,
        )
        tokens = sampled.token_ids.tolist()
        output = StepOutput(token_ids=[tokens[r] for r in rows])
        if sampled.logprobs is not None:
            output.logprobs = [None] * len(seqs)
            for i, row in zip(asking, sampled.logprobs.to_host(ks), strict=True):
                output.logprobs[i] = row
        return output

    # ------------------------------------------------------------------------------------ helpers

    @property
    def _shared_model(self) -> torch.nn.Module:
        return self.base_model if self.store is None else self.store.model

    def _groups(self, seqs: list[Sequence], rows: Iterable[int]) -> list[_Group]:
        """Split the rows by the model they run on: the shared PEFT model, or a lease's merged snapshot."""
        shared = _Group(self._shared_model, [])
        groups: dict[int, _Group] = {}
        for seq, row in zip(seqs, rows, strict=True):
            snapshot = _snapshot(seq)
            if snapshot is None:
                shared.rows.append(row)
            else:
                groups.setdefault(id(snapshot), _Group(snapshot, [])).rows.append(row)
        return ([shared] if shared.rows else []) + list(groups.values())

    def _plans(self, group: _Group, batch: Batch) -> list[list[Lane]]:
        """The forwards of one group, each a list of lanes (batch rows). A decode step: one lane per
        sequence (each attends over its own blocks only). A step with prompt chunks: one lane per adapter
        version (one for all when the slots hold every adapter), decode rows and chunks together, in one
        forward. Its decode rows run in a forward of their own instead when packing costs more than the
        second forward: under masked attention (not varlen, which attends each sequence on its own) a
        lane's attention is (its tokens) x (its sequences' keys), past ``PACKED_ATTENTION_LIMIT``; or lanes
        of other adapters are padded to the chunk's width, past ``PADDING_SPLIT`` times the tokens of the
        two forwards."""
        rows = group.rows
        decode = [r for r in rows if not batch.is_prefill(r)]
        if len(decode) == len(rows):
            return [self._lanes(group, batch, rows, per_row=True)]
        packed = self._lanes(group, batch, rows, per_row=False)
        if not decode:
            return [packed]
        prefill = [r for r in rows if batch.is_prefill(r)]
        split = [
            self._lanes(group, batch, decode, per_row=True),
            self._lanes(group, batch, prefill, per_row=False),
        ]
        # varlen attention attends each sequence on its own: packing widens nothing but the padding
        too_wide = (
            not self._runs_varlen(group.model)
            and attention_size(packed, batch, self.kv.block_size) > PACKED_ATTENTION_LIMIT
        )
        # several adapters: every lane is padded to the one holding a chunk; past a point the padding costs
        # more than a second forward
        padded = _padded_tokens(packed, batch) > PADDING_SPLIT * sum(_padded_tokens(p, batch) for p in split)
        return split if too_wide or padded else [packed]

    def _lanes(self, group: _Group, batch: Batch, rows: list[int], *, per_row: bool) -> list[Lane]:
        """``rows`` as lanes: one per row, or one per adapter version (a snapshot's rows: no adapter), or,
        when the slots hold every adapter among them, one lane for all (routed token by token)."""
        seqs = batch.seqs
        shared = group.model is self._shared_model
        if per_row:
            return [Lane(_version(seqs[r]) if shared else BASE_ADAPTER, [r]) for r in rows]
        if not shared:
            return [Lane(BASE_ADAPTER, list(rows))]
        versions = [_version(seqs[r]) for r in rows]
        if len(set(versions)) > 1 and self._all_slotted(versions):
            return [Lane(MIXED, list(rows), row_adapters=versions)]
        lanes: dict[str, Lane] = {}
        for row in rows:
            name = _version(seqs[row])
            lanes.setdefault(name, Lane(name, [])).rows.append(row)
        return list(lanes.values())

    def _forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor],
        adapter_names: list[str],
        *,
        keep: torch.Tensor,
        token_adapters: list[list[str]] | None = None,
        varlen: VarlenSegments | None = None,
    ) -> torch.Tensor:
        """One forward over ``input_ids`` [B, S]; returns the logits of columns ``keep`` [K]: [B, K, V] in
        float32. ``token_adapters`` [B][S]: each column's adapter, for lanes of several adapters (slot
        LoRA routes them token by token). ``varlen``: the sequences, for attention per sequence."""
        kwargs: dict[str, object] = {}
        if varlen is not None:
            kwargs["varlen"] = varlen
        self._prepack(model)
        keep = keep.to(self.device)
        if token_adapters is not None:
            routing = self._token_routing(token_adapters, keep)
        else:
            routing = self._adapter_routing(model, adapter_names)
        with routing as peft_names:
            if peft_names is not None:
                kwargs["adapter_names"] = peft_names
            out = model(
                input_ids=input_ids.to(self.device),
                position_ids=positions.to(self.device),
                attention_mask=mask,
                past_key_values=self.kv,
                use_cache=True,
                logits_to_keep=keep,
                **kwargs,
            )
        return out.logits.float()

    # ------------------------------------------------------------------------------------ fast paths

    def _runs_varlen(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` attends per sequence (``server.runtime.varlen``): switched on at its first
        forward where it runs SDPA (a snapshot is a fresh load, so it is switched when it first runs);
        the model's config says so from then on."""
        return use_varlen(model)

    def _prepack(self, model: torch.nn.Module) -> None:
        """Pack ``model``'s linears for oneDNN once (``server.runtime.prepack``): a snapshot's after
        its merge, when it first runs."""
        if self.device.type == "cpu" and model not in self._prepacked:
            prepack(model, self._cpu_prepack)
            self._prepacked.add(model)

    # Slot LoRA (server/runtime/slot_lora.py) routes rows to adapters through a device tensor instead of
    # PEFT's adapter_names; decode graphs (server/runtime/cuda_graphs.py) replay whole decode steps (CUDA).
    # Slot LoRA is on by default on CUDA and on the CPU; PEFT's mixed-batch forward stays the reference and
    # serves the adapters the slots cannot hold.

    def _init_fast_path(self, cuda_graphs: bool, slot_lora: bool | None, max_lora_rank: int) -> None:
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.slot_lora: SlotLoRA | None = None
        # default: on with CUDA graphs (they need it) and on the CPU, where PEFT's per-layer Python loop over
        # a step's adapters cost more than the dense slot matmuls
        use_slots = (use_graphs or self.device.type == "cpu") if slot_lora is None else slot_lora
        if use_slots and self.store is not None:
            self.slot_lora = SlotLoRA(
                self.base_model,
                num_slots=self.store.max_gpu_adapters,
                r_max=max_lora_rank,
                # float32 slots on the CPU, for decode steps of few rows; wider forwards in the model's
                # dtype (server/runtime/slot_lora.py, SMALL_FORWARD_TOKENS), or in float32 where the CPU
                # has no bf16 kernels (server/runtime/prepack.py). The slots hold 2x the bytes.
                dtype=torch.float32 if self.device.type == "cpu" else self.dtype,
                wide_dtype=multiply_dtype(self.dtype) if self.device.type == "cpu" else self.dtype,
                device=self.device,
            )
            self.slot_lora.enabled = True
            self.store.set_gpu_listener(self.slot_lora)
        self.graphs: DecodeGraphs | None = None
        if use_graphs and (self.store is None or self.slot_lora is not None):
            self.graphs = self.new_decode_graphs()

    def new_decode_graphs(self) -> DecodeGraphs:
        """Decode graphs over this runner's model, KV cache, sampler and LoRA slots (off CUDA they run the
        same buffers eagerly, which is how the CPU tests check the graph step)."""
        return DecodeGraphs(
            model=lambda: self._shared_model,
            kv=self.kv,
            sampler=self.sampler,
            slot_lora=self.slot_lora,
            num_slots=self._num_slots,
            max_blocks_per_seq=-(-self._max_model_len // self.kv.block_size),
            device=self.device,
        )

    def _graphable(self, seqs: list[Sequence]) -> bool:
        """A decode step runs as a graph unless a row runs on a snapshot or on an adapter without a slot, or
        asks for logprobs or is constrained by a grammar (the graphs sample only; such a step runs eagerly)."""
        for seq in seqs:
            if seq.sampling.logprobs is not None or seq.constraint is not None:
                return False
            if _snapshot(seq) is not None:
                return False
            name = _version(seq)
            if name != BASE_ADAPTER and (self.slot_lora is None or not self.slot_lora.supports(name)):
                return False
        return True

    def _decode_graph(self, graphs: DecodeGraphs, seqs: list[Sequence]) -> StepOutput:
        """Batch -> StepOutput through a captured decode graph: row i is slot i for i in [0, rows), every
        row reads ``kv_len`` columns through its block table."""
        slot_lora = self.slot_lora
        decode_rows = [
            DecodeRow(
                slot=seq.slot,
                token=seq.token_ids[-1],
                position=seq.num_tokens - 1,
                lora_slot=0 if slot_lora is None else slot_lora.slot_of(_adapter_key(_version(seq))),
                blocks=tuple(seq.block_table),
            )
            for seq in seqs
        ]
        rows = bucket(max(seq.slot for seq in seqs) + 1, self._num_slots)
        kv_len = bucket(max(seq.num_tokens for seq in seqs), self._max_model_len, MIN_KV_BUCKET)
        tokens = graphs.run(rows, kv_len, decode_rows, self.sampler.features())
        return StepOutput(token_ids=[tokens[seq.slot] for seq in seqs])

    def _all_slotted(self, versions: list[str]) -> bool:
        """Whether slot LoRA serves every one of ``versions`` (base rows need no slot)."""
        slot_lora = self.slot_lora
        if slot_lora is None:
            return False
        keys = [_adapter_key(v) for v in versions]
        return all(key is None or slot_lora.supports(key) for key in keys)

    @contextlib.contextmanager
    def _token_routing(
        self, token_adapters: list[list[str]], keep: torch.Tensor
    ) -> Iterator[list[str] | None]:
        """Route every column of a forward over MIXED lanes to its adapter's slot (the slots hold them
        all: see ``_lanes``)."""
        slot_lora = self.slot_lora
        assert slot_lora is not None  # MIXED lanes are built only with slot LoRA
        slot_of = {name: slot_lora.slot_of(_adapter_key(name)) for lane in token_adapters for name in lane}
        token_slots = torch.tensor(
            [[slot_of[n] for n in lane] for lane in token_adapters], device=self.device
        )
        with slot_lora.routing(token_slots, keep=keep, span=slot_lora.span_of(slot_of.values())):
            yield None  # no adapter_names: the slots route every row

    @contextlib.contextmanager
    def _adapter_routing(
        self, model: torch.nn.Module, adapter_names: list[str]
    ) -> Iterator[list[str] | None]:
        """Route an eager forward's rows to their adapters; yields the ``adapter_names`` to pass (None: pass
        none). Without slot LoRA: PEFT's ``adapter_names`` when the model is a PeftModel. With it: rows whose
        adapter has a slot go through the slots, the others (an adapter the slots cannot hold) through PEFT's
        ``adapter_names``, in the same forward."""
        slot_lora = self.slot_lora
        if slot_lora is None or model is not self._shared_model:
            yield adapter_names if _is_peft(model) else None
            return
        keys = [_adapter_key(name) for name in adapter_names]
        if all(key is None for key in keys):
            yield None  # base rows only: no delta to add (the hooks add none outside routing)
            return
        slotted = [key is None or slot_lora.supports(key) for key in keys]
        slots = [
            slot_lora.slot_of(key) if ok else slot_lora.base_slot
            for key, ok in zip(keys, slotted, strict=True)
        ]
        row_slots = torch.tensor(slots, device=self.device)
        span = slot_lora.span_of(slots)
        if all(slotted):
            with slot_lora.routing(row_slots, span=span):
                yield None
            return
        peft_names = [BASE_ADAPTER if ok else name for name, ok in zip(adapter_names, slotted, strict=True)]
        with slot_lora.routing(row_slots, peft_rows=True, span=span):
            yield peft_names


def _padded_tokens(lanes: list[Lane], batch: Batch) -> int:
    """Token rows a forward over ``lanes`` computes, padding included."""
    return len(lanes) * max(sum(batch.num_new_tokens[r] for r in lane.rows) for lane in lanes)


def _adapter_key(version: str) -> str | None:
    return None if version == BASE_ADAPTER else version


def _store_lease(lease: AdapterLease) -> Lease:
    """The runner hands out the store's leases only: anything else is a wiring bug."""
    if not isinstance(lease, Lease):
        raise TypeError(f"not an adapter store lease: {type(lease).__name__}")
    return lease


def _version(seq: Sequence) -> str:
    """The adapter version a row runs (PEFT's adapter name, the LoRA slot key), BASE_ADAPTER for none."""
    return BASE_ADAPTER if seq.lease is None else seq.lease.version


def _snapshot(seq: Sequence) -> torch.nn.Module | None:
    return None if seq.lease is None else _store_lease(seq.lease).snapshot


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype activations flow in: the 4-bit layers' compute dtype, else the embedding's dtype."""
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
