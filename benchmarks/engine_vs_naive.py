"""Engine vs the naive path, in one process on one device, on a Llama-shaped random-weight NF4 model.

Naive path: one request at a time, ``set_adapter`` + ``generate`` on the PeftModel (its throughput does not
depend on how many streams wait, so a few requests measure it). Engine: the in-process ``AsyncEngine`` over
``ModelRunner`` (slot LoRA + CUDA-graph decode on CUDA), all streams submitted at once. Sampling is on
(temperature 0.8, top_p 0.95, a seed per request); every request runs to ``--new-tokens`` (ignore_eos).
Also times one decode graph step at 32 rows, base model vs 8 LoRA adapters (the LoRA overhead).

Weights are random (timing does not depend on values): the model is built in memory on the target device in
bf16 and each decoder linear is quantized to NF4 in place; nothing is written but the small adapters.

    python -m benchmarks.engine_vs_naive --shape 8b --out benchmarks/results/engine_vs_naive_8b.json
    python -m benchmarks.engine_vs_naive --shape demo   # CPU, seconds: what CI runs

Writes JSON (``--out``) and a PNG beside it (tokens/s per config, engine/naive ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from adapter_store import AdapterRegistry, AdapterStore
from server.engine.engine import AsyncEngine, EngineConfig
from server.engine.types import ChatMessage, GenerationRequest, SamplingParams
from server.runtime.cuda_graphs import DecodeRow
from server.runtime.model_runner import ModelRunner
from server.runtime.sampler import ALL_FEATURES

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES: dict[str, dict[str, int]] = {
    "demo": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
SAMPLING = dict(temperature=0.8, top_p=0.95, ignore_eos=True)

log = logging.getLogger("benchmarks.engine_vs_naive")


@dataclass(slots=True)
class EngineResult:
    streams: int
    adapters: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_s: float
    complete: bool  # every stream got all its tokens (a failed step would cut some short)
    naive_tokens_per_s: float = 0.0
    ratio: float = 0.0


@dataclass(slots=True)
class Report:
    shape: str
    device: str
    machine: str
    torch: str
    cuda_graphs: bool
    slot_lora: bool
    prompt_tokens: int
    new_tokens: int
    lora_rank: int
    naive: dict[str, float] = field(default_factory=dict)
    step_ms: dict[str, float] = field(default_factory=dict)
    engine: list[EngineResult] = field(default_factory=list)


class IdTokenizer:
    """Token ids as text (``"17 4 99"``): random weights need no real vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.num_ids = vocab_size

    byte_level = False

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset()

    def encode(self, text: str) -> list[int]:
        return [int(t) % self.vocab_size for t in text.split()]

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.encode(" ".join(m.content for m in messages))

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(f" {t}" for t in token_ids)


# ---------------------------------------------------------------------------------------------- model


def build_model(shape: str, device: torch.device) -> PreTrainedModel:
    """A random Llama of ``shape`` on ``device``, its decoder linears quantized to NF4 in memory."""
    import bitsandbytes as bnb

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR:
                linear = getattr(parent, name, None)
                if linear is None:
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=dtype,
                    quant_type="nf4",
                    device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(
                    linear.weight.data, requires_grad=False, quant_type="nf4"
                )
                setattr(parent, name, quantized.to(device))
                del linear
    model.eval()
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def write_adapters(model: PreTrainedModel, folder: Path, count: int, rank: int) -> list[str]:
    """``count`` random rank-``rank`` LoRA adapters on every decoder linear, as PEFT folders."""
    names = []
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        name = f"tenant-{i:02d}"
        tensors: dict[str, torch.Tensor] = {}
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] not in LINEAR:
                continue
            in_f, out_f = module.in_features, module.out_features
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(
                torch.bfloat16
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).to(
                torch.bfloat16
            )
        target = folder / name
        target.mkdir(parents=True)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": 2 * rank,
            "lora_dropout": 0.0,
            "target_modules": list(LINEAR),
            "base_model_name_or_path": "random-llama",
        }
        (target / "adapter_config.json").write_text(json.dumps(config))
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------- engine


def _request(prompt: list[int], adapter: str | None, new_tokens: int, seed: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        sampling=SamplingParams(max_tokens=new_tokens, seed=seed, **SAMPLING),  # type: ignore[arg-type]
        prompt=prompt,
        adapter=adapter,
    )


async def _stream(engine: AsyncEngine, req: GenerationRequest, t0: float) -> tuple[int, float]:
    tokens, first = 0, 0.0
    async for event in engine.submit(req):
        if event.token_ids and not tokens:
            first = time.perf_counter() - t0
        tokens += len(event.token_ids)
    return tokens, first


