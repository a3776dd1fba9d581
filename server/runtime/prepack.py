"""oneDNN-prepacked linears on the CPU.

``F.linear`` on a CPU tensor hands the GEMM library a plain row-major weight: oneDNN reorders a bf16 weight
into its blocked layout on every call, and float32 goes to MKL's sgemm. Packing each weight once
(``torch.ops.mkldnn._reorder_linear_weight``) and running ``torch.ops.mkldnn._linear_pointwise`` on the
packed copy skips both:

- bf16, measured on an Intel Xeon (AMX, AVX512-BF16, 2 cores): the 12 layers of the 193M benchmark Llama
  1.3-1.7x faster for 1-512 rows (1.55x at 16), outputs bit-identical to ``F.linear`` at every row count
  tried (``PACK_BATCH_HINT`` 16; a hint of 1 changed the accumulation order past 16 rows). Packed wherever
  oneDNN has bf16 kernels.
- float32: one layer of the same model, 2.5x faster at 1 row, 2.6x at 16, 1.6x at 256 on an AMD EPYC Zen 4
  (AVX512-BF16, 2 cores), where MKL's sgemm is slow; on the Xeon it gained little. The outputs are not
  bit-identical to ``F.linear`` (within 1e-6 of the largest output: another accumulation order), but they do
  not depend on the row count (MKL's sgemm gave row 0 other values at every count from 5 rows up there). ``auto`` packs
  float32 only where it pays, timed at load on the model's largest linear (``float32_gain``), and only
  for linears big enough to time (``FLOAT32_MIN_WEIGHT``).
- bf16 where oneDNN has no bf16 kernels (AVX2 CPUs such as the AMD EPYC Zen 3): torch's own bf16 GEMM there
  is slow, 4.7x the time of a float32 GEMM for 16 rows through the 193M Llama's 3840 x 1024 layer and 6.7x
  for 512 rows (2 cores, torch 2.13). Such a linear is *widened*: a float32 copy of its weight is packed,
  and the call multiplies the input in float32 and rounds the output back to bf16. The weight and input are
  exactly their bf16 values, so this is a bf16 GEMM with float32 accumulation, as torch's own is, in
  another accumulation order: outputs within a bf16 rounding step of ``F.linear``'s, the same for a row
  among a few others or among many. It costs twice the bf16 weights' bytes; ``auto`` widens where it times
  ``FLOAT32_MIN_GAIN`` faster (``widen_gain``). A call of one token stays on the bf16 weight: it reads
  every weight once, and reading the float32 copy's twice the bytes from memory costs more than the bf16
  arithmetic (the 84 linears of that Llama, weights cold, on the Zen 3: 22.6 ms in bf16 against 31.7 ms
  widened for 1 token; 40.3 against 34.1 ms for 2, 307 against 90 ms for 16). So a one-token decode step
  and a step of several rows round their linears differently, within that bf16 step.

The packed copy sits beside the weight (the weight stays: PEFT reads its dtype and device, a tied embedding
reads its values), so packing costs the linear weights' bytes once more; ``auto`` packs only while that
fits in a quarter of the memory available. Packing copies the weights: the models it is applied to must not
change their weights afterwards. The runner packs the shared base (PEFT adds adapters beside its layers,
never into them) and each merged snapshot when it first runs, after its merge. A module whose weight was
replaced since (another ``data_ptr``) falls back to ``F.linear``.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CpuPrepack = Literal["auto", "on", "off"]
PACK_BATCH_HINT = 16  # the row count oneDNN picks its blocking for (any row count runs)
PACKED = "_loraserve_packed_weight"
AUTO_MEMORY_SHARE = 0.25  # auto: the copies may take this share of the available memory
FLOAT32_MIN_WEIGHT = 1 << 20  # auto: float32 linears from this many weight elements (the 193M model's q_proj)
FLOAT32_MIN_GAIN = 1.25  # auto: float32 is packed where F.linear takes this much longer than the packed call
TIMING_REPEATS = 5  # auto's timing: the fastest of this many calls of each


@dataclass(slots=True, frozen=True)
class PackedWeight:
    """What a packed linear keeps beside its weight: oneDNN's copy, the ``data_ptr`` of the weight it was
    made from (another one means the weight was replaced), and for a widened bf16 linear its float32 bias
    (``widened``: the copy is float32 and the output is rounded back to the module's dtype)."""

    weight: torch.Tensor
    data_ptr: int
    widened: bool = False
    bias: torch.Tensor | None = None


def supported(device: torch.device) -> bool:
    """oneDNN with bf16 kernels (AVX512-BF16 or AMX; emulated on AVX512 alone) on this CPU."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def multiply_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU matmul over ``dtype`` operands runs fastest in: float32 for bf16 where oneDNN has no
    bf16 kernels (torch's own bf16 ``addmm`` there took 16x float32's time for slot LoRA's 16-row update
    through 64 slot ranks into 3840 outputs on a 2-core Zen 3), else ``dtype`` itself."""
    if dtype == torch.bfloat16 and not supported(torch.device("cpu")):
        return torch.float32
    return dtype


def packable(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[torch.nn.Linear]:
    """The plain ``dtype`` CPU linears of ``model`` not yet packed, LoRA's own (``lora_A``/``lora_B``, loaded
    and dropped with their adapters) left out."""
    found = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or any(part.startswith("lora_") for part in name.split(".")):
            continue
        weight = module.weight
        if weight.dtype == dtype and weight.device.type == "cpu" and not hasattr(module, PACKED):
            found.append(module)
    return found


_gains: dict[tuple[int, int], float] = {}  # auto's float32 timings by weight shape, once per process
_widen_gains: dict[tuple[int, int], float] = {}  # and its widened bf16 ones


def float32_gain(weight: torch.Tensor) -> float:
    """How many times longer ``F.linear`` takes than the packed call on ``PACK_BATCH_HINT`` rows through a
    float32 weight of this shape (the fastest of ``TIMING_REPEATS`` calls each, after one to warm up)."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if shape not in _gains:
        w = torch.randn(shape)
        x = torch.randn(PACK_BATCH_HINT, shape[1])
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
        plain = fastest(lambda: F.linear(x, w))
        onednn = fastest(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        _gains[shape] = plain / onednn
    return _gains[shape]


def widen_gain(weight: torch.Tensor) -> float:
    """How many times longer a bf16 ``F.linear`` takes than the widened call (float32 packed, the input and
    output converted) on ``PACK_BATCH_HINT`` rows through a weight of this shape (once per shape)."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if shape not in _widen_gains:
        w = torch.randn(shape)
        x = torch.randn(PACK_BATCH_HINT, shape[1]).bfloat16()
        packed = PackedWeight(torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT), 0, widened=True)
        w16 = w.bfloat16()
        _widen_gains[shape] = fastest(lambda: F.linear(x, w16)) / fastest(lambda: _run(packed, x, None))
    return _widen_gains[shape]


def fastest(call: Callable[[], object]) -> float:
    """Seconds of the fastest of ``TIMING_REPEATS`` calls of ``call``, after one to warm up."""
    call()
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _float32_linears(model: torch.nn.Module, mode: CpuPrepack) -> list[torch.nn.Linear]:
    """The float32 linears to pack: all of them with ``on``; with ``auto``, those of at least
    ``FLOAT32_MIN_WEIGHT`` elements where the largest times ``FLOAT32_MIN_GAIN`` faster packed."""
    if not torch.backends.mkldnn.is_available():
        return []
    linears = packable(model, torch.float32)
    if mode == "on":
        return linears
    linears = [m for m in linears if m.weight.numel() >= FLOAT32_MIN_WEIGHT]
    if not linears:
        return []
    largest = max(linears, key=lambda m: m.weight.numel()).weight
    gain = float32_gain(largest)
    log.info(
        "float32 linear %s: F.linear takes %.2fx the oneDNN-packed call on %d rows (packing from %.2fx)",
        tuple(largest.shape),
        gain,
        PACK_BATCH_HINT,
        FLOAT32_MIN_GAIN,
    )
    return linears if gain >= FLOAT32_MIN_GAIN else []


def _widened_linears(model: torch.nn.Module, mode: CpuPrepack) -> list[torch.nn.Linear]:
    """The bf16 linears to widen where oneDNN has no bf16 kernels: all with ``on``; with ``auto``, all where
    the largest times ``FLOAT32_MIN_GAIN`` faster widened."""
    if not torch.backends.mkldnn.is_available() or supported(torch.device("cpu")):
        return []
    linears = packable(model)
    if mode == "on" or not linears:
        return linears
    largest = max(linears, key=lambda m: m.weight.numel()).weight
    gain = widen_gain(largest)
    log.info(
        "bf16 linear %s without oneDNN bf16 kernels: F.linear takes %.2fx the float32 packed call on %d "
        "rows (widening from %.2fx)",
        tuple(largest.shape),
        gain,
        PACK_BATCH_HINT,
        FLOAT32_MIN_GAIN,
    )
    return linears if gain >= FLOAT32_MIN_GAIN else []


def prepack(model: torch.nn.Module, mode: CpuPrepack = "auto") -> int:
    """Pack ``model``'s bf16 linears (widened where oneDNN has no bf16 kernels), and its float32 ones, where
    that pays (see the module docstring); returns how many were packed."""
    if mode == "off":
        return 0
    linears = packable(model) if supported(torch.device("cpu")) else []  # CPU weights only
    widened = _widened_linears(model, mode)
    linears += widened + _float32_linears(model, mode)
    if not linears:
        return 0
    # a widened linear's copy is float32: twice its bf16 weight's bytes
    extra = sum(m.weight.numel() * (4 if m in widened else m.weight.element_size()) for m in linears)
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
            wide = module in widened
            bias = None if module.bias is None or not wide else module.bias.detach().float()
            copy = torch.ops.mkldnn._reorder_linear_weight(
                weight.float() if wide else weight, PACK_BATCH_HINT
            )
            setattr(module, PACKED, PackedWeight(copy, weight.data_ptr(), widened=wide, bias=bias))
            module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
    dtypes = sorted({str(m.weight.dtype).removeprefix("torch.") for m in linears})
    log.info(
        "prepacked %d %s linears for oneDNN (%.0f MiB)%s",
        len(linears),
        "/".join(dtypes),
        extra / 2**20,
        f", {len(widened)} bf16 widened to float32" if widened else "",
    )
    return len(linears)


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed: PackedWeight = getattr(self, PACKED)
    if x.dtype != self.weight.dtype or self.weight.data_ptr() != packed.data_ptr or torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    if packed.widened and x.numel() <= x.shape[-1]:
        return F.linear(x, self.weight, self.bias)  # one token: bound by the weight's bytes, bf16's are half
    return _run(packed, x, self.bias)


def _run(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` through ``packed``: a widened one in float32, rounded back to ``x``'s dtype."""
    if packed.widened:
        out = torch.ops.mkldnn._linear_pointwise(x.float(), packed.weight, packed.bias, "none", [], "")
        return out.to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed.weight, bias, "none", [], "")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
