"""``loraserve`` command line: ``serve`` (default), ``serve-ray`` and ``build-demo``.

Flags come from ``Settings`` field by field, so ``--help``, the environment (``LORASERVE_*``) and the README
table can never disagree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, get_args, get_origin

import uvicorn
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from server.config import ScaleSettings, Settings
from server.engine.engine import AsyncEngine

log = logging.getLogger("loraserve")

# Attributes every LogRecord has, and uvicorn's ANSI-coloured copy of its message: not ``extra`` fields.
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of a log call. Underscored attributes are other libraries' bookkeeping (Ray's
    record factory adds ``_ray_timestamp_ns`` to every record once it is imported), not ours."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the ``extra`` fields of the call (request id, tenant, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class KeyValueFormatter(logging.Formatter):
    """Readable lines that still carry the ``extra`` fields as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        message = record.getMessage()
        pairs = [f"{k}={v}" for k, v in extra_fields(record).items()]
        pairs = [p for p in pairs if p not in message]  # a message may already spell its fields out
        return " ".join([line, *pairs])


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # library warnings become log lines (JSON with --log-json)


# ---------------------------------------------------------------------------------------- arguments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseSettings] = Settings) -> None:
    """One flag per field of ``model``; unset flags fall back to the environment, then the default."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        default = field.default
        help_text = f"{field.description} (default: {default}; env LORASERVE_{name.upper()})".replace(
            "%", "%%"
        )
        if annotation is bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        choices = None
        if get_origin(annotation) is not None and all(isinstance(a, str) for a in get_args(annotation)):
            choices = list(get_args(annotation))
        parser.add_argument(
            _flag(name), dest=name, default=None, choices=choices, metavar=name.upper(), help=help_text
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def scale_settings_from_args(args: argparse.Namespace) -> ScaleSettings:
    given = {k: v for k, v in vars(args).items() if k in ScaleSettings.model_fields and v is not None}
    return ScaleSettings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-tenant LoRA inference server")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the OpenAI API (default: the embedded demo bundle)")
    add_settings_arguments(serve)
    serve_ray = sub.add_parser(
        "serve-ray",
        help="serve the same API from N engine replicas on Ray Serve, routed by adapter affinity "
        "(needs the [ray] extra)",
    )
    add_settings_arguments(serve_ray, ScaleSettings)
    add_settings_arguments(serve_ray)
    demo = sub.add_parser("build-demo", help="build the embedded demo bundle into DIR")
    demo.add_argument("dir", type=Path)
    return parser


# ---------------------------------------------------------------------------------------- serve


def serve(settings: Settings) -> int:
    from server.bootstrap import build_server

    started = time.monotonic()
    server_parts = build_server(settings)
    engine, app = server_parts.engine, server_parts.app
    engine.start()
    log.info("ready in %.1f s: http://%s:%d", time.monotonic() - started, settings.host, settings.port)

    # log_config=None: uvicorn's own loggers (startup, access lines) go through our handler and formatter,
    # so --log-json gives JSON lines for them too.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        lifespan="on",
    )
    server = DrainingServer(config, engine=engine, shutdown_timeout=settings.shutdown_timeout)
    try:
        server.run()
    finally:
        engine.stop()
        server_parts.close()
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop admitting (503 from ``submit`` and ``/ready``), let running requests finish
    for up to ``shutdown_timeout`` seconds, abort the rest (finish_reason ``abort``), then let uvicorn close
    the connections and exit 0. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, *, engine: AsyncEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._shutdown_timeout = shutdown_timeout
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None:
            super().handle_exit(sig, frame)
            return
        log.warning("%s: draining for up to %.0f s", signal.Signals(sig).name, self._shutdown_timeout)
        self._draining = asyncio.get_event_loop().create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        await self._engine.drain(self._shutdown_timeout)
        await asyncio.sleep(0.1)  # let the last events reach their streams
        # not super().handle_exit: uvicorn would re-raise the captured signal at exit (status -15);
        # a drained shutdown is a clean one
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    if args.command == "build-demo":
        logging.basicConfig(level=logging.INFO)
        from server.runtime.demo import build_demo

        bundle = build_demo(args.dir)
        print(
            f"demo bundle written to {bundle.root}: base at {bundle.base}, adapters {', '.join(bundle.adapter_names)}"
        )
        return 0
    try:
        settings = settings_from_args(args)
        scale = scale_settings_from_args(args) if args.command == "serve-ray" else None
    except ValidationError as exc:
        parser.error(str(exc))
    configure_logging(settings)
    from server.runtime.loader import ModelLoadError

    try:
        if scale is not None:
            try:
                import ray.serve  # noqa: F401

                from server.scale.launch import serve_ray
            except ImportError as exc:
                parser.error(f"serve-ray needs Ray Serve: pip install 'loraserve[ray]' ({exc})")
            return serve_ray(settings, scale)
        return serve(settings)
    except ModelLoadError as exc:  # a base this server cannot serve: say why, no traceback
        print(f"loraserve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
