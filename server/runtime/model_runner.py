"""The only place that runs the model: prefill and decode steps for a batch of sequences, each row with its
own adapter (PEFT's mixed-batch ``adapter_names``), its own position and its own KV slot.

Shapes are bucketed so a decode step can be captured as a CUDA graph: a decode batch covers slots
``[0, rows)`` with ``rows`` a power of two, and attention reads ``kv_len`` columns, also a power of two.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.engine.types import (
    AdapterLease,
    AdapterUnavailableError,
    Batch,
    PositionLogprobs,
    Sequence,
    StepOutput,
    UnknownModelError,
)
from server.runtime.attention import MaskLayout
from server.runtime.cuda_graphs import DecodeGraphs, DecodeRow
from server.runtime.kv_cache import SlotKVCache, StepPlacement
from server.runtime.sampler import LogprobsMode, Sampler, SamplerOutput, position_logprobs
from server.runtime.slot_lora import SlotLoRA
from server.runtime.token_bitmask import fill_token_bitmask
from server.runtime.tokenizer import HFTokenizer

log = logging.getLogger("loraserve.runtime")

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIN_KV_BUCKET = 32


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
        store: object | None = None,
        cuda_graphs: bool = True,
        slot_lora: bool | None = None,
        max_lora_rank: int = 16,
        logprobs_mode: LogprobsMode = "raw_logprobs",
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
        self.kv = SlotKVCache(
            num_layers=text_config.num_hidden_layers,
            num_slots=num_slots,
            num_kv_heads=getattr(text_config, "num_key_value_heads", num_heads),
            head_dim=head_dim,
            max_len=max_model_len,
            dtype=self.dtype,
            device=self.device,
        )
        self.sampler = Sampler(
            self._vocab_size, num_slots, self.device, logprobs_mode, num_valid_ids=tokenizer.num_ids
        )
        self._masks = MaskLayout.of(model, self.dtype)
        self._init_fast_path(cuda_graphs and self._masks.is_plain, slot_lora, max_lora_rank)
        log.info(
            "KV memory: %d slots x %d tokens = %.1f MiB on %s",
            num_slots,
            max_model_len,
            self.kv.nbytes / 2**20,
            self.device,
        )

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

    def adapter_names(self) -> list[str]:
        return [] if self.store is None else sorted(self.store.registry.names())  # type: ignore[attr-defined]

    def has_adapter(self, name: str) -> bool:
        return self.store is not None and self.store.registry.get(name) is not None  # type: ignore[attr-defined]

    def acquire_adapter(self, name: str) -> AdapterLease | None:
        if self.store is None:
            raise UnknownModelError(f"the model {name!r} does not exist", param="model")
        from adapter_store import AdapterLoadError, AdapterRefusedError

        try:
            lease: AdapterLease | None = self.store.acquire(name)  # type: ignore[attr-defined]
        except AdapterRefusedError as exc:
            if exc.status == 404:
                raise UnknownModelError(f"the model {name!r} does not exist", param="model") from exc
            raise AdapterUnavailableError(str(exc), status=exc.status) from exc
        except AdapterLoadError as exc:
            raise AdapterUnavailableError(str(exc), status=exc.status) from exc
        return lease

    def release_adapter(self, lease: AdapterLease) -> None:
        if self.store is not None:
            self.store.release(lease)  # type: ignore[attr-defined]

    def housekeeping(self) -> None:
        if self.store is not None:
            self.store.sync()  # type: ignore[attr-defined]

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        if self.store is not None:
            self.store.set_wakeup(wake)  # type: ignore[attr-defined]

    def free_slot(self, slot: int) -> None:
        self.sampler.free(slot)

    @torch.inference_mode()
    def step(self, batch: Batch) -> StepOutput:
        if batch.kind == "prefill":
            return self._prefill(batch.seqs)
        return self._decode(batch.seqs)

    # ------------------------------------------------------------------------------------ steps

    def _prefill(self, seqs: list[Sequence]) -> StepOutput:
        """Batch -> StepOutput for new sequences: left-padded prompts, so every row's last token sits in
        the last column and ``logits_to_keep=1`` gives each row's next-token logits."""
        for seq in seqs:
            if seq.num_cached == 0:
                stop_ids = self._tokenizer.eos_token_ids | set(seq.sampling.stop_token_ids)
                self.sampler.start(seq.slot, seq.token_ids, seq.sampling, seq.seed, sorted(stop_ids))
        lengths = [seq.num_tokens - seq.num_cached for seq in seqs]
        width = max(lengths)
        rows = len(seqs)
        scratch = self._max_model_len
        input_ids = torch.zeros(rows, width, dtype=torch.long)  # [B, S]
        rope_pos = torch.zeros(rows, width, dtype=torch.long)  # [B, S]
        write_pos = torch.full((rows, width), scratch, dtype=torch.long)  # [B, S]
        for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            positions = torch.arange(seq.num_cached, seq.num_tokens)
            input_ids[i, width - n :] = torch.tensor(seq.token_ids[seq.num_cached :])
            rope_pos[i, width - n :] = positions
            write_pos[i, width - n :] = positions
        kv_len = bucket(max(seq.num_tokens for seq in seqs), self._max_model_len, MIN_KV_BUCKET)
        # each real query attends to its own past; padding queries attend to column 0 so no row is all -inf
        cols = torch.arange(kv_len)
        mask = cols[None, None, :] <= rope_pos[:, :, None]  # [B, S, L]
        mask |= (write_pos == scratch)[:, :, None] & (cols == 0)[None, None, :]
        slots = torch.tensor([seq.slot for seq in seqs], dtype=torch.long)
        logits = torch.empty(rows, self._vocab_size, dtype=torch.float32, device=self.device)
        prompt_logprobs: list[tuple[PositionLogprobs, ...] | None] = [None] * rows
        for group in self._groups(seqs, range(rows)):
            idx = torch.tensor(group.rows, dtype=torch.long)
            self.kv.placement = StepPlacement(
                write_pos=write_pos[idx].to(self.device), kv_len=kv_len, slot_ids=slots[idx].to(self.device)
            )
            # Rows asking for prompt logprobs need every position's logits: the whole group computes them.
            wants_prompt = [r for r in group.rows if seqs[r].sampling.prompt_logprobs is not None]
            out = self._forward(
                group.model,
                input_ids[idx],
                rope_pos[idx],
                mask[idx].unsqueeze(1),
                [self._peft_name(seqs[r]) for r in group.rows],
                all_positions=bool(wants_prompt),
            )  # [G, V], or [G, S, V] with all_positions
            logits[idx.to(self.device)] = out[:, -1, :] if wants_prompt else out
            for r in wants_prompt:
                prompt_logprobs[r] = self._prompt_logprobs(
                    seqs[r], out[group.rows.index(r)], width, lengths[r]
                )
        output = self._sample(seqs, logits, slots.to(self.device), list(range(rows)))
        output.prompt_logprobs = prompt_logprobs if any(p is not None for p in prompt_logprobs) else []
        return output

    def _prompt_logprobs(
        self, seq: Sequence, logits: torch.Tensor, width: int, length: int
    ) -> tuple[PositionLogprobs, ...]:
        """Raw logprobs of the prompt tokens this prefill computed, after the first: ``logits`` ``[S, V]`` is
        one left-padded row whose last ``length`` columns hold tokens ``num_cached..num_tokens-1``."""
        k = seq.sampling.prompt_logprobs or 0
        start = seq.num_cached
        targets = seq.token_ids[start + 1 : seq.num_tokens]  # each predicted by the column before it
        if not targets:
            return ()
        predicting = logits[width - length : width - 1]  # [length - 1, V]
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

    def _decode(self, seqs: list[Sequence]) -> StepOutput:
        """Batch -> StepOutput for running sequences: row i is slot i for i in [0, rows); rows of free slots
        (and rows that run on a snapshot) write only to the scratch column."""
        rows = bucket(max(seq.slot for seq in seqs) + 1, self._num_slots)
        if self.graphs is not None and not self.graphs.failed and self._graphable(seqs):
            return self._decode_graph(self.graphs, seqs, rows)
        by_slot: dict[int, Sequence] = {seq.slot: seq for seq in seqs}
        input_ids = torch.zeros(rows, 1, dtype=torch.long)  # [R, 1]
        rope_pos = torch.zeros(rows, 1, dtype=torch.long)  # [R, 1]
        for slot, seq in by_slot.items():
            input_ids[slot, 0] = seq.token_ids[-1]
            rope_pos[slot, 0] = seq.num_tokens - 1
        kv_len = bucket(int(rope_pos.max()) + 1, self._max_model_len, MIN_KV_BUCKET)
        cols = torch.arange(kv_len)
        logits = torch.empty(rows, self._vocab_size, dtype=torch.float32, device=self.device)
        sample_slots = torch.full((rows,), self._num_slots, dtype=torch.long)
        for slot in by_slot:
            sample_slots[slot] = slot
        groups = self._groups(seqs, [seq.slot for seq in seqs])
        for group in groups:
            if group.model is self._shared_model:
                # every row of the view runs; rows outside this group write to the scratch column only
                active = torch.zeros(rows, dtype=torch.bool)
                active[group.rows] = True
                names = [self._peft_name(by_slot[r]) if active[r] else BASE_ADAPTER for r in range(rows)]
                mask = self.kv.place_decode(rope_pos.to(self.device), active[:, None].to(self.device), kv_len)
                out = self._forward(group.model, input_ids, rope_pos, mask[:, None, None, :], names)
                logits[active.to(self.device)] = out[active.to(self.device)]
            else:
                idx = torch.tensor(group.rows, dtype=torch.long)
                self.kv.placement = StepPlacement(
                    write_pos=rope_pos[idx].to(self.device), kv_len=kv_len, slot_ids=idx.to(self.device)
                )
                mask = cols[None, :] <= rope_pos[idx]
                names = [BASE_ADAPTER] * len(group.rows)
                logits[idx.to(self.device)] = self._forward(
                    group.model, input_ids[idx], rope_pos[idx], mask[:, None, None, :], names
                )
        return self._sample(seqs, logits, sample_slots.to(self.device), [seq.slot for seq in seqs])

    # ------------------------------------------------------------------------------------ helpers

    @property
    def _shared_model(self) -> torch.nn.Module:
        return self.base_model if self.store is None else self.store.model  # type: ignore[attr-defined]

    def _groups(self, seqs: list[Sequence], rows: Iterable[int]) -> list[_Group]:
        """Split the rows by the model they run on: the shared PEFT model, or a lease's merged snapshot."""
        shared = _Group(self._shared_model, [])
        groups: dict[int, _Group] = {}
        for seq, row in zip(seqs, rows, strict=True):
            snapshot = getattr(seq.lease, "snapshot", None)
            if snapshot is None:
                shared.rows.append(row)
            else:
                groups.setdefault(id(snapshot), _Group(snapshot, [])).rows.append(row)
        return ([shared] if shared.rows else []) + list(groups.values())

    @staticmethod
    def _peft_name(seq: Sequence) -> str:
        name = getattr(seq.lease, "peft_name", None)
        return BASE_ADAPTER if name is None else str(name)

    def _forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        rope_pos: torch.Tensor,
        mask: torch.Tensor,
        adapter_names: list[str],
        *,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """One forward over ``input_ids`` [B, S]; returns the last column's logits [B, V] in float32 (every
        column's, [B, S, V], with ``all_positions``)."""
        kwargs: dict[str, object] = {}
        with self._adapter_routing(model, adapter_names) as peft_names:
            if peft_names is not None:
                kwargs["adapter_names"] = peft_names
            positions = rope_pos.to(self.device)
            out = model(
                input_ids=input_ids.to(self.device),
                position_ids=positions,
                attention_mask=self._masks.build(mask.to(self.device), positions),
                past_key_values=self.kv,
                use_cache=True,
                logits_to_keep=0 if all_positions else 1,
                **kwargs,
            )
        return out.logits.float() if all_positions else out.logits[:, -1, :].float()

    # ------------------------------------------------------------------------------------ GPU fast path
    # Slot LoRA (server/runtime/slot_lora.py) routes rows to adapters through a device tensor instead of
    # PEFT's adapter_names; decode graphs (server/runtime/cuda_graphs.py) replay whole decode steps. Both are
    # on by default on CUDA; on the CPU PEFT's mixed-batch forward stays the path (and the reference).

    def _init_fast_path(self, cuda_graphs: bool, slot_lora: bool | None, max_lora_rank: int) -> None:
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.slot_lora: SlotLoRA | None = None
        if (use_graphs if slot_lora is None else slot_lora) and self.store is not None:
            self.slot_lora = SlotLoRA(
                self.base_model,
                num_slots=self.store.max_gpu_adapters,  # type: ignore[attr-defined]
                r_max=max_lora_rank,
                dtype=self.dtype,
                device=self.device,
            )
            self.slot_lora.enabled = True
            self.store.set_gpu_listener(self.slot_lora)  # type: ignore[attr-defined]
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
            device=self.device,
        )

    def _graphable(self, seqs: list[Sequence]) -> bool:
        """A decode step runs as a graph unless a row runs on a snapshot or on an adapter without a slot, or
        asks for logprobs or is constrained by a grammar (the graphs sample only; such a step runs eagerly)."""
        for seq in seqs:
            if seq.sampling.logprobs is not None or seq.constraint is not None:
                return False
            if getattr(seq.lease, "snapshot", None) is not None:
                return False
            name = self._peft_name(seq)
            if name != BASE_ADAPTER and (self.slot_lora is None or not self.slot_lora.supports(name)):
                return False
        return True

    def _decode_graph(self, graphs: DecodeGraphs, seqs: list[Sequence], rows: int) -> StepOutput:
        """Batch -> StepOutput through a captured decode graph (same rows and buckets as ``_decode``)."""
        slot_lora = self.slot_lora
        decode_rows = [
            DecodeRow(
                slot=seq.slot,
                token=seq.token_ids[-1],
                position=seq.num_tokens - 1,
                lora_slot=0 if slot_lora is None else slot_lora.slot_of(_adapter_key(self._peft_name(seq))),
            )
            for seq in seqs
        ]
        kv_len = bucket(max(seq.num_tokens for seq in seqs), self._max_model_len, MIN_KV_BUCKET)
        tokens = graphs.run(rows, kv_len, decode_rows, self.sampler.features())
        return StepOutput(token_ids=[tokens[seq.slot] for seq in seqs])

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
        slotted = [key is None or slot_lora.supports(key) for key in keys]
        row_slots = torch.tensor(
            [
                slot_lora.slot_of(key) if ok else slot_lora.base_slot
                for key, ok in zip(keys, slotted, strict=True)
            ],
            device=self.device,
        )
        if all(slotted):
            with slot_lora.routing(row_slots):
                yield None
            return
        peft_names = [BASE_ADAPTER if ok else name for name, ok in zip(adapter_names, slotted, strict=True)]
        with slot_lora.routing(row_slots, peft_rows=True):
            yield peft_names


def _adapter_key(peft_name: str) -> str | None:
    return None if peft_name == BASE_ADAPTER else peft_name


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype activations flow in: the 4-bit layers' compute dtype, else the embedding's dtype."""
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
