"""Mixed-adapter LoRA that a CUDA graph can capture: per-row adapter slots in a device tensor.

PEFT's mixed batch (``adapter_names=[...]``) groups rows on the host, per layer, per step: it cannot be
captured and it loops in Python over the adapters of every layer. Here every LoRA-targeted linear layer
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
matmuls are tiny next to the base layer's. An eager forward names the slots its rows use (``span``), and
the matmuls run over those slots only: on the CPU such a tiny matmul costs about its fixed overhead, and a
one-adapter decode step over all 8 slots of rank 16 spent 19 of its 57 ms there.

Loading. An adapter reaches the slots straight from its PEFT state dict, without PEFT: ``prepare`` (any
thread; the adapter store runs it on its loader threads) turns the state dict into slot form on the host
(padded, scaled, transposed, in the slot dtype, in one pinned buffer on CUDA hosts), and ``on_gpu_enter``
(engine thread) only copies those tensors into a free slot, two asynchronous host-to-device copies per
layer. An adapter the slots cannot represent (a LoRA variant such as DoRA, a LoRA bias, a rank above
``r_max``, a target that is not a linear layer, no free slot) is refused there, and the store puts it into
the PeftModel instead: its rows run on PEFT's own forward.

The delta is added by forward hooks on the *base* linear modules (the very modules PEFT wraps as
``base_layer``, so the hooks survive PEFT wrapping them), and PEFT's own LoRA layers are switched off while
slot routing is enabled. ``routing(..., peft_rows=True)`` switches them back on for one forward, so rows
routed by PEFT's ``adapter_names`` and rows routed to slots share a step. Switching routing off restores
PEFT's own forward: it stays the reference (and serves what the slots refuse).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("loraserve.runtime")

# forwards of at most this many tokens compute the delta in ``dtype`` (float32 on the CPU: a rank-16 matmul
# there costs ~5 us against ~30 us of fixed overhead in bf16); wider ones in ``wide_dtype`` (the model's:
# float32 deltas for a 512-token bf16 chunk were 5-9x slower than bf16 ones)
SMALL_FORWARD_TOKENS = 8
_PREFIX = "base_model.model."
_WEIGHT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# LoraConfig fields that change what a LoRA layer computes beyond base + scaling * B(A(x)), or add
# modules the slots do not hold (a truthy value makes the adapter run on PEFT's forward)
_UNSUPPORTED_FIELDS = (
    "use_dora",
    "use_qalora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
)


class UnsupportedAdapterError(ValueError):
    """An adapter the slot tensors cannot represent (a LoRA variant such as DoRA, a LoRA bias, a rank above
    ``r_max``, or no free slot); its rows must run on PEFT's own forward."""


@dataclass(slots=True, frozen=True)
class SlotWeights:
    """One adapter in slot form on the host, made by ``SlotLoRA.prepare``: per target layer (its module name
    in the base model) A ``[r_max, in]`` and ``(scaling * B)^T`` ``[r_max, out]``, zero-padded, in the slot
    dtype. ``unsupported`` says why the slots cannot hold the adapter (then ``layers`` is empty)."""

    layers: tuple[tuple[str, torch.Tensor, torch.Tensor], ...] = ()
    unsupported: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for _, a, b in self.layers)


@dataclass(slots=True)
class _LayerSlots:
    """Slot tensors of one base linear layer and the hook that adds their delta."""

    lora_a: torch.Tensor  # [S, r_max, in]
    lora_b: torch.Tensor  # [S, r_max, out], scaling folded in
    handle: RemovableHandle | None = None
    used_by: set[int] = field(default_factory=set)  # slots holding weights here


