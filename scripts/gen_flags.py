"""Render the README's flag table from the CLI (``loraserve serve``'s parser and ``Settings``).

    python scripts/gen_flags.py            # print the table
    python scripts/gen_flags.py --write    # replace the table between the markers in README.md
    python scripts/gen_flags.py --check    # exit 1 when README.md's table is stale

The table sits between ``<!-- flags:begin -->`` and ``<!-- flags:end -->`` in README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"


def _serve_parser() -> argparse.ArgumentParser:
    sys.path.insert(0, str(ROOT))
    from server.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps sub-parsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            serve: argparse.ArgumentParser = action.choices["serve"]
            return serve
    raise RuntimeError("loraserve has no 'serve' command")


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def render_table() -> str:
    """One row per ``serve`` flag: flag, default, environment variable, meaning (choices included)."""
    from server.config import Settings

    rows = ["| flag | default | env | meaning |", "|---|---|---|---|"]
    for action in _serve_parser()._actions:
        if action.dest not in Settings.model_fields:
            continue
        field = Settings.model_fields[action.dest]
        flags = [s for s in action.option_strings if s.startswith("--")]
        flag = " / ".join(f"`{f}`" for f in flags)
        meaning = field.description or ""
        if action.choices:
            meaning += " — one of " + ", ".join(f"`{c}`" for c in action.choices)
        meaning = meaning.replace("|", "\\|")
        env = f"`LORASERVE_{action.dest.upper()}`"
        rows.append(f"| {flag} | {_default(field.default)} | {env} | {meaning} |")
    return "\n".join(rows)


def splice(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    head, sep, rest = readme.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update README.md in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    table = render_table()
    if not (args.write or args.check):
        print(table)
        return 0
    current = README.read_text()
    wanted = splice(current, table)
    if args.check:
        if current != wanted:
            print("README.md flag table is stale: run python scripts/gen_flags.py --write", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
