"""Slot LoRA against PEFT's mixed-batch forward on a tiny random Llama (float32 on the CPU).

Tolerance: the slot path computes ``x @ A^T`` and ``h @ (scaling * B)^T`` over zero-padded ranks, summing the
same products in another order than PEFT's ``lora_B(lora_A(x)) * scaling``; in float32 the logits agree to
``atol=1e-4, rtol=1e-4`` (observed differences are about 1e-6).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from server.runtime.slot_lora import SMALL_FORWARD_TOKENS, SlotLoRA, SlotWeights, UnsupportedAdapterError

ATOL = RTOL = 1e-4
BASE = "__base__"

# name -> LoraConfig keyword arguments (s4 and s5 exercise PEFT's per-module and rsLoRA scaling)
ADAPTERS: dict[str, dict[str, object]] = {
    "s1": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "s2": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "s3": {"r": 2, "lora_alpha": 1, "target_modules": ["down_proj", "o_proj"]},
    "s4": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "o_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"q_proj": 3},
    },
    "s5": {"r": 8, "lora_alpha": 5, "target_modules": ["k_proj", "up_proj"], "use_rslora": True},
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


def _tiny_llama(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def peft_model() -> PeftModel:
    torch.manual_seed(0)
    base = _tiny_llama(layers=2)
    model: PeftModel | None = None
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        cfg = LoraConfig(lora_dropout=0.0, **kwargs)  # type: ignore[arg-type]
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        _lora_init(model, seed=i)
    assert model is not None
    return model.eval()


def _new_slots(model: PeftModel, num_slots: int, r_max: int) -> SlotLoRA:
    slots = SlotLoRA(model, num_slots=num_slots, r_max=r_max, dtype=torch.float32, device=torch.device("cpu"))
    slots.on_peft_change(model)
    return slots


def _prepared(slots: SlotLoRA, model: PeftModel, name: str) -> SlotWeights:
    # what the adapter store hands over: the adapter's config and its PEFT state dict as saved on disk
    return slots.prepare(model.peft_config[name], get_peft_model_state_dict(model, adapter_name=name))


def _enter(slots: SlotLoRA, model: PeftModel, name: str) -> bool:
    return slots.on_gpu_enter(name, _prepared(slots, model, name))


def _slot_lora(model: PeftModel, num_slots: int = 6, r_max: int = 8) -> SlotLoRA:
    slots = _new_slots(model, num_slots, r_max)
    for name in ADAPTERS:
        assert _enter(slots, model, name)
    return slots


def _logits_peft(model: PeftModel, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    return model(input_ids=ids, adapter_names=names).logits


def _logits_slots(
    model: PeftModel, slots: SlotLoRA, ids: torch.Tensor, names: list[str], *, span: bool = False
) -> torch.Tensor:
    """``span``: the hooks multiply by the rows' slots only, as the runner routes (else by every slot)."""
    row_slots = [slots.slot_of(None if n == BASE else n) for n in names]
    slots.enabled = True
    try:
        with slots.routing(torch.tensor(row_slots), span=slots.span_of(row_slots) if span else None):
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
        ["s4", "s5", "s1", BASE, "s4"],
        ["s2", "s2"],
    ],
)
@pytest.mark.parametrize("span", [False, True])
@torch.inference_mode()
def test_equals_peft_mixed_batch(peft_model: PeftModel, names: list[str], span: bool) -> None:
    slots = _slot_lora(peft_model)
    ids = torch.randint(0, 64, (len(names), 5))
    expected = _logits_peft(peft_model, ids, names)
    got = _logits_slots(peft_model, slots, ids, names, span=span)
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
    slots = _new_slots(peft_model, num_slots=3, r_max=8)
    for name in ("s1", "s2", "s3"):
        assert _enter(slots, peft_model, name)
    slot_b = slots.slot_of("s2")
    slots.on_gpu_leave("s2")  # s2 touched all seven projections; s3 only two
    with pytest.raises(UnsupportedAdapterError):
        slots.slot_of("s2")
    slots.on_gpu_leave("s3")
    assert _enter(slots, peft_model, "s3")  # takes the lowest free slot: s2's old one
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
    slots = _new_slots(peft_model, num_slots=1, r_max=4)
    assert not _enter(slots, peft_model, "s2")  # rank 8 > r_max 4
    assert not slots.supports("s2")
    with pytest.raises(UnsupportedAdapterError, match="above the slot rank 4"):
        slots.slot_of("s2")
    assert _enter(slots, peft_model, "s1")
    assert not _enter(slots, peft_model, "s3")  # the one slot is taken by s1
    assert slots.supports("s1") and not slots.supports("s3")
    with pytest.raises(UnsupportedAdapterError, match="slots are taken"):
        slots.slot_of("s3")