class SlotLoRA:
    """Stacked LoRA slot tensors for the linear layers of ``model`` (the base model, PEFT-wrapped or not),
    and per-row routing to them.

    It is an ``adapter_store.store.GpuTierListener``: ``prepare`` on the store's loader threads,
    ``on_gpu_enter`` / ``on_gpu_leave`` / ``on_peft_change`` on the engine thread. ``slot_of(key)`` gives a
    resident adapter's slot; ``routing(row_slots)`` sets the rows of the next forward(s). ``generation``
    changes whenever a layer's slot tensors are (re)allocated: captured graphs taken before hold stale
    addresses and must be dropped.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_slots: int,
        r_max: int,
        dtype: torch.dtype,
        device: torch.device,
        wide_dtype: torch.dtype | None = None,
    ) -> None:
        if num_slots < 1 or r_max < 1:
            raise ValueError(f"num_slots and r_max must be positive, got {num_slots}, {r_max}")
        self.num_slots = num_slots
        self.r_max = r_max
        self.dtype = dtype  # of the slots, and of the delta of a forward of few tokens
        self.wide_dtype = wide_dtype  # of the delta of a wider forward (None: dtype)
        self.device = torch.device(device)
        self.base_slot = num_slots  # the reserved all-zero slot
        self.generation = 0
        self._linears = _linear_modules(model)  # module name -> base linear module (read-only after init)
        self._layers: dict[torch.nn.Module, _LayerSlots] = {}
        self._slots: dict[str, int] = {}  # adapter key (PEFT name) -> slot
        self._unsupported: dict[str, str] = {}  # adapter key -> why
        self._peft_layers: list[torch.nn.Module] = []  # PEFT LoRA layers in the model, to switch on/off
        self._enabled = False
        self._row_mask: torch.Tensor | None = None  # [B, S*r_max] while routing rows
        # while routing tokens: their masks by token count, [B*T, S*r_max] (and the kept columns')
        self._token_masks: dict[int, torch.Tensor] | None = None
        self._span = (0, num_slots)  # the slots the hooks multiply by while routing

    # ------------------------------------------------------------------------------- store events
    def prepare(self, config: Any, state_dict: Mapping[str, torch.Tensor]) -> SlotWeights:
        """``config`` (a ``peft.LoraConfig``) + PEFT state dict -> the adapter in slot form on the host.
        Thread-safe (reads nothing that changes); never raises for a bad adapter: a refusal is returned."""
        try:
            return self._prepare(config, state_dict)
        except UnsupportedAdapterError as e:
            return SlotWeights(unsupported=str(e))

    def serves(self, weights: object) -> bool:
        """Whether ``on_gpu_enter`` takes ``weights`` (free slots aside). Thread-safe."""
        return isinstance(weights, SlotWeights) and weights.unsupported is None

    def on_gpu_enter(self, key: str, weights: object) -> bool:
        """Adapter ``key`` entered the GPU tier: copy its prepared weights into a free slot. False: the slots
        cannot hold it (the reason is logged and kept for ``slot_of``), so its rows need PEFT's forward."""
        refused_before = self._unsupported.get(key)
        self.on_gpu_leave(key)
        slot = next((s for s in range(self.num_slots) if s not in self._slots.values()), None)
        if not isinstance(weights, SlotWeights):
            self._unsupported[key] = f"not prepared by this SlotLoRA ({type(weights).__name__})"
        elif weights.unsupported is not None:
            self._unsupported[key] = weights.unsupported
        elif slot is None:
            self._unsupported[key] = f"all {self.num_slots} LoRA slots are taken"
        else:
            try:
                for name, a, b in weights.layers:
                    layer = self._layer(self._linears[name])
                    layer.used_by.add(slot)
                    layer.lora_a[slot].copy_(a, non_blocking=True)  # whole padded rows: no stale rank left
                    layer.lora_b[slot].copy_(b, non_blocking=True)
            except BaseException:
                self._clear(slot)  # a half-filled slot must not leak into the next adapter that takes it
                raise
            self._slots[key] = slot
            return True
        # the store retries while PEFT's path is busy (a snapshot build): say it once
        if self._unsupported[key] != refused_before:
            log.warning("adapter %s runs on PEFT's forward: %s", key, self._unsupported[key])
        return False

    def on_gpu_leave(self, key: str) -> None:
        """Adapter ``key`` left the GPU tier: zero its slot everywhere and free it."""
        self._unsupported.pop(key, None)
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._clear(slot)

    def on_peft_change(self, peft_model: torch.nn.Module | None) -> None:
        """The PeftModel gained or lost an adapter: follow its LoRA layers (switched off while enabled)."""
        self._peft_layers = (
            [] if peft_model is None else [m for m in peft_model.modules() if hasattr(m, "lora_A")]
        )
        self._apply_enabled()

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

    def span_of(self, row_slots: Iterable[int]) -> tuple[int, int] | None:
        """``routing``'s ``span`` for rows routed to ``row_slots`` (host ints): the slots ``first .. end``
        their adapters lie in; None when every row is a base row."""
        used = [s for s in row_slots if s != self.base_slot]
        return (min(used), max(used) + 1) if used else None

    @contextmanager
    def routing(
        self,
        row_slots: torch.Tensor,
        *,
        peft_rows: bool = False,
        keep: torch.Tensor | None = None,
        span: tuple[int, int] | None = None,
    ) -> Iterator[None]:
        """Route the forwards inside to ``row_slots`` [B] (int64 on the device; ``base_slot`` for base rows).
        Pure tensor ops on ``row_slots``: a graph captured inside reads whatever the tensor holds at replay.

        ``row_slots`` [B, T] routes each token instead (a packed row holding several adapters' sequences);
        ``keep`` [K] names the columns the forward keeps for its head (``logits_to_keep``), whose inputs a
        hook on an adapted head sees.

        ``peft_rows``: PEFT's LoRA layers are on inside too, for a forward that passes ``adapter_names``
        naming the adapters of the rows whose slot is ``base_slot`` (and ``"__base__"`` for the others):
        each row then gets exactly one delta, from the slots or from PEFT.

        ``span`` ``(first, end)``: the rows' adapter slots all lie in ``first .. end`` (known on the host;
        base rows may be anywhere): the hooks then multiply by those slots' weights only, not by every
        slot's (a tiny matmul costs about its fixed overhead, so 1 slot of 17 is about 3x cheaper on the
        CPU). None: every slot, whatever the tensor holds (what a captured graph needs)."""
        if not self._enabled:
            raise RuntimeError("SlotLoRA.routing needs enabled = True")
        first, end = span if span is not None else (0, self.num_slots)
        if not 0 <= first < end <= self.num_slots:
            raise ValueError(f"span {span} is not within the {self.num_slots} slots")
        self._span = (first, end)
        slots = torch.arange(first, end, device=row_slots.device)
        one_hot = (row_slots[..., None] == slots).to(self.dtype)  # [B, S] or [B, T, S]
        per_slot = (*one_hot.shape, self.r_max)
        mask = one_hot[..., None].expand(per_slot).reshape(*row_slots.shape, -1)  # [B(, T), S*r]
        if row_slots.dim() == 1:
            self._row_mask = mask
        else:
            flat = mask.reshape(-1, mask.shape[-1])
            self._token_masks = {flat.shape[0]: flat}
            if keep is not None:
                kept = mask[:, keep].reshape(-1, mask.shape[-1])
                self._token_masks.setdefault(kept.shape[0], kept)
        if peft_rows:
            self._set_peft_layers(disabled=False)
        try:
            yield
        finally:
            self._row_mask = None
            self._token_masks = None
            self._span = (0, self.num_slots)
            if peft_rows:
                self._apply_enabled()

    # ------------------------------------------------------------------------------------ internals
    def _prepare(self, config: Any, state_dict: Mapping[str, torch.Tensor]) -> SlotWeights:
        for name in _UNSUPPORTED_FIELDS:
            if getattr(config, name, None):
                raise UnsupportedAdapterError(f"its config sets {name}")
        variant = _lora_variant(config)
        if variant is not None:
            raise UnsupportedAdapterError(f"it is a LoRA variant ({variant})")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            match = _WEIGHT_KEY.match(key)
            if match is None:
                raise UnsupportedAdapterError(f"tensor {key} is not a plain LoRA weight")
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        if not pairs:
            raise UnsupportedAdapterError("it has no LoRA weight")
        layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name, pair in sorted(pairs.items()):
            base = self._linears.get(name)
            if base is None:
                raise UnsupportedAdapterError(f"{name} is not a linear layer of the base model")
            if set(pair) != {"A", "B"}:
                raise UnsupportedAdapterError(f"{name} lacks lora_{'B' if 'A' in pair else 'A'}")
            a, b = pair["A"], pair["B"]  # [r, in], [out, r]
            in_features, out_features = _features(base)
            rank = a.shape[0] if a.ndim == 2 else -1
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
                raise UnsupportedAdapterError(
                    f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"a {in_features} -> {out_features} layer"
                )
            if rank > self.r_max:
                raise UnsupportedAdapterError(f"{name} has rank {rank}, above the slot rank {self.r_max}")
            layers.append((name, a, (b.float() * _scaling(config, name, rank)).T))
        return SlotWeights(layers=self._pack(layers))

    def _pack(
        self, layers: list[tuple[str, torch.Tensor, torch.Tensor]]
    ) -> tuple[tuple[str, torch.Tensor, torch.Tensor], ...]:
        """Zero-pad every rank to ``r_max`` and cast to the slot dtype, all in one host buffer (pinned when
        the slots live on CUDA: one pinned allocation per adapter, and asynchronous copies from it)."""
        sizes = [self.r_max * (a.shape[1] + bt.shape[1]) for _, a, bt in layers]
        pin = self.device.type == "cuda"
        flat = torch.zeros(sum(sizes), dtype=self.dtype, pin_memory=pin)
        packed = []
        offset = 0
        for (name, a, bt), size in zip(layers, sizes, strict=True):
            in_features, out_features = a.shape[1], bt.shape[1]
            pa = flat[offset : offset + self.r_max * in_features].view(self.r_max, in_features)
            pb = flat[offset + self.r_max * in_features : offset + size].view(self.r_max, out_features)
            pa[: a.shape[0]].copy_(a)
            pb[: bt.shape[0]].copy_(bt)
            packed.append((name, pa, pb))
            offset += size
        return tuple(packed)

    def _clear(self, slot: int) -> None:
        for layer in self._layers.values():
            if slot in layer.used_by:
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                layer.used_by.discard(slot)

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
            mask, token_masks = self._row_mask, self._token_masks
            if not self._enabled or (mask is None and token_masks is None):
                return out
            x = args[0]
            first, end = self._span
            wide = x.numel() > SMALL_FORWARD_TOKENS * x.shape[-1]
            dtype = self.wide_dtype if wide and self.wide_dtype is not None else self.dtype
            # [S*r, in] and [S*r, out] of the span's slots (converted for a wide forward: a few KiB a slot)
            a = layer.lora_a[first:end].view(-1, layer.lora_a.shape[-1]).to(dtype)
            b = layer.lora_b[first:end].view(-1, layer.lora_b.shape[-1]).to(dtype)
            if token_masks is not None:
                tokens = x.to(dtype).reshape(-1, a.shape[1])  # [B*T, in]
                delta_in = (tokens @ a.T) * token_masks[tokens.shape[0]].to(dtype)  # [B*T, S*r]
            else:
                assert mask is not None
                rows = mask.shape[0]
                h = (x.to(dtype).reshape(rows, -1, a.shape[1]) @ a.T) * mask[:, None, :].to(dtype)
                delta_in = h.reshape(-1, a.shape[0])  # [B*T, S*r]
            y = torch.addmm(out.reshape(-1, b.shape[1]).to(dtype), delta_in, b)  # [B*T, out]
            return y.to(out.dtype).view(out.shape)

        return add_delta

    def _apply_enabled(self) -> None:
        self._set_peft_layers(disabled=self._enabled)

    def _set_peft_layers(self, *, disabled: bool) -> None:
        # PEFT's public enable_adapters(True) re-runs set_adapter on every layer; the flag is what forward reads
        for module in self._peft_layers:
            setattr(module, "_disable_adapters", disabled)  # noqa: B010


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name (as PEFT state dict keys spell it, without PEFT's wrapper levels) -> linear module, for
    every linear-shaped module of ``model`` (a PEFT LoRA wrapper contributes its ``base_layer``)."""
    linears: dict[str, torch.nn.Module] = {}
    wrapper = None  # the PEFT wrapper being walked: of its children only base_layer counts
    for name, module in model.named_modules():
        if name.startswith(_PREFIX):  # a PeftModel was passed: use the base model's names
            name = name[len(_PREFIX) :]
        if wrapper is not None and name.startswith(wrapper + "."):
            if name != wrapper + ".base_layer":
                continue
            name = wrapper
        elif hasattr(module, "base_layer"):
            wrapper = name
            continue
        in_features = getattr(module, "in_features", None)
        if isinstance(in_features, int) and isinstance(getattr(module, "out_features", None), int):
            linears[name] = module
    return linears


def _lora_variant(config: Any) -> str | None:
    """The LoRA variant ``config`` asks for (as PEFT decides it), or None for plain LoRA."""
    if not dataclasses.is_dataclass(config):
        return None
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.name == "init_lora_weights" and value in f.metadata.get("lora_variants", ()):
            return f"init_lora_weights={value}"
        if f.metadata.get("is_lora_variant") and value:
            return f.name
    return None


def _scaling(config: Any, module_name: str, rank: int) -> float:
    """PEFT's scaling of one layer: alpha / r (alpha / sqrt(r) with rsLoRA), with ``rank_pattern`` and
    ``alpha_pattern`` matched against the module name as PEFT matches them."""
    from peft.utils.other import get_pattern_key

    rank_pattern: dict[str, int] = getattr(config, "rank_pattern", None) or {}
    alpha_pattern: dict[str, float] = getattr(config, "alpha_pattern", None) or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module_name), config.r)
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module_name), config.lora_alpha)
    if r != rank:
        raise UnsupportedAdapterError(f"{module_name} has rank {rank} but its config says {r}")
    return float(alpha / math.sqrt(r) if getattr(config, "use_rslora", False) else alpha / r)


def _features(base: torch.nn.Module) -> tuple[int, int]:
    in_features = getattr(base, "in_features", None)
    out_features = getattr(base, "out_features", None)
    if not isinstance(in_features, int) or not isinstance(out_features, int):
        raise UnsupportedAdapterError(f"{type(base).__name__} is not a linear layer")
    return in_features, out_features
