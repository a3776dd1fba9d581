"""Mixed-adapter LoRA that a CUDA graph can capture: per-row adapter slots in a device tensor.

PEFT's mixed batch (``adapter_names=[...]``) groups rows on the host, per layer, per step: it cannot be
captured and it loops in Python over the adapters of every layer. Here every LoRA-wrapped linear layer
gets stacked slot tensors instead, filled when an adapter enters the GPU tier and zeroed when it leaves::

    lora_a: [num_slots, r_max, in]    A of each slot, ranks zero-padded to r_max
    lora_b: [num_slots, r_max, out]   (scaling * B)^T of each slot, same padding

and each forward names every row's slot in a device tensor (``num_slots``, one past the last stored slot,
is the reserved all-zero slot: base rows). The delta is computed densely over the slots with two matmuls,
the per-row choice being a 0/1 mask between them::

    h = x @ lora_a.view(S * r, in).T        # [N, S*r]: every row through every slot's A
    h = h * row_mask                        # [N, S*r]: keep only the row's own slot (zero for base rows)
    y = base(x) + h @ lora_b.view(S * r, out)

That reads every slot's weights once per layer (not once per row, as a gather + bmm would), costs three
kernels per layer whatever the batch, and has fixed shapes per batch bucket. With S*r a few hundred the two
matmuls are tiny next to the base layer's.

The delta is added by forward hooks on the *base* linear modules (the ``base_layer`` inside PEFT's LoRA
wrappers), and PEFT's own LoRA layers are switched off while slot routing is enabled, so the PeftModel's
forward computes base + slot delta. Switching routing off restores PEFT's own forward: it stays the
reference (and the CPU serving path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("loraserve.runtime")


class UnsupportedAdapterError(ValueError):
    """An adapter the slot tensors cannot represent (a LoRA variant such as DoRA, a LoRA bias, a rank above
    ``r_max``, or no free slot); its rows must run on PEFT's own forward."""


@dataclass(slots=True)
class _LayerSlots:
    """Slot tensors of one base linear layer and the hook that adds their delta."""

    lora_a: torch.Tensor  # [S, r_max, in]
    lora_b: torch.Tensor  # [S, r_max, out], scaling folded in
    handle: RemovableHandle | None = None
    used_by: set[int] = field(default_factory=set)  # slots holding weights here


