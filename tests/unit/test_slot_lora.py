"""Slot LoRA against PEFT's mixed-batch forward on a tiny random Llama (float32 on the CPU).

Tolerance: the slot path computes ``x @ A^T`` and ``h @ (scaling * B)^T`` over zero-padded ranks, summing the
same products in another order than PEFT's ``lora_B(lora_A(x)) * scaling``; in float32 the logits agree to
``atol=1e-4, rtol=1e-4`` (observed differences are about 1e-6).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from server.runtime.slot_lora import SlotLoRA, UnsupportedAdapterError

ATOL = RTOL = 1e-4
BASE = "__base__"

# name -> (rank, alpha, target modules)
ADAPTERS = {
    "s1": (4, 8, ["q_proj", "v_proj"]),
    "s2": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "s3": (2, 1, ["down_proj", "o_proj"]),
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # tiny matmuls on a shared small box: intra-op threads spin against each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora_init(model: torch.nn.Module, seed: int) -> None:
    # PEFT initialises B to zero; random B makes every delta visible
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def peft_model() -> PeftModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config).eval()
    model: PeftModel | None = None
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        _lora_init(model, seed=i)
    assert model is not None
    return model.eval()


def _slot_lora(model: PeftModel, num_slots: int = 4, r_max: int = 8) -> SlotLoRA:
    slots = SlotLoRA(num_slots=num_slots, r_max=r_max, dtype=torch.float32, device=torch.device("cpu"))
    for name in ADAPTERS:
        slots.on_gpu_enter(name, model)
    return slots


def _logits_peft(model: PeftModel, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    return model(input_ids=ids, adapter_names=names).logits


def _logits_slots(model: PeftModel, slots: SlotLoRA, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = torch.tensor([slots.slot_of(None if n == BASE else n) for n in names])
    slots.enabled = True
    try:
        with slots.routing(rows):
            return model(input_ids=ids).logits
    finally:
        slots.enabled = False


@pytest.mark.parametrize(
    "names",
    [
        ["s1"],
        [BASE],
        ["s1", "s2", "s3", BASE],
        ["s3", "s3", BASE, "s2", "s1", BASE],
        ["s2", "s2"],
    ],
)
@torch.inference_mode()
def test_equals_peft_mixed_batch(peft_model: PeftModel, names: list[str]) -> None:
    slots = _slot_lora(peft_model)
    ids = torch.randint(0, 64, (len(names), 5))
    expected = _logits_peft(peft_model, ids, names)
    got = _logits_slots(peft_model, slots, ids, names)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@torch.inference_mode()
def test_base_rows_untouched_and_adapters_differ(peft_model: PeftModel) -> None:
    slots = _slot_lora(peft_model)
    ids = torch.randint(0, 64, (1, 6)).repeat(4, 1)
    with peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    got = _logits_slots(peft_model, slots, ids, [BASE, "s1", BASE, "s2"])
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])  # exactly the base output
    assert not torch.allclose(got[1], plain[1], atol=1e-3)
    assert not torch.allclose(got[3], got[1], atol=1e-3)


@torch.inference_mode()
def test_disabled_routing_restores_peft(peft_model: PeftModel) -> None:
    slots = _slot_lora(peft_model)
    ids = torch.randint(0, 64, (2, 4))
    before = _logits_peft(peft_model, ids, ["s1", "s2"])
    _logits_slots(peft_model, slots, ids, ["s1", "s2"])  # enables, then disables
    torch.testing.assert_close(_logits_peft(peft_model, ids, ["s1", "s2"]), before, atol=0, rtol=0)


@torch.inference_mode()
def test_slot_reuse_after_eviction_leaves_no_trace(peft_model: PeftModel) -> None:
    slots = _slot_lora(peft_model, num_slots=3)
    slot_b = slots.slot_of("s2")
    slots.on_gpu_leave("s2")  # s2 touched all seven projections; s3 only two
    with pytest.raises(UnsupportedAdapterError):
        slots.slot_of("s2")
    slots.on_gpu_leave("s3")
    slots.on_gpu_enter("s3", peft_model)  # takes the lowest free slot: s2's old one
    assert slots.slot_of("s3") == slot_b
    ids = torch.randint(0, 64, (3, 5))
    names = ["s3", "s1", BASE]
    torch.testing.assert_close(
        _logits_slots(peft_model, slots, ids, names),
        _logits_peft(peft_model, ids, names),
        atol=ATOL,
        rtol=RTOL,
    )


def test_no_free_slot_and_rank_above_r_max_are_unsupported(peft_model: PeftModel) -> None:
    slots = SlotLoRA(num_slots=1, r_max=4, dtype=torch.float32, device=torch.device("cpu"))
    slots.on_gpu_enter("s2", peft_model)  # rank 8 > r_max 4
    assert not slots.supports("s2")
    slots.on_gpu_enter("s1", peft_model)
    slots.on_gpu_enter("s3", peft_model)  # the one slot is taken by s1
    assert slots.supports("s1") and not slots.supports("s3")
    with pytest.raises(UnsupportedAdapterError, match="slots are taken"):
        slots.slot_of("s3")


def test_routing_needs_enabled() -> None:
    slots = SlotLoRA(num_slots=2, r_max=4, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(RuntimeError), slots.routing(torch.zeros(1, dtype=torch.long)):
        pass
