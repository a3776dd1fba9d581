"""Build the model of the side-by-side benchmark (``benchmarks/openai_peer.py``): a ~190M-parameter Llama
with random weights and the demo tokenizer, saved in bf16, plus rank-16 all-linear LoRA adapters with random
non-zero B, so that an adapter really changes every projection's output.

    python -m benchmarks.build_llama190m --out /work/scratch/peer/llama190m

Writes ``OUT/base`` (config, safetensors, tokenizer with its chat template) and ``OUT/adapters/a1..aN``
(``adapter_model.safetensors`` + ``adapter_config.json``), the layout both ``loraserve serve --model OUT/base
--adapter-dir OUT/adapters`` and ``vllm serve OUT/base --lora-modules a1=OUT/adapters/a1 ...`` read. The
weights are a function of ``--seed`` only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch

DEFAULT_OUT = Path("/work/scratch/peer/llama190m")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_ID = "llama190m"
LAYERS = 12


@dataclass(slots=True, frozen=True)
class Shape:
    """The Llama's dimensions (MHA, head_dim 64). The demo tokenizer's vocabulary is small, so nearly all
    parameters sit in the decoder layers, as the compute of a 190M model with a real vocabulary does."""

    hidden_size: int = 1024
    intermediate_size: int = 3840
    num_hidden_layers: int = LAYERS
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 2048


@dataclass(slots=True, frozen=True)
class Built:
    """What ``build`` wrote and how big it is."""

    base: Path
    adapters: dict[str, Path]
    parameters: int
    adapter_parameters: int


def build(
    out: Path, *, shape: Shape, adapters: int, rank: int, seed: int, demo_cache: Path | None = None
) -> Built:
    """Write the base and ``adapters`` adapters of ``rank`` into ``out`` (replacing what was there); the
    tokenizer is the demo bundle's (built into ``demo_cache``, default ``~/.cache/loraserve``, if absent)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.runtime.demo import ensure_demo

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo(demo_cache, progress=False).base)
    base_dir, adapter_root = out / "base", out / "adapters"
    base_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(base_dir)
    config = LlamaConfig(
        **asdict(shape),
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.Module.to(model, dtype=torch.bfloat16)  # in place; transformers' typed ``to`` confuses mypy
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base_dir, safe_serialization=True)

    written: dict[str, Path] = {}
    adapter_parameters = 0
    for i in range(1, adapters + 1):
        name = f"a{i}"
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=list(ALL_LINEAR),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:  # PEFT starts B at zero: the adapter would change nothing
                    param.normal_(0.0, 0.02)
        adapter_parameters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        peft_model.peft_config["default"].base_model_name_or_path = MODEL_ID
        path = adapter_root / name
        peft_model.save_pretrained(str(path), safe_serialization=True)
        _sort_target_modules(path / "adapter_config.json")
        written[name] = path
        model = cast(LlamaForCausalLM, peft_model.unload())
    return Built(base_dir, written, parameters, adapter_parameters)


def _sort_target_modules(path: Path) -> None:
    """PEFT writes ``target_modules`` in set order, which varies with PYTHONHASHSEED: sort it."""
    config = json.loads(path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--adapters", type=int, default=4, help="LoRA adapters a1..aN")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers")
    args = p.parse_args(argv)
    shape = Shape(num_hidden_layers=args.layers)
    built = build(args.out, shape=shape, adapters=args.adapters, rank=args.rank, seed=args.seed)
    print(
        f"base: {built.base} ({built.parameters / 1e6:.1f}M parameters, bf16)\n"
        f"adapters: {', '.join(built.adapters)} (rank {args.rank}, all linear, "
        f"{built.adapter_parameters / 1e6:.2f}M parameters each) in {args.out / 'adapters'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
