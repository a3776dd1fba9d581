"""AdapterRegistry: every refusal names its reason and leaves other adapters alone (no model needed)."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_store import AdapterRefusedError, AdapterRegistry

BASE = "tiny-base"
MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def write_adapter(folder: Path, *, r: int = 4, **overrides: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": BASE,
    }
    config.update(overrides)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(r, 8), f"{key}.lora_B.weight": torch.zeros(8, r)},
        str(folder / "adapter_model.safetensors"),
    )
    return folder


class Boom:
    """Unpickling this creates a file: proof that a .bin was (never) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    adapter_dir = tmp_path / "adapters"
    outside = tmp_path / "outside"
    adapter_dir.mkdir()
    outside.mkdir()
    return adapter_dir, outside


def make_registry(adapter_dir: Path, *, strict_base: bool = False, max_rank: int = 16) -> AdapterRegistry:
    return AdapterRegistry(
        [adapter_dir],
        adapter_dir=adapter_dir,
        base_model_ids=[BASE, f"/models/{BASE}"],
        base_module_names=MODULES,
        max_lora_rank=max_rank,
        strict_base=strict_base,
    )


def _pickle_only(d: Path, o: Path) -> tuple[str, str]:
    folder = d / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Boom(str(o / "pwned"))))
    return "pickled", str(folder)


def _symlink_out(d: Path, o: Path) -> tuple[str, str]:
    write_adapter(o / "evil")
    os.symlink(o / "evil", d / "link")
    return "link", str(d / "link")


