"""Adapters the way users save them, on an NF4 Llama: "all-linear", rsLoRA, rank and alpha patterns, LoRA on
lm_head and on embed_tokens, ``modules_to_save``: each is served equal to plain PEFT on a fresh model, alone
and batched beside the base and the other adapters. DoRA and ``modules_to_save`` are refused by name (a
full copy of a layer cannot share it with other tenants' LoRA on that layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapter_store import AdapterRefusedError
from server.bootstrap import build_engine
from server.config import Settings
from tests.integration.store_helpers import one_torch_thread
from tests.integration.test_model_families import build_family, reference, served

VARIANTS: dict[str, dict[str, Any]] = {
    "all-linear": {"target_modules": "all-linear"},
    "rslora-patterns": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "use_rslora": True,
        "rank_pattern": {"down_proj": 8},
        "alpha_pattern": {"v_proj": 32},
    },
    "lm-head": {"target_modules": ["q_proj", "lm_head"]},
    "embed-tokens": {"target_modules": ["embed_tokens", "o_proj"]},
}


def save_variant(base: Path, out: Path, seed: int, **config: Any) -> Path:
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    if "modules_to_save" in config:  # a trained copy differs from the base's
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.5)
    peft.save_pretrained(out)
    path = out / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, demo_bundle) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("variants")
    with one_torch_thread():
        base, _ = build_family(root, "llama", demo_bundle.base)
        adapters = root / "adapters"
        for seed, (name, config) in enumerate(VARIANTS.items(), start=10):
            save_variant(base, adapters / name, seed, **config)
    return base, adapters


@pytest.mark.slow
def test_each_variant_equals_fresh_peft_alone_and_batched(bundle: tuple[Path, Path]) -> None:
    base, adapters = bundle
    with one_torch_thread():
        want = {name: reference(base, adapters / name, "nf4") for name in VARIANTS}
        want_base = reference(base, None, "nf4")
        settings = Settings(
            device="cpu",
            model=str(base),
            adapter_dir=adapters,
            max_num_seqs=16,
            max_model_len=128,
            max_gpu_adapters=len(VARIANTS),
        )
        engine, store = build_engine(settings)
        engine.start()
        try:
            assert served(engine, None) == want_base
            for name in VARIANTS:
                assert served(engine, name) == want[name], f"{name} alone"
            names = list(VARIANTS)
            for name in names:
                others = tuple(n for n in [None, *names] if n != name)
                assert served(engine, name, beside=others) == want[name], f"{name} batched"
        finally:
            engine.stop()
            store.close()


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
        ({"target_modules": ["k_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_refused_by_name(
    bundle: tuple[Path, Path], tmp_path: Path, config: dict[str, Any], named: str
) -> None:
    base, _ = bundle
    with one_torch_thread():
        save_variant(base, tmp_path / "adapters" / "refused", 3, **config)
    settings = Settings(device="cpu", model=str(base), adapter_dir=tmp_path / "adapters", max_model_len=64)
    _, store = build_engine(settings)
    try:
        with pytest.raises(AdapterRefusedError, match=named) as refused:
            store.registry.register("refused", tmp_path / "adapters" / "refused")
        assert refused.value.status == 422
    finally:
        store.close()
