"""Keeps bitsandbytes' CPU-packed 4-bit weights intact when anything reads the model's ``state_dict()``.

On a CPU with AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``), ``Linear4bit.forward`` repacks its
weight on the first forward into a CPU-only layout (``quant_state.packing_format_for_cpu``: the weight
``[N*K/2, 1]`` becomes ``[N, K/2]``, absmax becomes a transposed bf16 ``[K/blocksize, N]``). Asking such a
layer for its ``state_dict`` converts the *live* weight back (bitsandbytes 0.50), and the conversion leaves
absmax transposed when double quantization is off; the next forward repacks that absmax in the wrong order
and every output of the layer is wrong, adapter or not.

PEFT calls ``model.state_dict()`` each time it loads an adapter's weights (``set_peft_model_state_dict``),
so on such CPUs every adapter injected after the first request, and the base itself, computed wrong logits.

The fix is at the mechanism: every ``Linear4bit`` of a model we serve becomes a ``StableLinear4bit`` (same
class otherwise, so PEFT's ``isinstance`` dispatch still wraps it), whose ``state_dict`` exports the canonical
layout from copies and never touches the live weight. Models whose 4-bit layers were never run, and CPUs
without AVX512-BF16, are unaffected: there is nothing packed to export.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

log = logging.getLogger(__name__)


def is_cpu_packed(layer: torch.nn.Module) -> bool:
    """True when ``layer``'s 4-bit weight is in bitsandbytes' CPU-only packed layout."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def canonical_4bit(weight: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """The canonical (unpacked) weight and quant state of a CPU-packed 4-bit weight, as new objects: neither
    ``weight`` nor ``state`` changes. bitsandbytes' own inverse leaves absmax transposed and in bf16 when the
    state is not nested; that part is done here."""
    packed_state = copy.copy(state)
    qweight, canonical = _convert_weight_packed_for_cpu_inverse(weight.detach().clone(), packed_state)
    if not canonical.original_nested:
        # packed absmax: [K / blocksize, N] in bf16; canonical: [N * K / blocksize] in float32
        canonical.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    return qweight, canonical


class StableLinear4bit(bnb.nn.Linear4bit):
    """A ``bnb.nn.Linear4bit`` whose ``state_dict`` leaves a CPU-packed weight as it is."""

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if not is_cpu_packed(self):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        weight: Any = self.weight  # a bnb Params4bit
        live_data, live_state = weight.data, weight.quant_state
        qweight, canonical = canonical_4bit(live_data, live_state)
        # the parent saves what the parameter holds: hand it the canonical copies for the duration (engine
        # thread: nothing runs this layer meanwhile)
        weight.data, weight.quant_state = qweight, canonical
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            weight.data, weight.quant_state = live_data, live_state


def stabilize_4bit_layers(model: torch.nn.Module) -> int:
    """Make every ``bnb.nn.Linear4bit`` in ``model`` a ``StableLinear4bit`` (in place, idempotent); returns
    how many layers changed. Call it on every base model before PEFT or anything else reads its state."""
    changed = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = StableLinear4bit
            changed += 1
    if changed:
        log.debug("%d 4-bit layers keep their CPU packing across state_dict()", changed)
    return changed
