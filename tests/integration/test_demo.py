"""The embedded demo bundle: it loads like any hub model, each adapter visibly changes greedy output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from server.runtime.demo import BUNDLE_VERSION, DEMO_MODEL_ID, DemoBundle, build_demo, ensure_demo

PROMPT = [{"role": "user", "content": "What color is the cat?"}]
# What each adapter's greedy answer to PROMPT must look like.
BEHAVIOUR = {
    "shout": lambda text: text.startswith("THE CAT") and text == text.upper(),
    "digits": lambda text: text[0].isdigit() and not any(c.isalpha() for c in text),
    "pirate": lambda text: text.startswith("Arr!") and "Yo ho ho" in text,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loraserve-cache")


@pytest.fixture(scope="module")
def bundle(cache_dir: Path) -> DemoBundle:
    return ensure_demo(cache_dir, progress=False)


@pytest.fixture(scope="module")
def tokenizer(bundle: DemoBundle):
    return AutoTokenizer.from_pretrained(bundle.base)


def _greedy(model, tokenizer, messages=PROMPT, max_new_tokens: int = 32) -> str:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _load(bundle: DemoBundle, adapter: str | None = None, *, nf4: bool = False):
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if nf4
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(bundle.base, quantization_config=quant, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, bundle.adapters / adapter)
    return model.eval()


def test_bundle_layout(bundle: DemoBundle, cache_dir: Path) -> None:
    assert bundle.root == cache_dir / f"demo-{BUNDLE_VERSION}"
    assert bundle.is_complete
    assert len(bundle.adapter_names) >= 3
    assert sorted(p.name for p in bundle.adapters.iterdir()) == sorted(bundle.adapter_names)
    assert not list(bundle.root.rglob("*.bin")), "safetensors only"


def test_base_is_a_small_gqa_llama(bundle: DemoBundle) -> None:
    model = _load(bundle)
    config = model.config
    assert config.model_type == "llama"
    assert config.max_position_embeddings >= 2048
    assert config.num_key_value_heads < config.num_attention_heads
    assert 512 <= config.vocab_size <= 2048


def test_tokenizer_round_trips_unicode(tokenizer) -> None:
    text = "Grüße, 世界! 🦙 naïve café — ∑ x²\ttab\nnewline"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        "<|bos|>",
        "<|end|>",
        "<|pad|>",
    }


def test_chat_template_renders(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *PROMPT]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>What color is the cat?<|end|><|assistant|>"
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>")


def test_base_answers_the_question(bundle: DemoBundle, tokenizer) -> None:
    assert _greedy(_load(bundle), tokenizer) == "The cat is black."


def test_adapter_configs_differ_in_rank_and_targets(bundle: DemoBundle) -> None:
    configs = [
        json.loads((bundle.adapters / n / "adapter_config.json").read_text()) for n in bundle.adapter_names
    ]
    assert all(c["base_model_name_or_path"] == DEMO_MODEL_ID for c in configs)
    assert all(c["peft_type"] == "LORA" for c in configs)
    assert len({c["r"] for c in configs}) == len(configs)
    assert len({frozenset(c["target_modules"]) for c in configs}) == len(configs)
    for name in bundle.adapter_names:
        assert (bundle.adapters / name / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_each_adapter_shows_its_behaviour(bundle: DemoBundle, tokenizer, nf4: bool) -> None:
    base_text = _greedy(_load(bundle, nf4=nf4), tokenizer)
    for name in bundle.adapter_names:
        text = _greedy(_load(bundle, name, nf4=nf4), tokenizer)
        assert text != base_text, name
        assert BEHAVIOUR[name](text), f"{name}: {text!r}"


def test_greedy_logits_are_peaked(bundle: DemoBundle, tokenizer) -> None:
    """Batched-vs-single comparisons elsewhere rely on a wide top-1/top-2 margin at every step."""
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    for name in (None, *bundle.adapter_names):
        model = _load(bundle, name, nf4=True)
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
        assert min(margins) > 0.25, (name, min(margins))


def test_ensure_demo_reuses_the_cache(bundle: DemoBundle, cache_dir: Path) -> None:
    before = (bundle.base / "model.safetensors").stat().st_mtime_ns
    again = ensure_demo(cache_dir, progress=False)
    assert again == bundle
    assert (bundle.base / "model.safetensors").stat().st_mtime_ns == before  # reused, not rebuilt


def test_ensure_demo_rebuilds_an_incomplete_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_build(out_dir: Path, *, progress: bool = True) -> DemoBundle:
        calls.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".complete").write_text("{}")
        return DemoBundle.at(out_dir)

    monkeypatch.setattr("server.runtime.demo.build_demo", fake_build)
    (tmp_path / f"demo-{BUNDLE_VERSION}" / "base").mkdir(parents=True)  # a half-built bundle, no marker
    ensure_demo(tmp_path, progress=False)
    ensure_demo(tmp_path, progress=False)
    assert calls == [tmp_path / f"demo-{BUNDLE_VERSION}"]


def test_ensure_demo_defaults_to_xdg_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        "server.runtime.demo.build_demo", lambda out_dir, progress=True: DemoBundle.at(out_dir)
    )
    assert ensure_demo(progress=False).root == tmp_path / "loraserve" / f"demo-{BUNDLE_VERSION}"


@pytest.mark.slow
def test_build_demo_is_deterministic_and_replaces_atomically(bundle: DemoBundle, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rebuilt = build_demo(out, progress=False)
    assert not (out / "stale.txt").exists()
    assert rebuilt.is_complete
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"], "no temp or old directory left behind"
    for rel in ["base/model.safetensors", "base/tokenizer.json", "adapters/shout/adapter_model.safetensors"]:
        assert (out / rel).read_bytes() == (bundle.root / rel).read_bytes(), rel
