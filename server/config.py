"""Server settings: command-line flags and ``LORASERVE_*`` environment variables.

Nothing is read at import time: ``Settings()`` reads the environment when it is built (in ``cli.main``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server. Field descriptions become the ``--help`` text and the README table."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="forbid", protected_namespaces=())

    # ---- model
    model: str | None = Field(
        None, description="base model: a local folder or a hub id; unset serves the embedded demo bundle"
    )
    served_model_name: str | None = Field(None, description="id of the base in the API (default: model name)")
    demo_dir: Path | None = Field(None, description="where the demo bundle is built and cached")
    quantization: Literal["nf4", "int8", "none"] = Field("nf4", description="weights of the base model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="compute dtype (auto: bfloat16 on CUDA, float32 on CPU)"
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="where the model runs")
    trust_remote_code: bool = Field(False, description="never needed for Llama-family models; off")
    allow_hub: bool = Field(False, description="allow hub ids for the base model and adapters")

    # ---- engine
    max_num_seqs: int = Field(32, ge=1, le=1024, description="sequences running at once")
    max_model_len: int = Field(2048, ge=16, description="context length: prompt plus output tokens")
    max_num_batched_tokens: int = Field(
        512, ge=16, description="tokens per step: decode rows first, then prompt chunks (chunked prefill)"
    )
    prefill_beside_decode: int | None = Field(
        None,
        ge=0,
        description="while streams decode, a step's prompt chunks take at most this many tokens plus one "
        "per decoding stream, which bounds how long such a step holds the streams up, at the price of slower "
        "admission under bursts of long prompts (default on the CPU: measured, as many as keep a step within "
        "1.6 steps of its decode rows alone, at least 8 plus one per decoding stream; no cap on CUDA)",
    )
    kv_cache_memory: int | None = Field(
        None,
        ge=1,
        description="bytes of paged KV memory (default: 80% of free CUDA memory; on the CPU, "
        "max-num-seqs whole contexts)",
    )
    prefix_caching: bool = Field(
        True, description="share the KV of full prompt blocks between requests of the same adapter version"
    )
    max_loras_per_batch: int = Field(8, ge=1, description="distinct adapters in one step")
    max_queue: int = Field(256, ge=1, description="waiting requests before 429")
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs (CUDA only)")
    cpu_prepack: Literal["auto", "on", "off"] = Field(
        "auto",
        description="pack linear weights for oneDNN once (CPU, --quantization none): bf16 1.3-1.7x faster, "
        "float32 up to 2.6x where MKL is slow, for one more copy of their weights; bf16 on a CPU without bf16 "
        "kernels (AVX2) through a float32 copy, 3.4x at 16 tokens on Zen 3, for twice their bytes; auto: bf16 "
        "always, float32 and widened bf16 where they time faster at load, while the copy fits in a quarter of "
        "free memory",
    )
    decode_attention: Literal["auto", "sdpa", "matmul"] = Field(
        "auto",
        description="how decode rows attend: torch SDPA, or matmuls around a float32 softmax (transformers' eager "
        "numerics), 5-6x faster than SDPA in bf16 on Zen 4; auto: whichever times faster at load (CPU), SDPA on CUDA",
    )
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        "raw_logprobs",
        description="logprobs of the model's logits (vLLM's default) or of the distribution sampled from",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto",
        description="how the model writes tool calls (vLLM's names); auto: detected from the chat template",
    )

    # ---- adapters
    adapter_dir: Path | None = Field(None, description="folder of adapter folders (name = folder name)")
    max_gpu_adapters: int = Field(8, ge=1, description="adapters resident in the model")
    max_cpu_adapters: int = Field(32, ge=0, description="adapters kept as host state dicts")
    preload_adapters: bool = Field(
        False, description="read registered adapters into the CPU tier at startup (up to --max-cpu-adapters)"
    )
    adapter_load_workers: int = Field(
        4, ge=1, le=64, description="threads reading, hashing and preparing adapters off disk"
    )
    max_lora_rank: int = Field(
        16, ge=1, le=512, description="refuse adapters of a higher rank; sizes the GPU slot tensors (as vLLM)"
    )
    strict_base: bool = Field(False, description="refuse adapters trained on another base (else warn)")
    snapshot_policy: Literal["off", "manual", "auto"] = Field(
        "manual", description="merged snapshots: none, admin-triggered, or auto for hot adapters"
    )
    max_snapshots: int = Field(1, ge=0, description="merged snapshots resident at once")
    snapshot_share: float = Field(
        0.5, gt=0.0, le=1.0, description="auto policy: share of recent traffic that makes an adapter hot"
    )

    # ---- HTTP
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0: any free port)")
    api_keys: Path | None = Field(None, description="JSON keys file; unset = open access (loopback admin)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body")
    shutdown_timeout: float = Field(30.0, ge=0.0, description="seconds to let requests finish on SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_json: bool = Field(False, description="one JSON object per log line")


class ScaleSettings(BaseSettings):
    """``loraserve serve-ray``: how many engine replicas, what each reserves, where Ray runs, and how the
    ingress picks a replica. The engine flags (``Settings``) apply to every replica."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="forbid", protected_namespaces=())

    replicas: int = Field(2, ge=1, le=256, description="engine replicas (each one base model and its store)")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs Ray reserves per replica (fractions allowed)")
    ray_address: str | None = Field(
        None, description="an existing Ray cluster (e.g. auto, or host:6379); unset starts a local one"
    )
    routing: Literal["affinity", "round_robin"] = Field(
        "affinity", description="send an adapter's requests where it is resident, or rotate (a baseline)"
    )
