"""Loads the base model and its tokenizer: bitsandbytes NF4 (default), int8 or unquantized, on CUDA when
present and on the CPU otherwise (bitsandbytes >= 0.47 runs 4-bit layers on the CPU)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapter_store.bnb_layout import stabilize_4bit_layers

log = logging.getLogger("loraserve.runtime")

Quantization = Literal["nf4", "int8", "none"]


class ModelLoadError(RuntimeError):
    """The base model could not be loaded (missing folder, hub disabled, unsupported architecture)."""


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """Everything needed to load (and reload, for snapshots) the same base model."""

    source: str  # a local folder, or a hub id when allow_hub
    quantization: Quantization = "nf4"
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    allow_hub: bool = False
    trust_remote_code: bool = False

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(spec: ModelSpec) -> BitsAndBytesConfig | None:
    if spec.quantization == "nf4":
        # double quantization measured slower on an H100 (DESIGN section 6): off
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=spec.dtype,
            bnb_4bit_use_double_quant=False,
        )
    if spec.quantization == "int8":
        # no outlier decomposition: LLM.int8 picks outlier columns across the whole batch, so with it a
        # row's output would depend on the other tenants' rows beside it; activations quantize per token
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    return None


def _check_source(spec: ModelSpec) -> None:
    if spec.is_local:
        if not (Path(spec.source) / "config.json").is_file():
            raise ModelLoadError(f"{spec.source} has no config.json: not a transformers model folder")
        return
    if not spec.allow_hub:
        raise ModelLoadError(
            f"{spec.source!r} is not a local folder; pass --allow-hub to load it from a model hub"
        )


def load_model(spec: ModelSpec) -> PreTrainedModel:
    """Load the base model as ``spec`` says, in eval mode, with the attention our KV cache drives."""
    _check_source(spec)
    config = AutoConfig.from_pretrained(
        spec.source, local_files_only=not spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(
        spec.source,
        quantization_config=quantization_config(spec),
        dtype=spec.dtype,
        device_map={"": spec.device},
        attn_implementation=attention_implementation(config),
        local_files_only=not spec.allow_hub,
        trust_remote_code=spec.trust_remote_code,
    )
    model.eval()
    model.requires_grad_(False)
    stabilize_4bit_layers(model)  # before anything runs or reads it (adapter_store/bnb_layout.py says why)
    return model


# The families whose every path (NF4, int8, none; base and adapter rows, alone and batched) is proven equal
# to a fresh model by tests/integration/test_model_families.py. Anything else is refused at start: our KV
# cache and masks replace the model's own, and an untested family could be served wrong without an error.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "gemma2", "phi3", "gpt_neox", "opt"})


def check_architecture(config: PretrainedConfig) -> None:
    """Raise ``ModelLoadError`` naming the architecture unless the runtime is proven to serve it."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        names = ", ".join(getattr(config, "architectures", None) or [model_type or "unknown"])
        raise ModelLoadError(
            f"{names} (model_type {model_type!r}) is not served: its attention and cache have not been "
            f"proven equal to transformers' own with this runtime's KV cache; served families: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


def attention_implementation(config: PretrainedConfig) -> str:
    """SDPA where the family supports it; eager otherwise (Gemma-2: SDPA cannot soft-cap attention logits)."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if model_class is None or getattr(model_class, "_supports_sdpa", False) else "eager"


def load_tokenizer(spec: ModelSpec) -> tuple[PreTrainedTokenizerBase, GenerationConfig | None]:
    _check_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, local_files_only=not spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    try:
        generation_config = GenerationConfig.from_pretrained(spec.source, local_files_only=not spec.allow_hub)
    except OSError:
        generation_config = None
    return tokenizer, generation_config


def target_module_names(model: torch.nn.Module) -> set[str]:
    """Last name component of every layer a LoRA may target: linear layers (``q_proj``, ``down_proj``,
    ``lm_head`` ...) and embeddings (``embed_tokens``)."""
    names: set[str] = set()
    for name, module in model.named_modules():
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in {
            "Linear4bit",
            "StableLinear4bit",
            "Linear8bitLt",
        }
        if linear or isinstance(module, torch.nn.Embedding):
            names.add(name.rsplit(".", 1)[-1])
    return names


# Linear layers that some families run on flattened ``[batch * seq, hidden]`` inputs: PEFT's per-row
# ``adapter_names`` cannot route those rows, so adapters on them are refused rather than served wrong.
_FLATTENED_INPUTS: dict[str, tuple[str, ...]] = {"opt": ("fc1", "fc2")}


def unservable_modules(model: torch.nn.Module) -> dict[str, str]:
    """Target module name -> why an adapter on it cannot be served on ``model``."""
    model_type = str(getattr(model.config, "model_type", ""))
    reason = f"{model_type} runs it on flattened tokens, which per-request adapter routing cannot split"
    return {name: reason for name in _FLATTENED_INPUTS.get(model_type, ())}
