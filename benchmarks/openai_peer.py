"""The side-by-side benchmark: the same workloads against any OpenAI-compatible server, loraserve and a peer
(vLLM's CPU build) in one run.

    # one workload against a running server
    python -m benchmarks.openai_peer closed --url http://127.0.0.1:8000 --models a1,a2 --streams 16 --out x.json
    python -m benchmarks.openai_peer chat --url http://127.0.0.1:8000 --model llama190m --out y.json

    # both servers, started and stopped here, interleaved (A, B, A), one JSON with the ratios
    python -m benchmarks.openai_peer compare --model-dir /work/scratch/peer/llama190m \\
        --server 'loraserve=loraserve:/work/main/.venv:--quantization none --dtype bfloat16' \\
        --server 'vllm=vllm:/work/scratch/peer/vllm-venv' --order loraserve,vllm,loraserve \\
        --rows adapters16,base16,adapter1,chat --out benchmarks/results/peer.json

The workloads are in ``benchmarks/openai_workloads.py``, the servers in ``benchmarks/peer_servers.py``, the
model in ``benchmarks/build_llama190m.py``. ``compare`` reports, per row and server, the median over that
server's passes and the ratio to ``--reference`` (tok/s: higher is better; ms: lower is better).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.openai_workloads import ChatLoad, ClosedLoad, run_chat, run_closed
from benchmarks.peer_servers import BASE_NAME, ModelDir, ServerSpec, start

# The headline figure(s) of each kind of row, for the table and the ratios.
CLOSED_FIGURES = ("output_tokens_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms")
CHAT_FIGURES = ("ttft_turn1_mean_ms", "ttft_later_turns_mean_ms")


@dataclass(slots=True, frozen=True)
class Row:
    """One row of the table: a workload with its models."""

    name: str
    load: ClosedLoad | ChatLoad


def rows_for(model: ModelDir, names: list[str], closed: ClosedLoad, chat: ChatLoad) -> list[Row]:
    """The rows of issue 13's table (``closed`` and ``chat`` give the durations, sizes and seed)."""
    adapters = tuple(model.adapters)
    known: dict[str, ClosedLoad | ChatLoad] = {
        "adapters16": replace(closed, models=adapters, streams=16),
        "base16": replace(closed, models=(BASE_NAME,), streams=16),
        "adapter1": replace(closed, models=adapters[:1], streams=1),
        "chat": replace(chat, model=BASE_NAME),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {sorted(known)}")
    return [Row(n, known[n]) for n in names]


async def run_row(url: str, row: Row) -> dict[str, Any]:
    if isinstance(row.load, ClosedLoad):
        return await run_closed(url, row.load)
    return await run_chat(url, row.load)


def machine() -> dict[str, Any]:
    model_name = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown"
    )
    flags = next((line for line in _cpuinfo() if line.startswith("flags")), "")
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "platform": platform.platform(),
        "note": "shared by other jobs: compare ratios within one run, not figures across runs",
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


# ------------------------------------------------------------------------------------------ compare


