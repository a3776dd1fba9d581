"""CPU the engine thread burns while every request waits on a slow adapter load (issue 14's busy spin).

Builds the demo engine in-process with a deliberately slow adapter reader (``read_adapter`` sleeps
``--load-seconds`` first), then per round: ``--requests`` requests naming an adapter that is not resident,
all of which wait on that one load. Reports, over the load window (first submit -> the reader returns), the
engine thread's CPU seconds and how many passes its loop made; and the same over an idle window of the same
length with nothing submitted. The CPU time comes from ``/proc/self/task/<tid>/stat`` and the passes from a
counter around ``AsyncEngine._iterate``, so the script measures any version of the engine, including the one
before the fix (commit 9639928's parent), which had neither ``LoopStats`` nor a wake-up::

    python -m benchmarks.idle_cpu --label after --out after.json
    PYTHONPATH=/path/to/old/worktree python benchmarks/idle_cpu.py --label before --out before.json
    python -m benchmarks.idle_cpu --merge before.json after.json --out benchmarks/results/idle_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENGINE_THREAD = "loraserve-engine"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Window:
    """What the engine thread did over one window of wall time."""

    kind: str  # "idle" or "slow_load"
    adapter: str | None
    wall_s: float
    cpu_s: float
    passes: int
    tokens: int = 0  # output tokens of the requests that waited (all of them must finish)
    finished: int = 0


def thread_cpu_s(tid: int) -> float:
    """utime + stime of one thread of this process, in seconds (clock-tick resolution)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces; fields after it are fixed
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def engine_tid() -> int:
    for thread in threading.enumerate():
        if thread.name == ENGINE_THREAD and thread.native_id is not None:
            return thread.native_id
    raise RuntimeError(f"no {ENGINE_THREAD!r} thread: was the engine started?")


class PassCounter:
    """Counts the engine loop's passes by wrapping the instance's ``_iterate``."""

    def __init__(self, engine: Any) -> None:
        self.passes = 0
        inner: Callable[..., Any] = engine._iterate

        def counted(*args: Any) -> Any:
            self.passes += 1
            return inner(*args)

        engine._iterate = counted


class SlowReader:
    """``adapter_store.store.read_adapter`` that sleeps first, and notes the engine thread's CPU time and
    passes at the moment the read returns (the end of the load window)."""

    def __init__(self, seconds: float, counter: PassCounter) -> None:
        import adapter_store.store as store_module

        self.seconds = seconds
        self.counter = counter
        self.done: tuple[float, float, int] | None = None  # (monotonic, engine cpu s, passes)
        self._done_event = threading.Event()
        inner = store_module.read_adapter

        def slow_read(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self.seconds)
            loaded = inner(*args, **kwargs)
            if self.done is None:
                self.done = (time.monotonic(), thread_cpu_s(engine_tid()), self.counter.passes)
                self._done_event.set()
            return loaded

        store_module.read_adapter = slow_read

    def arm(self) -> None:
        self.done = None
        self._done_event.clear()


async def idle_window(seconds: float, counter: PassCounter) -> Window:
    tid = engine_tid()
    t0, cpu0, passes0 = time.monotonic(), thread_cpu_s(tid), counter.passes
    await asyncio.sleep(seconds)
    return Window("idle", None, time.monotonic() - t0, thread_cpu_s(tid) - cpu0, counter.passes - passes0)


async def load_window(
    engine: Any, reader: SlowReader, counter: PassCounter, adapter: str, requests: int, max_tokens: int
) -> Window:
    from server.engine.types import GenerationRequest, SamplingParams

    reader.arm()
    tid = engine_tid()
    t0, cpu0, passes0 = time.monotonic(), thread_cpu_s(tid), counter.passes
    streams = [
        engine.submit(
            GenerationRequest(
                request_id=uuid.uuid4().hex,
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                prompt=f"The cat number {i}",
                adapter=adapter,
            )
        )
        for i in range(requests)
    ]
    tokens = finished = 0
    for stream in streams:
        async for event in stream:
            tokens += len(event.token_ids)
            if event.finish_reason is not None:
                finished += 1
    if reader.done is None:
        raise RuntimeError(f"adapter {adapter!r} was already resident: no slow load happened")
    t1, cpu1, passes1 = reader.done
    return Window("slow_load", adapter, t1 - t0, cpu1 - cpu0, passes1 - passes0, tokens, finished)


async def measure(
    engine: Any, reader: SlowReader, counter: PassCounter, args: argparse.Namespace
) -> list[Window]:
    windows: list[Window] = []
    for adapter in engine.adapter_names():  # each demo adapter's first use is one slow load
        windows.append(await idle_window(args.load_seconds, counter))
        windows.append(await load_window(engine, reader, counter, adapter, args.requests, args.max_tokens))
    return windows


def code_version() -> dict[str, str]:
    """Which tree's ``server`` package ran (the before run puts an old worktree on PYTHONPATH)."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {"tree": str(root), "commit": commit}


def summarize(label: str, windows: list[Window], args: argparse.Namespace) -> dict[str, Any]:
    def median(kind: str, key: str) -> float:
        return statistics.median(getattr(w, key) for w in windows if w.kind == kind)

    return {
        "label": label,
        "code": code_version(),
        "load_seconds": args.load_seconds,
        "requests_waiting": args.requests,
        "median": {
            kind: {
                "cpu_s": round(median(kind, "cpu_s"), 3),
                "passes": int(median(kind, "passes")),
                "cpu_share_of_wall": round(median(kind, "cpu_s") / median(kind, "wall_s"), 4),
            }
            for kind in ("idle", "slow_load")
        },
        "windows": [asdict(w) for w in windows],
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def merge(paths: list[Path]) -> dict[str, Any]:
    runs = {(r := json.loads(p.read_text()))["label"]: r for p in paths}
    result: dict[str, Any] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cpus, shared with other jobs",
        "runs": runs,
    }
    if {"before", "after"} <= runs.keys():
        before, after = runs["before"]["median"]["slow_load"], runs["after"]["median"]["slow_load"]
        result["slow_load_before_over_after"] = {
            "cpu_s": round(before["cpu_s"] / max(after["cpu_s"], 1.0 / CLOCK_TICKS), 1),
            "passes": round(before["passes"] / max(after["passes"], 1), 1),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", default="after", help="name of this run in the JSON (before/after)")
    parser.add_argument("--load-seconds", type=float, default=5.0, help="how long each adapter read sleeps")
    parser.add_argument("--requests", type=int, default=8, help="requests waiting on each load")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="combine earlier runs' JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.merge:
        result = merge(args.merge)
    else:
        from server.bootstrap import build_engine
        from server.config import Settings

        settings = Settings(device="cpu", max_num_seqs=max(args.requests, 1), max_model_len=256)
        engine, store = build_engine(settings)
        counter = PassCounter(engine)
        reader = SlowReader(args.load_seconds, counter)
        engine.start()
        try:
            windows = asyncio.run(measure(engine, reader, counter, args))
        finally:
            engine.stop()
            store.close()
        result = summarize(args.label, windows, args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