def _symlinked_weights(d: Path, o: Path) -> tuple[str, str]:
    write_adapter(o / "evil")
    folder = d / "half"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((o / "evil" / "adapter_config.json").read_text())
    os.symlink(o / "evil" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    return "half", str(folder)


def _truncated(d: Path, o: Path) -> tuple[str, str]:
    folder = write_adapter(d / "trunc")
    w = folder / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    return "trunc", str(folder)


def _no_config(d: Path, o: Path) -> tuple[str, str]:
    folder = write_adapter(d / "noconf")
    (folder / "adapter_config.json").unlink()
    return "noconf", str(folder)


def _with(name: str, **overrides: object) -> Callable[[Path, Path], tuple[str, str]]:
    return lambda d, o: (name, str(write_adapter(d / name, **overrides)))


REFUSALS: list[tuple[str, Callable[[Path, Path], tuple[str, str]], str, int]] = [
    ("traversal in name", lambda d, o: ("../evil", str(write_adapter(d / "ok"))), "bad_name", 400),
    ("dotdot inside name", lambda d, o: ("a..b", str(write_adapter(d / "ok"))), "bad_name", 400),
    ("slash in name", lambda d, o: ("a/b", str(write_adapter(d / "ok"))), "bad_name", 400),
    ("empty name", lambda d, o: ("", str(write_adapter(d / "ok"))), "bad_name", 400),
    ("name too long", lambda d, o: ("a" * 129, str(write_adapter(d / "ok"))), "bad_name", 400),
    ("traversal in path", lambda d, o: (write_adapter(o / "x") and "x", "../outside/x"), "path_escape", 400),
    ("absolute path outside root", lambda d, o: ("x", str(write_adapter(o / "x"))), "path_escape", 400),
    ("symlink out of the root", _symlink_out, "path_escape", 400),
    ("weights symlinked out of the root", _symlinked_weights, "path_escape", 400),
    ("pickle-only folder", _pickle_only, "no_safetensors", 422),
    ("missing folder", lambda d, o: ("ghost", str(d / "ghost")), "not_found", 404),
    ("missing config", _no_config, "missing_config", 422),
    ("truncated weights", _truncated, "corrupt", 422),
    ("rank bomb", _with("bomb", r=4096), "rank_too_high", 422),
    ("rank bomb in rank_pattern", _with("bomb2", rank_pattern={"q_proj": 1 << 20}), "rank_too_high", 422),
    ("non-LoRA type", _with("ia3", peft_type="IA3"), "not_lora", 422),
    ("unknown target", _with("tgt", target_modules=["q_proj", "conv1"]), "unknown_target", 422),
    ("regex matching nothing", _with("rx", target_modules=".*conv.*"), "unknown_target", 422),
    ("DoRA", _with("dora", use_dora=True), "unsupported", 422),
    (
        "other base with strict_base",
        _with("other", base_model_name_or_path="someone/else-7b"),
        "base_mismatch",
        422,
    ),
]


@pytest.mark.parametrize(("case", "make", "reason", "status"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(
    roots: tuple[Path, Path],
    case: str,
    make: Callable[[Path, Path], tuple[str, str]],
    reason: str,
    status: int,
) -> None:
    adapter_dir, outside = roots
    registry = make_registry(adapter_dir, strict_base=True)
    good = registry.register("good", write_adapter(adapter_dir / "good"))
    name, path = make(adapter_dir, outside)
    with pytest.raises(AdapterRefusedError) as err:
        registry.register(name, path)
    assert err.value.reason == reason, str(err.value)
    assert err.value.status == status
    assert len(str(err.value)) > 20  # an actionable sentence, not a bare code
    assert not (outside / "pwned").exists()  # nothing was unpickled
    assert registry.get("good") == good  # other adapters keep serving
    assert registry.names() == ["good"]


def test_base_mismatch_only_warns_without_strict_base(roots: tuple[Path, Path]) -> None:
    adapter_dir, _ = roots
    registry = make_registry(adapter_dir, strict_base=False)
    source = registry.register(
        "other", write_adapter(adapter_dir / "other", base_model_name_or_path="x/y-7b")
    )
    assert source.base_model_name_or_path == "x/y-7b"


def test_base_matches_by_path_basename(roots: tuple[Path, Path]) -> None:
    adapter_dir, _ = roots
    registry = make_registry(adapter_dir, strict_base=True)
    registry.register("a", write_adapter(adapter_dir / "a", base_model_name_or_path=f"/elsewhere/{BASE}"))


def test_scan_skips_bad_folders(roots: tuple[Path, Path]) -> None:
    adapter_dir, outside = roots
    write_adapter(adapter_dir / "fine", r=8, rank_pattern={"v_proj": 12})
    write_adapter(adapter_dir / "bomb", r=999)
    _pickle_only(adapter_dir, outside)
    (adapter_dir / "bad name!").mkdir()
    registry = make_registry(adapter_dir)
    refused = registry.scan()
    assert sorted(e.reason for e in refused) == ["bad_name", "no_safetensors", "rank_too_high"]
    assert registry.names() == ["fine"]
    fine = registry.get("fine")
    assert fine is not None and fine.rank == 12 and len(fine.digest) == 64
    assert not (outside / "pwned").exists()


def test_discovery_on_first_use_and_unregister(roots: tuple[Path, Path]) -> None:
    adapter_dir, _ = roots
    registry = make_registry(adapter_dir)
    registry.scan()
    assert registry.get("late") is None
    write_adapter(adapter_dir / "late")
    late = registry.get("late")
    assert late is not None and registry.names() == ["late"]
    registry.unregister("late")
    assert registry.get("late") is None  # not rediscovered after an explicit unload
    with pytest.raises(AdapterRefusedError) as err:
        registry.unregister("late")
    assert err.value.status == 404
    assert registry.register("late", "late").digest == late.digest  # relative to adapter_dir


def test_changed_files_make_a_new_version(roots: tuple[Path, Path]) -> None:
    adapter_dir, _ = roots
    registry = make_registry(adapter_dir)
    v1 = registry.register("a", write_adapter(adapter_dir / "a", r=4))
    assert registry.register("a", adapter_dir / "a").digest == v1.digest
    v2 = registry.register("a", write_adapter(adapter_dir / "a", r=8))
    assert v2.digest != v1.digest and v2.rank == 8
    peeked = registry.peek("a")
    assert peeked is not None and peeked.digest == v2.digest
