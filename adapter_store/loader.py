"""Reading an adapter off disk (loader thread) and putting it into / taking it out of a PeftModel
(engine thread).

``read_adapter`` hashes exactly the bytes it deserializes, so the digest recorded for a loaded adapter is
the digest of the weights that run. Only safetensors are parsed; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModelForCausalLM, set_peft_model_state_dict
from safetensors.torch import load as load_safetensors

from adapter_store.registry import AdapterSource

log = logging.getLogger(__name__)

_LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig))


class AdapterLoadError(Exception):
    """An adapter that was registered but could not be loaded or injected. ``status`` is 4xx when its
    files or config are at fault, 5xx when the server is."""

    def __init__(self, message: str, *, status: int = 500, reason: str = "load_failed") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class LoadedAdapter:
    """One adapter version in host memory: config + PEFT state dict (pinned on CUDA hosts)."""

    source: AdapterSource
    digest: str  # sha256 of the bytes the tensors came from
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    nbytes: int
    seconds: float  # disk read + hash + parse
    # the adapter in a GPU tier listener's own form (``GpuTierListener.prepare``), made on the loader thread
    prepared: object | None = None
    prepared_by: object | None = None  # the listener that made ``prepared``


def peft_name(name: str, digest: str) -> str:
    """The adapter's name inside the PeftModel: one per version, so two versions can coexist."""
    return f"{name}@{digest[:12]}"


def lora_config(config: dict[str, Any]) -> LoraConfig:
    """A ``LoraConfig`` from a validated ``adapter_config.json`` (unknown keys from other PEFT versions
    are dropped), in inference mode."""
    kwargs = {k: v for k, v in config.items() if k in _LORA_FIELDS and k not in ("peft_type", "revision")}
    kwargs["inference_mode"] = True
    return LoraConfig(**kwargs)


def read_adapter(source: AdapterSource, *, pin_memory: bool = False) -> LoadedAdapter:
    """Read, hash and parse ``source``'s weights (runs on the loader thread)."""
    t0 = time.perf_counter()
    try:
        data = source.weights_path.read_bytes()
    except OSError as e:
        raise AdapterLoadError(f"adapter {source.name!r}: cannot read weights ({e})", status=422) from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        state_dict = load_safetensors(data)
    except Exception as e:  # safetensors raises its own SafetensorError and others on bad bytes
        raise AdapterLoadError(
            f"adapter {source.name!r}: {source.weights_path.name} is corrupt ({e})",
            status=422,
            reason="corrupt",
        ) from None
    del data
    _drop_base_copies(source, state_dict)
    _check_shapes(source, state_dict)
    try:
        config = lora_config(source.config)
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"adapter {source.name!r}: bad LoRA config ({e})", status=422) from None
    if pin_memory:
        state_dict = {k: v.pin_memory() for k, v in state_dict.items()}
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    return LoadedAdapter(source, digest, config, state_dict, nbytes, time.perf_counter() - t0)


def _drop_base_copies(source: AdapterSource, state_dict: dict[str, torch.Tensor]) -> None:
    """PEFT saves a copy of a targeted embedding or output layer (``lm_head.base_layer.weight``) next to the
    LoRA weights, and loading the adapter with PEFT would write it into the base model, which every tenant
    shares. The base stays the base: such copies are dropped (a resized vocabulary is refused by the shape
    of the LoRA weights themselves)."""
    copies = [k for k in state_dict if ".base_layer." in k]
    for key in copies:
        del state_dict[key]
    if copies:
        log.info("adapter %s: ignoring its copies of base weights (%s)", source.name, ", ".join(copies[:3]))


def _check_shapes(source: AdapterSource, state_dict: dict[str, torch.Tensor]) -> None:
    """A file may lie about its rank: refuse tensors wider than the rank the config declared."""
    for key, t in state_dict.items():
        if t.ndim != 2:
            continue
        r = t.shape[0] if ".lora_A." in key else t.shape[1] if ".lora_B." in key else 0
        if r > source.rank:
            raise AdapterLoadError(
                f"adapter {source.name!r}: tensor {key} has rank {r}, above the declared rank {source.rank}",
                status=422,
                reason="rank_too_high",
            )


def inject(
    peft: PeftModelForCausalLM | None, base: torch.nn.Module, adapter: LoadedAdapter, name: str
) -> PeftModelForCausalLM:
    """Add ``adapter`` as ``name`` to ``peft`` (wrapping ``base`` on first use); returns the PeftModel.
    On failure the half-added adapter is removed and ``AdapterLoadError`` (422) raised."""
    try:
        if peft is None:
            peft = PeftModelForCausalLM(base, adapter.config, adapter_name=name, low_cpu_mem_usage=True)
        else:
            peft.add_adapter(name, adapter.config, low_cpu_mem_usage=True)
        result: Any = set_peft_model_state_dict(
            peft, adapter.state_dict, adapter_name=name, low_cpu_mem_usage=True
        )
        missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
        if result.unexpected_keys or missing:
            bad = (list(result.unexpected_keys) + missing)[:3]
            raise ValueError(f"weights do not fit the base model (e.g. {', '.join(bad)})")
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        if peft is not None and name in peft.peft_config:
            peft.delete_adapter(name)
        raise AdapterLoadError(
            f"adapter {adapter.source.name!r} cannot be put on the base model: {e}", status=422
        ) from None
    _fix_active(peft)
    peft.eval()
    return peft


def remove(peft: PeftModelForCausalLM, name: str) -> None:
    """Delete adapter ``name`` from ``peft``, keeping PEFT's notion of the active adapter valid."""
    if name in peft.peft_config:
        peft.delete_adapter(name)
    _fix_active(peft)


def _fix_active(peft: PeftModelForCausalLM) -> None:
    # PeftModel keeps a stale active adapter name when the active one is deleted; its forward then fails.
    # Rows are routed by adapter_names anyway, so which adapter is "active" does not matter.
    if peft.active_adapter not in peft.peft_config and peft.peft_config:
        peft.set_adapter(next(iter(peft.peft_config)))
