"""The API's side of structured outputs and tool calling: a request's grammar compiled on a worker pool
(never the event loop, never the engine thread) and attached to each of its ``GenerationRequest``s before
``engine.submit``; the base model's tool-call parser."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.api.constraints import function_specs, json_schema_spec, tool_call_grammar
from server.api.schemas import ChatCompletionRequest, GenerationFields
from server.engine.engine import AsyncEngine
from server.engine.types import GenerationRequest, InvalidRequestError
from server.runtime.tokenizer import HFTokenizer
from server.structured.grammar import GrammarCompiler, GrammarSpec
from server.structured.tool_parsers import ToolParser, ToolParserName, detect_tool_parser, tool_parser

COMPILE_WORKERS = 2


@dataclass(slots=True)
class OutputConstraints:
    """Grammar compilation for one base model (``compiler`` None: its tokenizer is not a Hugging Face fast
    tokenizer, and constrained requests are refused) and its tool-call parser. ``marker_ids``: the parser's
    markers that the tokenizer has as special tokens, by id: kept in the decoded reply of a request with
    tools (``skip_special_tokens`` would drop them, and the parser never see a call) and emitted as those
    tokens by a forced call's grammar."""

    compiler: GrammarCompiler | None
    parser: ToolParser
    pool: ThreadPoolExecutor
    marker_ids: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def for_engine(cls, engine: AsyncEngine, parser: ToolParserName | str = "auto") -> OutputConstraints:
        tokenizer = engine.runner.tokenizer
        compiler = None
        template = None
        if isinstance(tokenizer, HFTokenizer):
            template = getattr(tokenizer.hf, "chat_template", None)
            if tokenizer.hf.is_fast:
                compiler = GrammarCompiler(
                    tokenizer.hf,
                    vocab_size=engine.runner.vocab_size,
                    eos_token_ids=sorted(tokenizer.eos_token_ids),
                )
        name: ToolParserName = detect_tool_parser(template) if parser == "auto" else parser  # type: ignore[assignment]
        chosen = tool_parser(name)
        markers: dict[str, int] = {}
        if isinstance(tokenizer, HFTokenizer):
            ids = {marker: tokenizer.special_token_id(marker) for marker in chosen.markers}
            markers = {marker: i for marker, i in ids.items() if i is not None}
        pool = ThreadPoolExecutor(max_workers=COMPILE_WORKERS, thread_name_prefix="loraserve-grammar")
        return cls(compiler=compiler, parser=chosen, pool=pool, marker_ids=markers)

    def grammar_for(self, body: GenerationFields) -> tuple[GrammarSpec | None, list[GrammarSpec]]:
        """(the grammar the output must match, the tool parameter schemas to validate). Cheap, no compile."""
        spec = body.output_grammar()
        checks: list[GrammarSpec] = []
        if isinstance(body, ChatCompletionRequest) and body.uses_tools:
            functions = function_specs(body.tools or [])
            checks = [
                json_schema_spec(f.parameters, f"tools[{i}].function.parameters")
                for i, f in enumerate(functions)
            ]
            forced = tool_call_grammar(
                self.parser,
                functions,
                body.tool_choice or "auto",
                parallel=body.parallel_tool_calls is True,
                special=self.marker_ids,
            )
            spec = forced or spec
        return spec, checks

    async def attach(self, body: GenerationFields, requests: list[GenerationRequest]) -> None:
        """Compile the request's grammar (cached per grammar) off the event loop and give each choice its
        own matcher. Raises ``InvalidRequestError`` naming the field for a bad schema, regex or grammar."""
        spec, checks = self.grammar_for(body)
        if self.marker_ids and isinstance(body, ChatCompletionRequest) and body.uses_tools:
            keep = frozenset(self.marker_ids.values())
            for request in requests:  # the reply is parsed for calls: its marker tokens must reach the text
                request.sampling = dataclasses.replace(request.sampling, keep_special_token_ids=keep)
        if spec is None and not checks:
            return
        if spec is not None:
            refuse_early_stops(body)
        compiler = self.compiler
        if compiler is None:
            raise InvalidRequestError(
                "structured outputs need a fast (Rust) Hugging Face tokenizer, which this model lacks",
                param=spec.param if spec is not None else "tools",
            )

        def compile_all() -> None:
            for check in checks:
                compiler.compile(check)
            if spec is not None:
                for request in requests:
                    request.constraint = compiler.compile(spec)

        await asyncio.get_running_loop().run_in_executor(self.pool, compile_all)


def refuse_early_stops(body: GenerationFields) -> None:
    """A stop string or stop token would end a constrained output wherever it matched, mid-object too, and
    the answer would still say ``stop``: the promise that such an answer parses. The grammar decides where a
    constrained output ends (at its own end, or at ``max_tokens`` as ``length``), so the two are refused
    together."""
    if body.stop:
        raise InvalidRequestError(
            "stop cannot be combined with a structured output or a forced tool call: the grammar ends the output",
            param="stop",
        )
    if body.stop_token_ids:
        raise InvalidRequestError(
            "stop_token_ids cannot be combined with a structured output or a forced tool call: the grammar "
            "ends the output",
            param="stop_token_ids",
        )
