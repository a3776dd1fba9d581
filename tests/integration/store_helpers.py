"""A tiny Llama and LoRA adapters for the adapter-store tests (CPU, NF4 via bitsandbytes)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

BASE_ID = "tiny-llama-test"
MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
PROMPTS = [[1, 17, 42, 99, 3], [1, 200, 5, 6, 7, 8, 9], [1, 33]]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core box: torch's intra-op threads spin against each other and make
    each op ~500x slower than on one thread. The tests set one thread and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_base(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_nf4(folder: Path) -> PreTrainedModel:
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
    model.eval()
    return model


def make_adapter(
    base_folder: Path,
    out: Path,
    *,
    seed: int,
    r: int = 4,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    base_name: str = BASE_ID,
    scale: float = 1.0,
) -> Path:
    """A LoRA with random (non-zero) A and B so outputs differ visibly from the base."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_folder)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    peft = get_peft_model(base, cfg)
    if scale != 1.0:
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
    peft.save_pretrained(out)
    config_path = out / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(data))
    return out


@torch.inference_mode()
def greedy(
    model: torch.nn.Module, prompt: list[int], n: int, adapter_names: list[str] | None = None
) -> list[int]:
    """Greedy decode without a cache (tiny model): the reference both for the store and plain PEFT."""
    ids = list(prompt)
    for _ in range(n):
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.inference_mode()
def reference(base_folder: Path, adapter: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy output of a fresh NF4 base with only ``adapter`` loaded by PEFT."""
    model = PeftModel.from_pretrained(load_nf4(base_folder), adapter)
    model.eval()
    return greedy(model, prompt, n)
