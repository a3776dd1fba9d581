"""Static KV memory for the running sequences, sized once at start-up.

Per layer, keys and values live in ``[num_slots, kv_heads, max_len + 1, head_dim]``: one slot per running
sequence, one extra column (index ``max_len``) where padding tokens write and nothing ever reads. The
cache plugs into transformers' attention through the ``update(key, value, layer_idx)`` hook; before each
forward the runner sets where the step's tokens go:

- ``view`` mode (decode): batch row ``i`` *is* slot ``i``; attention reads ``[:rows, :, :kv_len]``, a view,
  so a decode step copies no KV and keeps fixed shapes per (rows, kv_len) bucket (CUDA-graph ready).
- ``gather`` mode (prefill, snapshot rows): rows name their slots in ``slot_ids``; attention reads a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class StepPlacement:
    """Where one forward's tokens go. ``write_pos`` [B, S]: KV column of each token (``max_len`` for
    padding). ``slot_ids`` [B] in gather mode, None in view mode. ``kv_len``: columns attention reads."""

    write_pos: torch.Tensor
    kv_len: int
    slot_ids: torch.Tensor | None = None


class SlotKVCache:
    """KV tensors for every layer plus the placement of the step being run."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self.placement: StepPlacement | None = None

    def place_decode(self, positions: torch.Tensor, active: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Set a view-mode placement for one decode token per row and return its attention mask [R, L].

        positions ``[R, 1]``, active ``[R, 1]`` bool. Active rows write at their position and attend to
        their past; inactive rows (free slots, rows run by another model this step) write to the scratch
        column and attend to column 0 only, so no row is all -inf. No host sync: graph-safe.
        """
        cols = torch.arange(kv_len, device=positions.device)[None, :]  # [1, L]
        self.placement = StepPlacement(write_pos=torch.where(active, positions, self.max_len), kv_len=kv_len)
        return ((cols <= positions) & active) | (~active & (cols == 0))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (``[B, H, S, D]``) and return what attention reads."""
        placement = self.placement
        if placement is None:
            raise RuntimeError("SlotKVCache.update called outside a runner step")
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        rows, _, seq_len, _ = key_states.shape
        if placement.slot_ids is None:
            slots = torch.arange(rows, device=key_states.device)
        else:
            slots = placement.slot_ids
        slot_index = slots[:, None].expand(rows, seq_len)  # [B, S]
        k_cache[slot_index, :, placement.write_pos] = key_states.transpose(1, 2).to(k_cache.dtype)
        v_cache[slot_index, :, placement.write_pos] = value_states.transpose(1, 2).to(v_cache.dtype)
        if placement.slot_ids is None:
            return k_cache[:rows, :, : placement.kv_len], v_cache[:rows, :, : placement.kv_len]
        return k_cache[:, :, : placement.kv_len][slots], v_cache[:, :, : placement.kv_len][slots]

    # transformers asks these of a cache object in some code paths
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
