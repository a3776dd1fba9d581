"""Settings -> a running server's parts: base model, adapter store, runner, engine, app. Built once in
``cli.serve`` (and by tests and benchmarks that want the same wiring without HTTP)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from server.config import Settings
from server.engine.engine import AsyncEngine, EngineConfig
from server.engine.step_cost import DEFAULT_RATIO
from server.metrics import CacheConfig, Metrics

if TYPE_CHECKING:
    from adapter_store import AdapterStore

log = logging.getLogger("loraserve")

CPU_PREFILL_BESIDE_DECODE = 8  # on the CPU, the measured allowance's floor (see _prefill_beside_decode)


@dataclass(slots=True)
class ServerParts:
    engine: AsyncEngine
    app: FastAPI
    store: AdapterStore
    metrics: Metrics

    def close(self) -> None:
        self.store.close()


def build_engine(settings: Settings, metrics: Metrics | None = None) -> tuple[AsyncEngine, AdapterStore]:
    """Load the base (or build the demo bundle), the adapter store and the runner; return the engine
    (not started) and the store."""
    from adapter_store import AdapterRegistry, AdapterStore
    from server.runtime.loader import (
        ModelSpec,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        target_module_names,
        unservable_modules,
    )
    from server.runtime.model_runner import ModelRunner
    from server.runtime.tokenizer import HFTokenizer

    source, model_id, adapter_dir = _resolve_sources(settings)
    device = resolve_device(settings.device)
    spec = ModelSpec(
        source=source,
        quantization=settings.quantization,
        dtype=resolve_dtype(settings.dtype, device),
        device=device,
        allow_hub=settings.allow_hub,
        trust_remote_code=settings.trust_remote_code,
    )
    log.info("loading %s (%s, %s) on %s", source, settings.quantization, spec.dtype, device)
    model = load_model(spec)
    hf_tokenizer, generation_config = load_tokenizer(spec)
    base_ids = {model_id, source, Path(source).name}
    roots = [adapter_dir] if adapter_dir is not None else []
    registry = AdapterRegistry(
        roots,
        adapter_dir=adapter_dir,
        base_model_ids=base_ids,
        base_module_names=target_module_names(model),
        max_lora_rank=settings.max_lora_rank,
        strict_base=settings.strict_base,
        allow_hub=settings.allow_hub,
        unservable_modules=unservable_modules(model),
    )
    for refusal in registry.scan():
        log.warning("adapter skipped: %s", refusal)
    if metrics is not None:
        metrics.set_rank_lookup(lambda name: s.rank if (s := registry.peek(name)) is not None else None)
    store = AdapterStore(
        model,
        registry,
        max_gpu_adapters=settings.max_gpu_adapters,
        max_cpu_adapters=settings.max_cpu_adapters,
        load_workers=settings.adapter_load_workers,
        observer=metrics,
        base_loader=partial(load_model, spec) if settings.snapshot_policy != "off" else None,
        snapshot_policy=settings.snapshot_policy,
        max_snapshots=settings.max_snapshots,
        snapshot_share=settings.snapshot_share,
    )
    runner = ModelRunner(
        model=model,
        tokenizer=HFTokenizer(hf_tokenizer, generation_config),
        model_id=model_id,
        num_slots=settings.max_num_seqs,
        max_model_len=settings.max_model_len,
        store=store,
        cuda_graphs=settings.cuda_graphs,
        cpu_prepack=settings.cpu_prepack,
        decode_attention=settings.decode_attention,
        max_lora_rank=settings.max_lora_rank,
        logprobs_mode=settings.logprobs_mode,
        kv_cache_memory=settings.kv_cache_memory,
    )
    if metrics is not None:
        metrics.set_cache_config(
            CacheConfig(
                block_size=runner.kv.block_size,
                num_blocks=runner.kv.num_blocks,
                cache_dtype=str(runner.dtype).removeprefix("torch."),
                kv_cache_memory_bytes=runner.kv.nbytes,
                enable_prefix_caching=settings.prefix_caching,
            )
        )
        metrics.set_max_gpu_lora_adapters(model_id, store.max_gpu_adapters)
    if settings.preload_adapters:  # after the runner: its GPU tier listener prepares them as they load
        log.info("preloading %d adapters into the CPU tier", store.preload())
    beside, step_ratio = _prefill_beside_decode(settings, runner.device.type)
    engine = AsyncEngine(
        runner,
        EngineConfig(
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_loras_per_batch=settings.max_loras_per_batch,
            max_queue=settings.max_queue,
            enable_prefix_caching=settings.prefix_caching,
            prefill_beside_decode=beside,
            prefill_step_ratio=step_ratio,
        ),
        metrics,
    )
    return engine, store


def build_server(settings: Settings) -> ServerParts:
    """The serving process's parts. The calling thread loads the model single-threaded and then only serves
    HTTP: torch's intra-op threads are the engine thread's alone (``adapter_store.torch_threads``)."""
    from adapter_store.torch_threads import serial_torch
    from server.api.app import create_app

    serial_torch()
    metrics = Metrics(CollectorRegistry(), max_model_len=settings.max_model_len)
    engine, store = build_engine(settings, metrics)
    app = create_app(settings, engine, store=store, metrics=metrics)
    return ServerParts(engine=engine, app=app, store=store, metrics=metrics)


def _resolve_sources(settings: Settings) -> tuple[str, str, Path | None]:
    """(model source, served model id, adapter folder). No ``--model``: the embedded demo bundle, built
    once into the cache, with its adapters unless ``--adapter-dir`` names others."""
    if settings.model is not None:
        model_id = settings.served_model_name or settings.model.rstrip("/").rsplit("/", 1)[-1]
        return settings.model, model_id, settings.adapter_dir
    from server.runtime.demo import DEMO_MODEL_ID, ensure_demo

    bundle = ensure_demo(settings.demo_dir)
    adapter_dir = settings.adapter_dir if settings.adapter_dir is not None else bundle.adapters
    return str(bundle.base), settings.served_model_name or DEMO_MODEL_ID, adapter_dir


def _prefill_beside_decode(settings: Settings, device_type: str) -> tuple[int | None, float | None]:
    """``EngineConfig``'s ``prefill_beside_decode`` and ``prefill_step_ratio``: a fixed cap where
    ``--prefill-beside-decode`` is set; by default on the CPU a measured one (``server.engine.step_cost``:
    as many prompt tokens as keep a step within 1.6 steps of its decode rows alone, at least 8 plus one
    per decode row, where each prompt token costs from about 1/100 to 1/40 of a decode step from one CPU
    and dtype to another); no cap on CUDA, where tokens are cheap until the GPU is full."""
    if settings.prefill_beside_decode is not None:
        return settings.prefill_beside_decode, None
    if device_type != "cpu":
        return None, None
    return CPU_PREFILL_BESIDE_DECODE, DEFAULT_RATIO
