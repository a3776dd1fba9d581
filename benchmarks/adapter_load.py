"""Adapter store figures: disk -> GPU vs CPU -> GPU load time, the engine thread's stall while an adapter
enters the GPU tier (PEFT injection vs slot LoRA), snapshot build time, and NF4 merge drift.

CPU (default): the embedded demo bundle (tiny NF4 Llama, three trained adapters).
``--shape 1b`` (CUDA if present, else CPU) and ``--shape 8b`` (CUDA): a random-weight Llama-3.2-1B- or
Llama-3-8B-shaped NF4 model and a rank-16 all-linear adapter (timing does not depend on weight values).
Writes one JSON object to ``--out`` (and stdout).

    python -m benchmarks.adapter_load [--shape demo|1b|8b] [--repeats 5] [--no-snapshot] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from adapter_store import AdapterRegistry, AdapterStore, Lease
from adapter_store.snapshots import build_merged, measure_drift
from server.runtime.slot_lora import SlotLoRA

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_loader(folder: Path, device: str) -> Callable[[], PreTrainedModel]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)

    def load() -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, device_map=device, dtype=dtype
        )
        model.eval()
        return model

    return load


SHAPES: dict[str, dict[str, Any]] = {  # Llama-3-8B and Llama-3.2-1B
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
    },
}


def make_random(root: Path, shape: str, device: str) -> tuple[Path, Path, list[str]]:
    """A Llama-shaped base (random bf16 weights, saved once) and a rank-16 all-linear adapter."""
    config = LlamaConfig(
        vocab_size=128256, num_key_value_heads=8, max_position_embeddings=8192, **SHAPES[shape]
    )
    base = root / f"base-{shape}"
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.save_pretrained(base)
    peft = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEAR), init_lora_weights=False)
    )
    peft.save_pretrained(str(root / "adapters" / "r16"))
    del model, peft
    if device == "cuda":
        torch.cuda.empty_cache()
    return base, root / "adapters", ["r16"]


def demo() -> tuple[Path, Path, list[str]]:
    from server.runtime.demo import ensure_demo  # benchmarks may use the server's demo bundle

    bundle = ensure_demo(None, progress=False)
    return bundle.base, bundle.adapters, list(bundle.adapter_names)


def wait_lease(store: AdapterStore, name: str) -> Lease:
    while (lease := store.acquire(name)) is None:
        store.sync()
        time.sleep(0.0005)
    return lease


def timed_entry(store: AdapterStore, name: str, device: str) -> tuple[float, float]:
    """(seconds from the first acquire to a runnable lease, the longest single ``sync`` on the way): the
    first includes the loader thread's work; the second is the engine thread's stall while ``name`` enters
    the GPU tier (every other stream's decoding waits that long)."""
    stall = 0.0
    t0 = time.perf_counter()
    while (lease := store.acquire(name)) is None:
        t1 = time.perf_counter()
        store.sync()
        if device == "cuda":
            torch.cuda.synchronize()
        stall = max(stall, time.perf_counter() - t1)
        time.sleep(0.0005)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    store.release(lease)
    return seconds, stall


def store_figures(
    model: PreTrainedModel,
    loader: Callable[[], PreTrainedModel],
    registry: AdapterRegistry,
    name: str,
    args: Any,
) -> tuple[dict[str, dict[str, float]], PreTrainedModel]:
    """Disk -> GPU (no CPU tier), CPU -> GPU (state dict already in host memory) and the engine thread's
    stall per GPU-tier entry, medians over ``args.repeats``, for both ways into the GPU tier: PEFT injection
    (the CPU serving path) and slot LoRA (the CUDA serving path: copies of slot tensors that the loader
    thread prepared). Each store gets a fresh base (stores and slot hooks change it in place)."""
    figures: dict[str, dict[str, float]] = {}
    for mode in ("peft", "slots"):
        timings: dict[str, list[tuple[float, float]]] = {}
        for tier, cpu_tier in (("disk", 0), ("cpu", 4)):
            model = _fresh(model, loader)
            store = AdapterStore(model, registry, max_gpu_adapters=1, max_cpu_adapters=cpu_tier)
            if mode == "slots":
                dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
                rank = registry.get(name).rank  # type: ignore[union-attr]
                slots = SlotLoRA(
                    model, num_slots=1, r_max=rank, dtype=dtype, device=torch.device(args.device)
                )
                slots.enabled = True
                store.set_gpu_listener(slots)
            if tier == "cpu":
                timed_entry(store, name, args.device)  # the one disk read: into the CPU tier
            timings[tier] = [
                timed_entry(store, name, args.device) for _ in range(args.repeats) if not _evict(store)
            ]
            store.close()
        figures[mode] = {
            "disk_to_gpu_ms": 1000 * statistics.median(t for t, _ in timings["disk"]),
            "cpu_to_gpu_ms": 1000 * statistics.median(t for t, _ in timings["cpu"]),
            "engine_stall_ms": 1000 * statistics.median(s for _, s in timings["cpu"]),
        }
    return figures, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("demo", "1b", "8b"), default="demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("adapter_load.json"))
    parser.add_argument("--base", type=Path, help="a local base model folder instead of the demo bundle")
    parser.add_argument("--adapter-dir", type=Path, help="its adapters (with --base)")
    parser.add_argument("--no-snapshot", action="store_true", help="skip snapshot builds and drift")
    args = parser.parse_args(argv)
    device = "cuda" if args.shape == "8b" or (args.shape == "1b" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--shape 8b needs CUDA")
    args.device = device
    if device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: more threads only contend

    with tempfile.TemporaryDirectory() as tmp:
        if args.base is not None and args.adapter_dir is not None:
            base, adapter_dir = args.base, args.adapter_dir
            names = sorted(p.name for p in adapter_dir.iterdir() if p.is_dir())
        else:
            made = args.shape != "demo"
            base, adapter_dir, names = make_random(Path(tmp), args.shape, device) if made else demo()
        loader = nf4_loader(base, device)
        model = loader()
        modules = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__}
        registry = AdapterRegistry(
            [adapter_dir],
            adapter_dir=adapter_dir,
            base_model_ids=[],
            base_module_names=modules,
            max_lora_rank=64,
        )
        registry.scan()
        machine = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
        result: dict[str, Any] = {
            "shape": args.shape,
            "device": device,
            "machine": machine,
            "torch": torch.__version__,
        }
        per_adapter: dict[str, Any] = {}
        for name in names:
            figures, model = store_figures(model, loader, registry, name, args)
            source = registry.get(name)
            assert source is not None
            stall = figures["peft"]["engine_stall_ms"] / figures["slots"]["engine_stall_ms"]
            per_adapter[name] = {"rank": source.rank, **figures, "engine_stall_peft_over_slots": stall}
            if args.no_snapshot:
                continue
            t0 = time.perf_counter()
            merged = build_merged(loader, source)
            if device == "cuda":
                torch.cuda.synchronize()
            build_s = time.perf_counter() - t0
            ref_store = AdapterStore(_fresh(model, loader), registry, max_gpu_adapters=1, max_cpu_adapters=1)
            lease = wait_lease(ref_store, name)
            prompts = [[1, *range(10 + 7 * i, 30 + 7 * i)] for i in range(args.prompts)]
            drift = measure_drift(ref_store.model, lease.version, merged, prompts, new_tokens=16)
            ref_store.close()
            per_adapter[name] |= {
                "snapshot_build_s": build_s,
                "drift": {
                    "max_abs_logit_diff": drift.max_abs_logit_diff,
                    "mean_abs_logit_diff": drift.mean_abs_logit_diff,
                    "greedy_token_agreement": drift.token_agreement,
                    "identical_greedy_sequences": f"{drift.identical_sequences}/{drift.prompts}",
                },
            }
            del merged
            model = _fresh(model, loader)
        result["adapters"] = per_adapter
    text = json.dumps(result, indent=2)
    args.out.write_text(text)
    print(text)
    return 0


def _cpu_name() -> str:
    """E.g. "x86_64 AMD EPYC, 2 cores" (platform.processor() is empty on most Linux systems)."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return f"{platform.machine()} {model or 'cpu'}, {os.cpu_count()} cores"


def _evict(store: AdapterStore) -> bool:
    """Make the next acquire of the measured adapter a real load: drop every GPU entry."""
    with store._lock:  # benchmark-only reach into the store: evict without a competing adapter
        for key in list(store._gpu):
            store._evict_gpu(key)
    return False


def _fresh(model: torch.nn.Module, loader: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """A base without PEFT layers (a store wraps its base in place)."""
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return loader()


if __name__ == "__main__":
    raise SystemExit(main())