class SlotLoRA:
    """Stacked LoRA slot tensors for a model's LoRA layers, and per-row routing to them.

    ``on_gpu_enter(key, peft_model)`` / ``on_gpu_leave(key)`` follow the adapter store's GPU tier (it is an
    ``adapter_store.store.GpuTierListener``). ``slot_of(key)`` gives a resident adapter's slot;
    ``routing(row_slots)`` sets the rows of the next forward(s). ``generation`` changes whenever a layer's
    slot tensors are (re)allocated: captured graphs taken before hold stale addresses and must be dropped.
    """

    def __init__(self, *, num_slots: int, r_max: int, dtype: torch.dtype, device: torch.device) -> None:
        if num_slots < 1 or r_max < 1:
            raise ValueError(f"num_slots and r_max must be positive, got {num_slots}, {r_max}")
        self.num_slots = num_slots
        self.r_max = r_max
        self.dtype = dtype
        self.device = torch.device(device)
        self.base_slot = num_slots  # the reserved all-zero slot
        self.generation = 0
        self._layers: dict[torch.nn.Module, _LayerSlots] = {}
        self._slots: dict[str, int] = {}  # adapter key (PEFT name) -> slot
        self._unsupported: dict[str, str] = {}  # adapter key -> why
        self._peft_layers: list[torch.nn.Module] = []  # PEFT LoRA layers seen, to switch on/off
        self._enabled = False
        self._row_mask: torch.Tensor | None = None  # [B, S*r_max] while routing

    # ------------------------------------------------------------------------------- store events
    def on_gpu_enter(self, key: str, peft_model: torch.nn.Module) -> None:
        """Adapter ``key`` was added to ``peft_model``: copy its weights into a free slot."""
        self.on_gpu_leave(key)
        try:
            weights = list(_lora_weights(peft_model, key, self.r_max))
            slot = next(s for s in range(self.num_slots) if s not in self._slots.values())
        except StopIteration:
            self._unsupported[key] = f"all {self.num_slots} LoRA slots are taken"
        except UnsupportedAdapterError as e:
            self._unsupported[key] = str(e)
        else:
            for base, a, b in weights:
                layer = self._layer(base)
                rank = a.shape[0]
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                layer.lora_a[slot, :rank].copy_(a)
                layer.lora_b[slot, :rank].copy_(b)
                layer.used_by.add(slot)
            self._slots[key] = slot
        if key in self._unsupported:
            log.warning("adapter %s runs on PEFT's forward: %s", key, self._unsupported[key])
        self._peft_layers = [m for m in peft_model.modules() if hasattr(m, "lora_A")]
        self._apply_enabled()

    def on_gpu_leave(self, key: str) -> None:
        """Adapter ``key`` left the GPU tier: zero its slot everywhere and free it."""
        self._unsupported.pop(key, None)
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        for layer in self._layers.values():
            if slot in layer.used_by:
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                layer.used_by.discard(slot)

    # ------------------------------------------------------------------------------------ routing
    def supports(self, key: str) -> bool:
        return key in self._slots

    def slot_of(self, key: str | None) -> int:
        """The slot of resident adapter ``key`` (None: the base slot)."""
        if key is None:
            return self.base_slot
        slot = self._slots.get(key)
        if slot is None:
            why = self._unsupported.get(key, "it is not on the GPU tier")
            raise UnsupportedAdapterError(f"adapter {key!r} has no LoRA slot: {why}")
        return slot

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """On: the slot hooks add the deltas and PEFT's LoRA layers act as their base layer. Off: PEFT's own
        forward (``adapter_names``) and no slot delta."""
        self._enabled = value
        self._apply_enabled()

    @contextmanager
    def routing(self, row_slots: torch.Tensor) -> Iterator[None]:
        """Route the forwards inside to ``row_slots`` [B] (int64 on the device; ``base_slot`` for base rows).
        Pure tensor ops on ``row_slots``: a graph captured inside reads whatever the tensor holds at replay."""
        if not self._enabled:
            raise RuntimeError("SlotLoRA.routing needs enabled = True")
        slots = torch.arange(self.num_slots, device=row_slots.device)
        one_hot = (row_slots[:, None] == slots[None, :]).to(self.dtype)  # [B, S]
        rows = row_slots.shape[0]
        self._row_mask = one_hot[:, :, None].expand(rows, self.num_slots, self.r_max).reshape(rows, -1)
        try:
            yield
        finally:
            self._row_mask = None

    # ------------------------------------------------------------------------------------ internals
    def _layer(self, base: torch.nn.Module) -> _LayerSlots:
        layer = self._layers.get(base)
        if layer is None:
            in_features, out_features = _features(base)
            shape = (self.num_slots, self.r_max)
            layer = _LayerSlots(
                lora_a=torch.zeros(*shape, in_features, dtype=self.dtype, device=self.device),
                lora_b=torch.zeros(*shape, out_features, dtype=self.dtype, device=self.device),
            )
            layer.handle = base.register_forward_hook(self._hook(layer))
            self._layers[base] = layer
            self.generation += 1
        return layer

    def _hook(self, layer: _LayerSlots) -> Callable[..., torch.Tensor]:
        def add_delta(
            module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
        ) -> torch.Tensor:
            mask = self._row_mask
            if not self._enabled or mask is None:
                return out
            x = args[0]
            rows = mask.shape[0]
            a = layer.lora_a.view(-1, layer.lora_a.shape[-1])  # [S*r, in]
            b = layer.lora_b.view(-1, layer.lora_b.shape[-1])  # [S*r, out]
            h = (x.to(self.dtype).reshape(rows, -1, a.shape[1]) @ a.T) * mask[:, None, :]  # [B, T, S*r]
            delta_in = h.reshape(-1, a.shape[0])  # [B*T, S*r]
            y = torch.addmm(out.reshape(-1, b.shape[1]).to(self.dtype), delta_in, b)  # [B*T, out]
            return y.to(out.dtype).view(out.shape)

        return add_delta

    def _apply_enabled(self) -> None:
        # PEFT's public enable_adapters(True) re-runs set_adapter on every layer; the flag is what forward reads
        for module in self._peft_layers:
            setattr(module, "_disable_adapters", self._enabled)  # noqa: B010


def _features(base: torch.nn.Module) -> tuple[int, int]:
    in_features = getattr(base, "in_features", None)
    out_features = getattr(base, "out_features", None)
    if not isinstance(in_features, int) or not isinstance(out_features, int):
        raise UnsupportedAdapterError(f"{type(base).__name__} is not a linear layer")
    return in_features, out_features


def _lora_weights(
    peft_model: torch.nn.Module, key: str, r_max: int
) -> Iterator[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(base layer, A [r, in], (scaling * B)^T [r, out]) for every layer where adapter ``key`` lives."""
    found = False
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or key not in lora_a:
            continue
        found = True
        if key in getattr(module, "lora_variant", {}):
            raise UnsupportedAdapterError(f"{name} uses a LoRA variant (DoRA and the like)")
        lora_b: torch.nn.ModuleDict = module.lora_B
        scalings: dict[str, float] = module.scaling
        base_layer: torch.nn.Module = module.base_layer
        a_layer, b_layer = lora_a[key], lora_b[key]
        if getattr(b_layer, "bias", None) is not None:
            raise UnsupportedAdapterError(f"{name} has a LoRA bias")
        a, b = a_layer.weight, b_layer.weight  # [r, in], [out, r]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.ndim != 2 or b.ndim != 2:
            raise UnsupportedAdapterError(f"{name} is not a linear LoRA layer")
        if a.shape[0] > r_max:
            raise UnsupportedAdapterError(f"{name} has rank {a.shape[0]}, above the slot rank {r_max}")
        yield base_layer, a, (b * float(scalings[key])).T
    if not found:
        raise UnsupportedAdapterError(f"adapter {key!r} has no LoRA layer in the model")