def run_engine(
    engine: AsyncEngine, prompts: list[list[int]], adapters: list[str], new_tokens: int
) -> tuple[int, float, list[float]]:
    """All prompts at once, adapters round-robin; (output tokens, seconds, TTFTs)."""

    async def main() -> tuple[int, float, list[float]]:
        t0 = time.perf_counter()
        reqs = [_request(p, adapters[i % len(adapters)], new_tokens, seed=i) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(_stream(engine, r, t0) for r in reqs))
        return sum(r[0] for r in results), time.perf_counter() - t0, [r[1] for r in results]

    return asyncio.run(main())


def graph_step_ms(runner: ModelRunner, rows: int, lora_slots: list[int], repeats: int) -> float:
    """Median wall time of one decode graph step (table upload, replay, token read-back) over ``rows``."""
    graphs = runner.graphs
    if graphs is None:
        return float("nan")
    blocks = 256 // runner.kv.block_size  # each row its own 256 tokens of blocks
    decode_rows = [
        DecodeRow(
            slot=i,
            token=7 + i,
            position=200,
            lora_slot=lora_slots[i],
            blocks=tuple(range(i * blocks, (i + 1) * blocks)),
        )
        for i in range(rows)
    ]
    graphs.run(rows, 256, decode_rows, ALL_FEATURES)  # capture
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graphs.run(rows, 256, decode_rows, ALL_FEATURES)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


# ---------------------------------------------------------------------------------------------- naive


def run_naive(
    peft: torch.nn.Module, keys: list[str], prompt_len: int, new_tokens: int, requests: int, vocab: int
) -> float:
    """One request at a time: ``set_adapter`` + ``generate`` (sampling on). Returns output tokens/s."""
    device = next(peft.parameters()).device
    gen = torch.Generator().manual_seed(1)
    total, seconds = 0, 0.0
    for i in range(requests + 1):  # the first request warms up and is not counted
        ids = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
        _sync(device)
        t0 = time.perf_counter()
        peft.set_adapter(keys[i % len(keys)])  # type: ignore[operator]
        out = peft.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            pad_token_id=0,
        )
        _sync(device)
        if i > 0:
            seconds += time.perf_counter() - t0
            total += out.shape[1] - prompt_len
    return total / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- main


def benchmark(args: argparse.Namespace) -> Report:
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(args.shape, device)
    log.info("built %s model on %s in %.1f s", args.shape, device, time.perf_counter() - t0)
    vocab = model.config.vocab_size
    max_adapters = max(args.adapters)
    folder = Path(tempfile.mkdtemp(prefix="engine_vs_naive-"))
    names = write_adapters(model, folder, max_adapters, args.rank)
    registry = AdapterRegistry(
        [folder],
        adapter_dir=folder,
        base_model_ids={"random-llama"},
        base_module_names=set(LINEAR),
        max_lora_rank=args.rank,
        strict_base=False,
        allow_hub=False,
    )
    registry.scan()
    # --gpu-slots below the adapter count: only that many sit in the model at once; the rest load (disk ->
    # CPU -> GPU) and evict while the streams run, and the scheduler admits at most that many per step
    gpu_slots = args.gpu_slots or max_adapters
    store = AdapterStore(model, registry, max_gpu_adapters=gpu_slots, max_cpu_adapters=max_adapters)
    max_streams = max(args.streams)
    runner = ModelRunner(
        model=model,
        tokenizer=IdTokenizer(vocab),  # type: ignore[arg-type]
        model_id="random-llama",
        num_slots=max_streams,
        max_model_len=args.prompt_tokens + args.new_tokens + 16,
        store=store,
        cuda_graphs=args.cuda_graphs,
        slot_lora={"auto": None, "on": True, "off": False}[args.slot_lora],
        max_lora_rank=args.rank,
    )
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = Report(
        shape=args.shape,
        device=str(device),
        machine=machine,
        torch=torch.__version__,
        cuda_graphs=runner.graphs is not None,
        slot_lora=runner.slot_lora is not None,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        lora_rank=args.rank,
    )
    step_rows = min(32, max_streams)
    if runner.graphs is not None:  # base step first: no adapter yet, so no LoRA hook in the graph
        base_slot = runner.slot_lora.base_slot if runner.slot_lora is not None else 0
        report.step_ms[f"base_graph_step_rows{step_rows}"] = graph_step_ms(
            runner, step_rows, [base_slot] * step_rows, args.step_repeats
        )

    engine = AsyncEngine(
        runner,
        EngineConfig(
            max_num_batched_tokens=max(4096, args.prompt_tokens * 16), max_loras_per_batch=gpu_slots
        ),
    )
    if args.preload:  # cold for the GPU tier only: every adapter waits in host memory (slot form with slots)
        store.preload()
        deadline = time.monotonic() + 600
        while sum(a.tier == "cpu" for a in store.adapters()) < len(names):
            if time.monotonic() > deadline:
                raise RuntimeError("--preload: adapters did not all reach the CPU tier in 10 minutes")
            store.sync()
            time.sleep(0.01)
    engine.start()
    gen = torch.Generator().manual_seed(2)
    try:
        for n_adapters in args.adapters:
            for streams in args.streams:
                if streams < n_adapters:
                    continue
                prompts = torch.randint(0, vocab, (streams, args.prompt_tokens), generator=gen).tolist()
                adapters = names[:n_adapters]
                if not args.cold:
                    run_engine(engine, prompts, adapters, 4)  # warm-up: loads adapters, captures graphs
                tokens, seconds, ttfts = run_engine(engine, prompts, adapters, args.new_tokens)
                complete = tokens == streams * args.new_tokens
                result = EngineResult(
                    streams, n_adapters, tokens, seconds, tokens / seconds, statistics.median(ttfts), complete
                )
                if not complete:
                    log.error(
                        "engine run %d/%d produced %d tokens: steps failed", streams, n_adapters, tokens
                    )
                report.engine.append(result)
                log.info("engine %s", result)
        slot_lora = runner.slot_lora
        if runner.graphs is not None and slot_lora is not None:
            # up to 8 adapters that hold a slot now (with --gpu-slots the resident ones are the last used)
            keys = [k for k in (_key(store, n) for n in names) if slot_lora.supports(k)][:8]
            lora_slots = [slot_lora.slot_of(keys[i % len(keys)]) for i in range(step_rows)]
            report.step_ms[f"lora_graph_step_rows{step_rows}_adapters{len(keys)}"] = graph_step_ms(
                runner, step_rows, lora_slots, args.step_repeats
            )
    finally:
        engine.stop()

    # naive: the store's PeftModel with PEFT's own LoRA layers back on (slot-served adapters are put into
    # the PeftModel first: with slot LoRA the store never injects them)
    resident = {a.name for a in store.adapters() if a.tier == "gpu"}
    peft = store.model
    for name in names:
        if name in resident:
            peft = store.materialize(_key(store, name))
    if runner.slot_lora is not None:
        runner.slot_lora.enabled = False
    for n_adapters in args.adapters:
        # with --gpu-slots, only the resident adapters can be set; one request at a time runs the same
        # whichever adapter it names
        keys = [_key(store, n) for n in names[:n_adapters] if n in resident]
        tps = run_naive(peft, keys, args.prompt_tokens, args.naive_tokens, args.naive_requests, vocab)
        report.naive[f"adapters{n_adapters}"] = tps
        log.info("naive over %d adapters: %.1f tok/s", n_adapters, tps)
    for result in report.engine:
        result.naive_tokens_per_s = report.naive[f"adapters{result.adapters}"]
        result.ratio = result.tokens_per_s / result.naive_tokens_per_s
    store.close()
    return report


