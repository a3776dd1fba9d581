"""oneDNN-prepacked linears (server/runtime/prepack.py): on a tiny Llama with a LoRA adapter, packing bf16
changes no logit (torch's own ``F.linear`` is the reference), packs the base's linears and never an
adapter's, and steps aside where it cannot be right: a replaced weight, autograd, too little memory,
``off``. float32 packs on ``on``, and on ``auto`` only big linears that time faster packed; its logits stay
within float32 rounding of ``F.linear`` and do not depend on how many rows share the call. bf16 where oneDNN
has no bf16 kernels (injected on any CPU) is widened to a float32 copy: within a bf16 rounding step of the
exact product, the same for a row alone and among others, counted as float32 bytes."""

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
    assert not any(getattr(m, pp.PACKED).widened for m in model.modules() if hasattr(m, pp.PACKED))
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


@pytest.fixture
def no_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected: a CPU where oneDNN has no bf16 kernels (an AVX2 CPU such as the AMD EPYC Zen 3)."""
    monkeypatch.setattr(pp, "supported", lambda device: False)


@pytest.mark.usefixtures("no_bf16_kernels")
def test_bf16_without_kernels_is_widened_to_float32_within_a_rounding_step() -> None:
    model = tiny_llama()
    want = logits(model, 16)
    assert pp.prepack(model, "on") == LINEARS
    with torch.inference_mode():
        for module in model.modules():
            if not hasattr(module, pp.PACKED):
                continue
            assert getattr(module, pp.PACKED).widened
            x = torch.randn(16, module.in_features).bfloat16()
            got = module(x)
            assert got.dtype == torch.bfloat16
            # a float32 GEMM of the bf16 values, rounded once: within one bf16 step of the exact product
            exact = F.linear(x.float(), module.weight.float())
            torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-6)
            assert torch.equal(module(x[:2])[:1], got[:1])  # a row among 2 is that row among 16
            # one token alone runs on the bf16 weight (torch's own GEMM): within the same rounding step
            assert torch.equal(module(x[:1]), F.linear(x[:1], module.weight))
            torch.testing.assert_close(module(x[:1]).float(), exact[:1], rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(logits(model, 16), want, rtol=0.05, atol=0.05)  # bf16's own tolerance


@pytest.mark.usefixtures("no_bf16_kernels")
def test_a_widened_linear_keeps_its_bias_and_the_adapter_still_counts() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    assert pp.prepack(torch.nn.Sequential(layer), "on") == 1
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(layer(x).float(), exact, rtol=2**-8, atol=1e-6)
    model = tiny_llama()
    pp.prepack(model, "on")
    with_adapter = logits(model, 2)
    with model.disable_adapter():
        assert not torch.equal(with_adapter, logits(model, 2))


@pytest.mark.usefixtures("no_bf16_kernels")
def test_auto_widens_only_where_it_times_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    # injected: the timing of a CPU where torch's bf16 GEMM wins, then one where it loses
    monkeypatch.setattr(pp, "widen_gain", lambda w: 1.0)
    model = tiny_llama()
    assert pp.prepack(model, "auto") == 0 and packed(model) == []
    monkeypatch.setattr(pp, "widen_gain", lambda w: 2.0)
    assert pp.prepack(model, "auto") == LINEARS


@pytest.mark.usefixtures("no_bf16_kernels")
def test_auto_counts_a_widened_copy_as_float32_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pp, "widen_gain", lambda w: 2.0)
    model = tiny_llama()
    bf16_bytes = sum(m.weight.numel() * 2 for m in pp.packable(model))
    # a quarter of this holds the bf16 bytes once but not the float32 copy (twice them)
    monkeypatch.setattr(pp, "available_memory", lambda: int(4 * 1.5 * bf16_bytes))
    assert pp.prepack(model, "auto") == 0
    monkeypatch.setattr(pp, "available_memory", lambda: int(4 * 2.5 * bf16_bytes))
    assert pp.prepack(model, "auto") == LINEARS


def test_kernels_decide_the_multiply_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pp, "supported", lambda device: False)
    assert pp.multiply_dtype(torch.bfloat16) == torch.float32
    assert pp.multiply_dtype(torch.float32) == torch.float32
    monkeypatch.setattr(pp, "supported", lambda device: True)
    assert pp.multiply_dtype(torch.bfloat16) == torch.bfloat16


def test_widen_gain_times_the_real_calls() -> None:
    gain = pp.widen_gain(torch.empty(96, 64))
    assert gain > 0 and pp.widen_gain(torch.empty(96, 64)) == gain  # once per shape
