"""Render the README's generated tables: every ``loraserve serve`` flag (from the CLI parser and
``Settings``), the flags ``serve-ray`` adds (``ScaleSettings``), and every metric (``server.metrics``).

    python scripts/gen_flags.py            # print both tables
    python scripts/gen_flags.py --write    # replace them between their markers in README.md
    python scripts/gen_flags.py --check    # exit 1 when README.md is stale

The tables sit between ``<!-- flags:begin -->`` / ``<!-- flags:end -->``, ``<!-- ray-flags:begin -->`` /
``<!-- ray-flags:end -->`` and ``<!-- metrics:begin -->`` / ``<!-- metrics:end -->`` in README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FLAGS, RAY_FLAGS, METRICS = "flags", "ray-flags", "metrics"


def _serve_parser(command: str = "serve") -> argparse.ArgumentParser:
    sys.path.insert(0, str(ROOT))
    from server.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps sub-parsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            serve: argparse.ArgumentParser = action.choices[command]
            return serve
    raise RuntimeError(f"loraserve has no {command!r} command")


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def render_table(command: str = "serve") -> str:
    """One row per flag of ``command``'s own settings (``serve``: ``Settings``; ``serve-ray``: the
    ``ScaleSettings`` it adds to them): flag, default, environment variable, meaning (choices included)."""
    from server.config import ScaleSettings, Settings

    model = ScaleSettings if command == "serve-ray" else Settings
    rows = ["| flag | default | env | meaning |", "|---|---|---|---|"]
    for action in _serve_parser(command)._actions:
        if action.dest not in model.model_fields:
            continue
        field = model.model_fields[action.dest]
        flags = [s for s in action.option_strings if s.startswith("--")]
        flag = " / ".join(f"`{f}`" for f in flags)
        meaning = field.description or ""
        if action.choices:
            meaning += " — one of " + ", ".join(f"`{c}`" for c in action.choices)
        meaning = meaning.replace("|", "\\|")
        env = f"`LORASERVE_{action.dest.upper()}`"
        rows.append(f"| {flag} | {_default(field.default)} | {env} | {meaning} |")
    return "\n".join(rows)


def render_metrics() -> str:
    """One row per metric as Prometheus exposes it: name, type, labels, help text."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from server.metrics import IngressMetrics, Metrics

    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    every = [*vars(Metrics(CollectorRegistry())).values(), *vars(IngressMetrics()).values()]
    for metric in every:
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = metric._type  # prometheus_client keeps name, type and labels only as these attributes
        name = f"`{metric._name}`"
        if kind == "counter":
            name = f"`{metric._name}_total`"
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)
        rows.append(f"| {name} | {kind} | {labels} | {metric._documentation} |")
    return "\n".join(rows)


def splice(readme: str, section: str, table: str) -> str:
    """``readme`` with the text between ``section``'s markers replaced by ``table``."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    head, sep, rest = readme.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise SystemExit(f"README.md lacks the markers {begin} ... {end}")
    return f"{head}{begin}\n{table}\n{end}{tail}"


def render_readme(readme: str) -> str:
    """``readme`` with both generated tables brought up to date."""
    readme = splice(readme, FLAGS, render_table())
    readme = splice(readme, RAY_FLAGS, render_table("serve-ray"))
    return splice(readme, METRICS, render_metrics())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update README.md in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(render_table(), render_table("serve-ray"), render_metrics(), sep="\n\n")
        return 0
    current = README.read_text()
    wanted = render_readme(current)
    if args.check:
        if current != wanted:
            print("README.md tables are stale: run python scripts/gen_flags.py --write", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
