"""oneDNN-prepacked bf16 linears on the CPU.

``F.linear`` on a bf16 CPU tensor hands oneDNN a plain row-major weight, which it reorders into its blocked
layout on every call. Packing each weight once (``torch.ops.mkldnn._reorder_linear_weight``) and running
``torch.ops.mkldnn._linear_pointwise`` on the packed copy skips that: measured on an Intel Xeon (AMX,
AVX512-BF16, 2 cores), the 12 layers of the 193M benchmark Llama, bf16, 1.3-1.7x faster for 1-512 rows
(1.55x at 16), with outputs bit-identical to ``F.linear`` at every row count tried (``PACK_BATCH_HINT``
16; a hint of 1 changed the accumulation order past 16 rows). float32 gains little and changes the
results, so only bf16 weights are packed.

The packed copy sits beside the weight (the weight stays: PEFT reads its dtype and device, a tied embedding
reads its values), so packing costs the linear weights' bytes once more; ``auto`` packs only while that
fits in a quarter of the memory available. Packing copies the weights: the models it is applied to must not
change their weights afterwards. The runner packs the shared base (PEFT adds adapters beside its layers,
never into them) and each merged snapshot when it first runs, after its merge. A module whose weight was
replaced since (another ``data_ptr``) falls back to ``F.linear``.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CpuPrepack = Literal["auto", "on", "off"]
PACK_BATCH_HINT = 16  # the row count oneDNN picks its blocking for (any row count runs)
PACKED = "_loraserve_packed_weight"
AUTO_MEMORY_SHARE = 0.25  # auto: the copies may take this share of the available memory


def supported(device: torch.device) -> bool:
    """oneDNN with bf16 kernels (AVX512-BF16 or AMX; emulated on AVX512 alone) on this CPU."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def packable(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The plain bf16 CPU linears of ``model`` not yet packed, LoRA's own (``lora_A``/``lora_B``, loaded and
    dropped with their adapters) left out."""
    found = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or any(part.startswith("lora_") for part in name.split(".")):
            continue
        weight = module.weight
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not hasattr(module, PACKED):
            found.append(module)
    return found


def prepack(model: torch.nn.Module, mode: CpuPrepack = "auto") -> int:
    """Pack ``model``'s bf16 linears (see the module docstring); returns how many were packed."""
    if mode == "off":
        return 0
    linears = packable(model)  # CPU weights only
    if not linears or not supported(torch.device("cpu")):
        return 0
    extra = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    available = available_memory()
    if mode == "auto" and available is not None and extra > AUTO_MEMORY_SHARE * available:
        log.info(
            "not prepacking %d linears: %.0f MiB more is over a quarter of the %.0f MiB available "
            "(--cpu-prepack on to pack anyway)",
            len(linears),
            extra / 2**20,
            available / 2**20,
        )
        return 0
    with torch.inference_mode():
        for module in linears:
            weight = module.weight.detach()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            setattr(module, PACKED, (packed, weight.data_ptr()))
            module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
    log.info("prepacked %d bf16 linears for oneDNN (%.0f MiB)", len(linears), extra / 2**20)
    return len(linears)


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed, data_ptr = getattr(self, PACKED)
    if x.dtype != torch.bfloat16 or self.weight.data_ptr() != data_ptr or torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
