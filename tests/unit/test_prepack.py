"""oneDNN-prepacked linears (server/runtime/prepack.py): on a tiny Llama with a LoRA adapter, packing bf16
changes no logit (torch's own ``F.linear`` is the reference), packs the base's linears and never an
adapter's, and steps aside where it cannot be right: a replaced weight, autograd, too little memory,
``off``. float32 packs on ``on``, and on ``auto`` only big linears that time faster packed; its logits stay
within float32 rounding of ``F.linear`` and do not depend on how many rows share the call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from server.runtime import prepack as pp
from tests.unit.test_slot_lora import _tiny_llama

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
needs_bf16 = pytest.mark.skipif(not pp.supported(torch.device("cpu")), reason="no oneDNN bf16 on this CPU")

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


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packing_changes_no_logit(rows: int) -> None:
    model = tiny_llama()
    want = logits(model, rows)
    assert pp.prepack(model, "on") == LINEARS
    names = packed(model)
    assert all(n.endswith(".base_layer") for n in names[:-1]) and names[-1].endswith("lm_head")
    assert torch.equal(logits(model, rows), want)
    assert pp.prepack(model, "on") == 0  # packed once


@needs_bf16
def test_the_adapter_still_counts_after_packing() -> None:
    model = tiny_llama()
    pp.prepack(model, "on")
    with_adapter = logits(model, 2)
    with model.disable_adapter():
        without = logits(model, 2)
    assert not torch.equal(with_adapter, without)


def test_off_packs_nothing() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_llama(dtype)
        assert pp.prepack(model, "off") == 0 and packed(model) == []


def test_float32_on_packs_within_rounding_and_whatever_the_row_count() -> None:
    model = tiny_llama(torch.float32)
    want = logits(model, 16)
    assert pp.prepack(model, "on") == LINEARS
    got = logits(model, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # each packed linear gives a row the same values alone and among 16 (MKL's sgemm need not)
    with torch.inference_mode():
        for module in model.modules():
            if hasattr(module, pp.PACKED):
                x = torch.randn(16, module.in_features)
                assert torch.equal(module(x[:1]), module(x)[:1])


def test_float32_auto_packs_only_big_linears_that_time_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pp.prepack(tiny_llama(torch.float32), "auto") == 0  # below FLOAT32_MIN_WEIGHT: nothing timed
    monkeypatch.setattr(pp, "FLOAT32_MIN_WEIGHT", 0)
    timed: list[tuple[int, ...]] = []

    def gain(weight: torch.Tensor, value: float) -> float:
        timed.append(tuple(weight.shape))
        return value

    # injected: the timing of a CPU where MKL's sgemm wins, then one where it loses
    monkeypatch.setattr(pp, "float32_gain", lambda w: gain(w, 1.0))
    model = tiny_llama(torch.float32)
    largest = max(m.weight.numel() for m in pp.packable(model, torch.float32))
    assert pp.prepack(model, "auto") == 0 and packed(model) == []
    monkeypatch.setattr(pp, "float32_gain", lambda w: gain(w, 2.0))
    assert pp.prepack(model, "auto") == LINEARS
    assert [a * b for a, b in timed] == [largest, largest]  # the largest linear is the one timed


def test_float32_gain_times_the_real_calls() -> None:
    gain = pp.float32_gain(torch.empty(96, 64))
    assert gain > 0 and pp.float32_gain(torch.empty(96, 64)) == gain  # once per shape


@needs_bf16
def test_auto_declines_what_memory_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    monkeypatch.setattr(pp, "available_memory", lambda: 1024)  # injected: a box with 1 KiB to spare
    assert pp.prepack(model, "auto") == 0 and packed(model) == []
    monkeypatch.setattr(pp, "available_memory", lambda: 2**40)
    assert pp.prepack(model, "auto") == LINEARS


@needs_bf16
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