def _bad_state_dicts(sd: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    a_key = next(k for k in sd if k.endswith(".lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")
    wider = dict(sd)
    wider[a_key] = torch.zeros(sd[a_key].shape[0], sd[a_key].shape[1] + 1)
    return {
        "missing_b": ({k: v for k, v in sd.items() if k != b_key}, "lacks lora_B"),
        "shape": (wider, "do not fit"),
        "not_lora": ({**sd, "base_model.model.lm_head.modules_to_save.weight": sd[a_key]}, "not a plain"),
        "not_linear": (
            {"base_model.model.model.embed_tokens.lora_A.weight": sd[a_key], b_key: sd[b_key]},
            "not a linear layer",
        ),
        "empty": ({}, "no LoRA weight"),
    }


@pytest.mark.parametrize("case", ["missing_b", "shape", "not_lora", "not_linear", "empty"])
def test_prepare_refuses_state_dicts_the_slots_cannot_hold(peft_model: PeftModel, case: str) -> None:
    slots = _new_slots(peft_model, num_slots=2, r_max=8)
    config = peft_model.peft_config["s1"]
    state_dict, why = _bad_state_dicts(get_peft_model_state_dict(peft_model, adapter_name="s1"))[case]
    weights = slots.prepare(config, state_dict)
    assert weights.unsupported is not None and why in weights.unsupported and not weights.layers
    assert not slots.on_gpu_enter("bad", weights)
    with pytest.raises(UnsupportedAdapterError, match=why):
        slots.slot_of("bad")
    assert slots.on_gpu_enter("s1", _prepared(slots, peft_model, "s1"))  # the refusal held no slot


@pytest.mark.parametrize(
    ("field", "value"),
    [("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True), ("modules_to_save", ["lm_head"])],
)
def test_prepare_refuses_lora_variants_and_extras(peft_model: PeftModel, field: str, value: object) -> None:
    slots = _new_slots(peft_model, num_slots=2, r_max=8)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    setattr(config, field, value)
    weights = slots.prepare(config, get_peft_model_state_dict(peft_model, adapter_name="s1"))
    assert weights.unsupported is not None and field in weights.unsupported


def test_prepare_pads_scales_and_needs_no_peft_wrapping() -> None:
    # a plain (never PEFT-wrapped) base: the store's slot path puts adapters in without PEFT
    base = _tiny_llama(layers=1)
    slots = SlotLoRA(base, num_slots=2, r_max=8, dtype=torch.float32, device=torch.device("cpu"))
    a = torch.randn(4, 32)
    b = torch.randn(32, 4)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    weights = slots.prepare(LoraConfig(r=4, lora_alpha=2), {key.format("A"): a, key.format("B"): b})
    assert weights.unsupported is None
    ((name, pa, pb),) = weights.layers
    assert name == "model.layers.0.self_attn.q_proj"
    assert pa.shape == (8, 32) and pb.shape == (8, 32)
    torch.testing.assert_close(pa[:4], a, atol=0, rtol=0)
    torch.testing.assert_close(pb[:4], (b * 0.5).T, atol=0, rtol=0)
    assert not pa[4:].any() and not pb[4:].any()
    assert weights.nbytes == 2 * 8 * 32 * 4


def test_routing_needs_enabled(peft_model: PeftModel) -> None:
    slots = _new_slots(peft_model, num_slots=2, r_max=4)
    with pytest.raises(RuntimeError), slots.routing(torch.zeros(1, dtype=torch.long)):
        pass


@torch.inference_mode()
def test_slot_rows_and_peft_rows_share_a_forward(peft_model: PeftModel) -> None:
    # s2 has no slot (as an adapter the slots refuse): its rows go through PEFT's adapter_names while the
    # others go through the slots, in one forward; every row must get exactly its own delta
    slots = _new_slots(peft_model, num_slots=4, r_max=8)
    for name in ("s1", "s3", "s4"):
        assert _enter(slots, peft_model, name)
    names = ["s2", "s1", BASE, "s2", "s4", "s3"]
    ids = torch.randint(0, 64, (len(names), 5))
    expected = _logits_peft(peft_model, ids, names)
    rows = torch.tensor([slots.slot_of(n) if slots.supports(n) else slots.base_slot for n in names])
    peft_names = [n if n == "s2" else BASE for n in names]
    slots.enabled = True
    try:
        with slots.routing(rows, peft_rows=True):
            got = peft_model(input_ids=ids, adapter_names=peft_names).logits
        with slots.routing(rows):  # PEFT's layers back off: the s2 rows lose their delta
            without = peft_model(input_ids=ids).logits
    finally:
        slots.enabled = False
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(without[0], expected[0], atol=1e-3)
    torch.testing.assert_close(without[1:3], expected[1:3], atol=ATOL, rtol=RTOL)


@torch.inference_mode()
def test_token_routing_gives_each_token_its_adapter(peft_model: PeftModel) -> None:
    """One packed row holding several adapters' sequences: ``routing([B, T])`` routes token by token, as
    PEFT's mixed batch does with each token as a row of its own; ``keep`` routes the columns a forward keeps
    for its head."""
    slots = _slot_lora(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj  # a PEFT LoRA layer
    names = ["s1", "s1", BASE, "s3", "s3", "s3", "s2", BASE]
    x = torch.randn(1, len(names), layer.in_features)
    expected = layer(x.view(len(names), 1, -1), adapter_names=names).view(1, len(names), -1)
    row_slots = [slots.slot_of(None if n == BASE else n) for n in names]
    token_slots = torch.tensor([row_slots])
    keep = torch.tensor([1, 5, 6])
    slots.enabled = True
    try:
        with slots.routing(token_slots, keep=keep, span=slots.span_of(row_slots)):
            got = layer.base_layer(x)
            kept = layer.base_layer(x[:, keep])
    finally:
        slots.enabled = False
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(kept, expected[:, keep], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got[0, 0], layer.base_layer(x)[0, 0])  # routing really added a delta


def test_span_is_the_rows_slots_and_must_lie_within_the_slots(peft_model: PeftModel) -> None:
    slots = _slot_lora(peft_model)  # s1.. in slots 0..
    s1, s3 = slots.slot_of("s1"), slots.slot_of("s3")
    assert slots.span_of([slots.base_slot, s3, s1, slots.base_slot]) == (min(s1, s3), max(s1, s3) + 1)
    assert slots.span_of([slots.base_slot]) is None
    slots.enabled = True
    try:
        for bad in [(0, 0), (-1, 2), (2, slots.num_slots + 1)]:
            with pytest.raises(ValueError), slots.routing(torch.zeros(1, dtype=torch.long), span=bad):
                pass
    finally:
        slots.enabled = False


@torch.inference_mode()
def test_float32_slots_of_a_bf16_model_compute_wide_forwards_in_bf16(peft_model: PeftModel) -> None:
    """What the CPU runs for a bf16 model: float32 slots, whose delta a forward of few tokens computes in
    float32 (closer to the float32 reference than bf16 can be) and a wider one in bf16 from the same
    weights, exactly as bf16 slots would."""
    names = ["s2", BASE, "s1"]

    def bf16_slots(dtype: torch.dtype, wide: torch.dtype | None) -> tuple[PeftModel, SlotLoRA]:
        model = copy.deepcopy(peft_model).to(torch.bfloat16)
        slots = SlotLoRA(
            model, num_slots=6, r_max=8, dtype=dtype, wide_dtype=wide, device=torch.device("cpu")
        )
        slots.on_peft_change(model)
        for name in ADAPTERS:
            assert _enter(slots, model, name)
        return model, slots

    mixed, mixed_slots = bf16_slots(torch.float32, torch.bfloat16)
    plain, plain_slots = bf16_slots(torch.bfloat16, None)
    wide = torch.randint(0, 64, (len(names), 4))  # 12 tokens
    assert wide.numel() > SMALL_FORWARD_TOKENS
    torch.testing.assert_close(
        _logits_slots(mixed, mixed_slots, wide, names, span=True),
        _logits_slots(plain, plain_slots, wide, names, span=True),
        atol=0,
        rtol=0,
    )
    small = wide[:, :2]  # 6 tokens
    got = _logits_slots(mixed, mixed_slots, small, names, span=True)
    assert got.dtype == torch.bfloat16
    assert not torch.equal(got, _logits_slots(plain, plain_slots, small, names, span=True))
    torch.testing.assert_close(got.float(), _logits_peft(peft_model, small, names), atol=5e-2, rtol=5e-2)
