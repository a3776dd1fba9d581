"""oneDNN-prepacked bf16 linears (server/runtime/prepack.py): on a tiny Llama with a LoRA adapter, packing
changes no logit (torch's own ``F.linear`` is the reference), packs the base's linears and never an
adapter's, and steps aside where it cannot be right: float32, a replaced weight, autograd, too little
memory, ``off``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from server.runtime import prepack as pp
from tests.unit.test_slot_lora import _tiny_llama

pytestmark = pytest.mark.skipif(not pp.supported(torch.device("cpu")), reason="no oneDNN bf16 on this CPU")

LAYERS = 2
LINEARS = 7 * LAYERS + 1  # q k v o gate up down (each a LoRA layer's base_layer) per layer, and lm_head


def tiny_llama(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _tiny_llama(LAYERS).to(dtype)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora).to(dtype).eval()


@torch.inference_mode()
def logits(model: torch.nn.Module, rows: int) -> torch.Tensor:
    ids = torch.arange(rows * 7).remainder(64).view(rows, 7)  # _tiny_llama's vocabulary
    return model(input_ids=ids).logits


def packed(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, pp.PACKED)]


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packing_changes_no_logit(rows: int) -> None:
    model = tiny_llama()
    want = logits(model, rows)
    assert pp.prepack(model, "on") == LINEARS
    names = packed(model)
    assert all(n.endswith(".base_layer") for n in names[:-1]) and names[-1].endswith("lm_head")
    assert torch.equal(logits(model, rows), want)
    assert pp.prepack(model, "on") == 0  # packed once


def test_the_adapter_still_counts_after_packing() -> None:
    model = tiny_llama()
    pp.prepack(model, "on")
    with_adapter = logits(model, 2)
    with model.disable_adapter():
        without = logits(model, 2)
    assert not torch.equal(with_adapter, without)


def test_float32_and_off_pack_nothing() -> None:
    assert pp.prepack(tiny_llama(torch.float32), "on") == 0
    model = tiny_llama()
    assert pp.prepack(model, "off") == 0 and packed(model) == []


def test_auto_declines_what_memory_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    monkeypatch.setattr(pp, "available_memory", lambda: 1024)  # injected: a box with 1 KiB to spare
    assert pp.prepack(model, "auto") == 0 and packed(model) == []
    monkeypatch.setattr(pp, "available_memory", lambda: 2**40)
    assert pp.prepack(model, "auto") == LINEARS


def test_a_replaced_weight_or_autograd_falls_back_to_f_linear() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    holder = torch.nn.Sequential(layer)
    assert pp.prepack(holder, "on") == 1
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    layer.weight = torch.nn.Parameter(torch.randn(32, 64, dtype=torch.bfloat16))
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    out = layer(x)  # grad mode: oneDNN's op has no backward
    assert out.requires_grad and torch.equal(out.detach(), F.linear(x, layer.weight, layer.bias).detach())
