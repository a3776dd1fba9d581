"""README.md stays true: its flag and metric tables match the code, and its set-up section holds exactly the
two commands (the second being the one CI runs)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"


def _gen_flags() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_flags", ROOT / "scripts" / "gen_flags.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_flags = _gen_flags()


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


@pytest.mark.parametrize(
    ("section", "render", "args"),
    [
        ("flags", "render_table", ()),
        ("ray-flags", "render_table", ("serve-ray",)),
        ("metrics", "render_metrics", ()),
    ],
)
def test_generated_table_is_current(section: str, render: str, args: tuple[str, ...]) -> None:
    readme = README.read_text()
    table = getattr(gen_flags, render)(*args)
    assert gen_flags.splice(readme, section, table) == readme, (
        f"the README's {section} table is stale: run python scripts/gen_flags.py --write"
    )


def test_every_serve_flag_is_in_the_table() -> None:
    from server.config import Settings

    table = gen_flags.render_table()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in table, name


def test_splice_refuses_a_readme_without_markers() -> None:
    with pytest.raises(SystemExit, match="markers"):
        gen_flags.splice("# no tables here\n", "flags", "| a |")


def test_setup_has_exactly_two_commands_and_the_second_is_ci() -> None:
    readme = README.read_text()
    blocks = re.findall(r"^```\n(.*?)\n```", _section(readme, "Set up"), re.M | re.S)
    assert len(blocks) == 2, blocks
    ci = re.search(r"<!-- ci:test-command -->\n```\n(.*?)\n```\n<!-- /ci:test-command -->", readme, re.S)
    assert ci is not None, "the ci:test-command markers are gone"
    assert blocks[1] == ci.group(1)
    assert "loraserve serve" in blocks[0]


def test_every_vllm_metric_the_readme_names_is_exported() -> None:
    """Prose outside the generated table (the mapping notes, scaling out) names only metrics that exist:
    a family, or a prefix of families (``vllm:prefix_cache_*``), of ``server.metrics``."""
    table = gen_flags.render_metrics()
    exported = set(re.findall(r"^\| `(vllm:[\w:]+)`", table, re.M))
    exported |= {name.removesuffix("_total") for name in exported}
    named = set(re.findall(r"`(vllm:[\w:]+\*?)", README.read_text()))
    assert named, "the README names no vllm metric"
    for name in named:
        if name.endswith("*"):
            assert any(e.startswith(name.rstrip("*")) for e in exported), name
        else:
            assert name in exported, name