def compare(
    model: ModelDir,
    specs: list[ServerSpec],
    order: list[str],
    rows: dict[str, list[Row]],
    log_dir: Path,
    checkpoint: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Start each server of ``order`` in turn, run its ``rows`` against it, stop it; ``checkpoint`` gets
    the passes so far after each one, so that a run cut short keeps what it measured."""
    by_label = {s.label: s for s in specs}
    passes: list[dict[str, Any]] = []
    for index, label in enumerate(order):
        spec = by_label[label]
        checkout = spec.checkout()  # per pass: a checkout may move on between passes
        server = start(spec, model, log_dir)
        print(f"[{index + 1}/{len(order)}] {label} up in {server.startup_s} s at {server.url}", flush=True)
        results: dict[str, Any] = {}
        try:
            for row in rows[label]:
                load_before = os.getloadavg()[0]
                results[row.name] = asyncio.run(run_row(server.url, row))
                results[row.name]["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                print(f"  {row.name}: {_headline(results[row.name])}", flush=True)
        finally:
            code = server.stop()
        passes.append(
            {
                "server": label,
                "checkout": checkout,
                "command": server.command,
                "startup_s": server.startup_s,
                "exit_code": code,
                "rows": results,
            }
        )
        checkpoint(passes)
    return passes


def _headline(result: dict[str, Any]) -> str:
    names = CLOSED_FIGURES if "output_tokens_per_s" in result else CHAT_FIGURES
    return ", ".join(f"{n} {result.get(n)}" for n in names) + f", errors {result.get('errors')}"


def table(passes: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per row and server: the median of each headline figure over that server's passes, and its ratio to
    ``reference``'s; plus every pass's value, to show the noise."""
    out: dict[str, Any] = {}
    rows = {name for p in passes for name in p["rows"]}
    for row in sorted(rows):
        entry: dict[str, Any] = {}
        for p in passes:
            result = p["rows"].get(row)
            if result is None:
                continue
            figures = CLOSED_FIGURES if "output_tokens_per_s" in result else CHAT_FIGURES
            side = entry.setdefault(p["server"], {f: [] for f in figures})
            for f in figures:
                if result.get(f) is not None:
                    side[f].append(result[f])
        for side in entry.values():
            for f, values in list(side.items()):
                side[f] = {"median": statistics.median(values) if values else None, "passes": values}
        ref = entry.get(reference, {})
        for side in entry.values():
            for f, value in side.items():
                base = (ref.get(f) or {}).get("median")
                value["vs_reference"] = round(value["median"] / base, 3) if value["median"] and base else None
        out[row] = entry
    return out


# ------------------------------------------------------------------------------------------ command line


def _closed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=60.0, help="measured window (s)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds the streams run before the window")
    p.add_argument("--requests", type=int, default=None, help="instead of a window: requests per stream")
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def _chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--chat-max-tokens", type=int, default=64)
    p.add_argument("--chat-concurrency", type=int, default=8, help="conversations at a time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    closed = sub.add_parser("closed", help="N closed-loop streams of /v1/completions")
    closed.add_argument("--url", required=True)
    closed.add_argument("--models", required=True, help="comma-separated model ids, taken round-robin")
    closed.add_argument("--streams", type=int, default=16)
    closed.add_argument("--out", type=Path, required=True)
    _closed_options(closed)
    chat = sub.add_parser("chat", help="multi-turn chats over long per-tenant system prompts")
    chat.add_argument("--url", required=True)
    chat.add_argument("--model", required=True)
    chat.add_argument("--out", type=Path, required=True)
    _chat_options(chat)
    comp = sub.add_parser("compare", help="start each server in turn and run the rows against it")
    comp.add_argument("--model-dir", type=Path, required=True, help="what build_llama190m wrote")
    comp.add_argument(
        "--server",
        action="append",
        type=ServerSpec.parse,
        required=True,
        help="LABEL=loraserve|vllm:VENV[:FLAGS] (repeat)",
    )
    comp.add_argument("--order", required=True, help="comma-separated labels, e.g. A,B,A")
    comp.add_argument(
        "--reference", default=None, help="label the ratios divide by (default: the last kind vllm)"
    )
    comp.add_argument("--rows", default="adapters16,base16,adapter1,chat", help="rows run on every server")
    comp.add_argument(
        "--rows-for", action="append", default=[], help="LABEL=ROW,ROW: other rows for that server (repeat)"
    )
    comp.add_argument("--out", type=Path, required=True)
    comp.add_argument("--log-dir", type=Path, default=Path("/tmp/openai_peer_logs"))
    _closed_options(comp)
    _chat_options(comp)
    return parser


def _closed_load(args: argparse.Namespace, models: tuple[str, ...], streams: int) -> ClosedLoad:
    return ClosedLoad(
        models=models,
        streams=streams,
        duration_s=args.duration,
        warmup_s=args.warmup,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )


def _chat_load(args: argparse.Namespace, model: str) -> ChatLoad:
    return ChatLoad(
        model=model,
        tenants=args.tenants,
        turns=args.turns,
        system_tokens=args.system_tokens,
        max_tokens=args.chat_max_tokens,
        concurrency=args.chat_concurrency,
    )


def _write(out: Path, document: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if args.command == "closed":
        models = tuple(_names(args.models))
        result = asyncio.run(run_closed(args.url, _closed_load(args, models, args.streams)))
        _write(args.out, {"url": args.url, "started": stamp, "machine": machine(), **result})
        return 0 if result["errors"] == 0 else 1
    if args.command == "chat":
        result = asyncio.run(run_chat(args.url, _chat_load(args, args.model)))
        _write(args.out, {"url": args.url, "started": stamp, "machine": machine(), **result})
        return 0 if result["errors"] == 0 else 1
    model = ModelDir(args.model_dir)
    specs: list[ServerSpec] = args.server
    order = [label.strip() for label in args.order.split(",") if label.strip()]
    labels = {s.label for s in specs}
    if missing := [label for label in order if label not in labels]:
        raise SystemExit(f"--order names {missing}, which no --server defines")
    reference = args.reference or next((s.label for s in reversed(specs) if s.kind == "vllm"), order[0])
    closed_load, chat_load = _closed_load(args, (), 1), _chat_load(args, BASE_NAME)
    rows = {s.label: rows_for(model, _names(args.rows), closed_load, chat_load) for s in specs}
    for text in args.rows_for:
        label, _, names = text.partition("=")
        if label not in rows:
            raise SystemExit(f"--rows-for names {label!r}, which no --server defines")
        rows[label] = rows_for(model, _names(names), closed_load, chat_load)

    checkouts = {s.label: s.checkout() for s in specs}

    def document(passes: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "started": stamp,
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "model_dir": str(model.root),
            "adapters": list(model.adapters),
            "servers": {
                s.label: {
                    "kind": s.kind,
                    "venv": str(s.venv),
                    "flags": list(s.flags),
                    "env": dict(s.env),
                    "checkout_at_start": checkouts[s.label],
                }
                for s in specs
            },
            "order": order,
            "reference": reference,
            "table": table(passes, reference),
            "passes": passes,
        }

    passes = compare(model, specs, order, rows, args.log_dir, lambda p: _write(args.out, document(p)))
    errors = sum(r.get("errors", 0) for p in passes for r in p["rows"].values())
    return 0 if errors == 0 else 1


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


if __name__ == "__main__":
    sys.exit(main())