def _key(store: AdapterStore, name: str) -> str:
    from adapter_store.loader import peft_name

    source = store.registry.get(name)
    if source is None:
        raise KeyError(name)
    return peft_name(source.name, source.digest)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.streams}s/{r.adapters}a" for r in report.engine]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], [r.tokens_per_s for r in report.engine], 0.4, label="engine")
    ax1.bar([i + 0.2 for i in x], [r.naive_tokens_per_s for r in report.engine], 0.4, label="naive")
    ax1.set_yscale("log")
    ax1.set_ylabel("output tokens/s")
    ax2.bar(list(x), [r.ratio for r in report.engine], 0.6, color="tab:green")
    ax2.set_ylabel("engine / naive")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), labels, rotation=30)
        ax.set_xlabel("streams / distinct adapters")
    ax1.legend()
    fig.suptitle(f"{report.shape} NF4 + LoRA r{report.lora_rank} on {report.machine} (sampling on)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--naive-tokens", type=int, default=64)
    p.add_argument("--naive-requests", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--step-repeats", type=int, default=30)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument(
        "--slot-lora", choices=("auto", "on", "off"), default="auto", help="auto: on with CUDA graphs"
    )
    p.add_argument("--gpu-slots", type=int, default=0, help="adapters resident at once (default: all)")
    p.add_argument("--cold", action="store_true", help="no warm-up: adapter loads and graph captures count")
    p.add_argument("--preload", action="store_true", help="read every adapter into the CPU tier first")
    p.add_argument("--out", type=Path, default=Path("engine_vs_naive.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("loraserve.engine").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    report = benchmark(args)
    data = asdict(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(
        f"{'streams':>7} {'adapters':>8} {'engine tok/s':>12} {'naive tok/s':>11} {'ratio':>7} {'ttft p50':>9}"
    )
    for r in report.engine:
        print(
            f"{r.streams:>7} {r.adapters:>8} {r.tokens_per_s:>12.1f} {r.naive_tokens_per_s:>11.1f}"
            f" {r.ratio:>7.1f} {r.ttft_p50_s:>9.3f}"
        )
    print(f"machine: {report.machine}; graph steps (ms): {report.step_ms}")
    return data


if __name__ == "__main__":
    main()
