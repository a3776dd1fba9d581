"""The OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` (and
``/v1/models/{id}``), and vLLM's ``/tokenize`` and ``/detokenize``.

``model`` names the base (``engine.model_id``) or an adapter. A model the tenant may not use answers
exactly like one that does not exist (404 ``model_not_found``), whether it is another tenant's adapter
or the base for a tenant with ``allow_base: false``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from server.api.auth import Tenant, TenantDep
from server.api.errors import ApiError
from server.api.output_constraints import OutputConstraints
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationFields,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    parse_request,
)
from server.api.streaming import (
    ChatFormat,
    Choice,
    CompletionFormat,
    Generation,
    LogprobStyle,
    ResponseFormat,
    await_first_event,
    collect,
    sse_events,
)
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import EngineError, FinishReason, GenerationRequest, InvalidRequestError

router = APIRouter(prefix="/v1", tags=["openai"])
tokenizer_router = APIRouter(tags=["vllm"])

OWNED_BY = "loraserve"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; never reaches anyone


def get_engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


def _json_body(schema: type[BaseModel]) -> dict[str, Any]:
    # The body is read and validated by hand (strict JSON, see schemas.parse_json); this only documents it,
    # with pydantic's local $defs inlined so that the OpenAPI document stays self-consistent.
    document = schema.model_json_schema()
    defs = document.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(document)}}}}


class _Checked(Protocol):
    def check_supported(self, max_model_len: int) -> None: ...


RequestT = TypeVar("RequestT", bound=BaseModel)


async def read_request(request: Request, schema: type[RequestT], max_model_len: int) -> RequestT:
    """Body -> validated request, or a 400 naming the param. The body limit is enforced while the body
    streams in (BodyLimitMiddleware)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
    with _as_api_error():
        body = parse_request(bytes(raw), schema)
        checked: _Checked = body  # type: ignore[assignment]
        checked.check_supported(max_model_len)
    return body


@contextmanager
def _as_api_error() -> Iterator[None]:
    # Bad input found before submit() is the API's own rejection: an ApiError is counted as one; the
    # engine counts what submit() raises.
    try:
        yield
    except InvalidRequestError as exc:
        raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from None


async def resolve_model(model: str, tenant: Tenant, engine: AsyncEngine) -> str | None:
    """The adapter ``model`` names (None for the base); 404 if it is unknown or not the tenant's. The
    first request for a newly dropped-in adapter folder validates and hashes its weights: on a worker
    thread, never on the event loop."""
    if model == engine.model_id:
        if tenant.allow_base:
            return None
    elif tenant.may_use_adapter(model) and await asyncio.to_thread(engine.has_adapter, model):
        return model
    raise ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def _generate(
    request: Request,
    engine: EngineDep,
    tenant: Tenant,
    body: GenerationFields,
    requests: list[GenerationRequest],
    response_id: str,
    fmt: ResponseFormat,
    *,
    echo_prompts: list[str | list[int]] | None = None,
) -> Response:
    # GenerationRequests (one per choice) -> engine -> TokenEvents -> response; submit raises before any token.
    token_stream = await engine.add_requests(requests)  # the engine counts its own refusals
    n = body.n_choices
    choices = []
    for index, (request_id, prompt_ids) in enumerate(
        zip(token_stream.request_ids, token_stream.prompt_token_ids, strict=True)
    ):
        prompt_text = ""
        if echo_prompts is not None:
            prompt = echo_prompts[index // n]
            prompt_text = prompt if isinstance(prompt, str) else engine.detokenize(prompt)
        choices.append(
            Choice(
                index=index,
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                counts_prompt=index % n == 0,
                prompt_text=prompt_text,
            )
        )
    g = Generation(
        request_id=response_id,
        model=body.model,
        adapter=requests[0].adapter,
        tenant=tenant.name,
        choices=choices,
    )
    headers = {"X-Request-Id": g.request_id}
    if body.stream:
        # headers go out with the first event, so a failure before any token is a real HTTP status
        if not await await_first_event(request, engine, token_stream, g):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        first = await token_stream.peek()
        if first.finish_reason is FinishReason.ERROR and not first.token_ids:
            for request_id in token_stream.request_ids:
                engine.abort(request_id, "error")
            g.absorb(first)
            g.log_finished()
            raise first.error or EngineError("generation failed")
        settings: Settings = request.app.state.settings
        return EventSourceResponse(
            sse_events(
                engine,
                token_stream,
                g,
                fmt,
                include_usage=body.include_usage,
                continuous_usage=body.continuous_usage,
            ),
            headers=headers,
            sep="\n",
            # On shutdown sse-starlette cancels open streams; give them the drain time to finish first.
            shutdown_grace_period=settings.shutdown_timeout + 1.0,
        )
    try:
        if not await collect(request, engine, token_stream, g):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        g.log_finished()
    if g.error is not None:
        raise g.error
    return JSONResponse(fmt.response(g).model_dump(mode="json"), headers=headers)


def _constraints(request: Request) -> OutputConstraints:
    constraints: OutputConstraints = request.app.state.output_constraints
    return constraints


def _style(engine: AsyncEngine, body: GenerationFields) -> LogprobStyle:
    return LogprobStyle(
        token_text=lambda token_id: engine.token_texts([token_id])[0],
        as_token_ids=bool(body.return_tokens_as_token_ids),
    )


@router.post(
    "/completions",
    response_model=None,
    summary="Create a completion (OpenAI CreateCompletion)",
    openapi_extra=_json_body(CompletionRequest),
)
async def create_completion(request: Request, tenant: TenantDep, engine: EngineDep) -> Response:
    body = await read_request(request, CompletionRequest, engine.max_model_len)
    adapter = await resolve_model(body.model, tenant, engine)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    with _as_api_error():
        # CompletionRequest -> GenerationRequests (one per choice)
        requests = body.to_generation_requests(response_id, adapter=adapter, tenant=tenant.name)
        await _constraints(request).attach(body, requests)  # compiled off the event loop
    fmt = CompletionFormat(
        logprobs=body.logprobs,
        echo=bool(body.echo),
        style=_style(engine, body),
        prompt_logprobs=body.prompt_logprobs is not None,
    )
    echo = body.prompts() if body.echo else None
    return await _generate(request, engine, tenant, body, requests, response_id, fmt, echo_prompts=echo)


@router.post(
    "/chat/completions",
    response_model=None,
    summary="Create a chat completion (OpenAI CreateChatCompletion)",
    openapi_extra=_json_body(ChatCompletionRequest),
)
async def create_chat_completion(request: Request, tenant: TenantDep, engine: EngineDep) -> Response:
    body = await read_request(request, ChatCompletionRequest, engine.max_model_len)
    adapter = await resolve_model(body.model, tenant, engine)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    with _as_api_error():
        # ChatCompletionRequest -> GenerationRequests (one per choice)
        requests = body.to_generation_requests(response_id, adapter=adapter, tenant=tenant.name)
        constraints = _constraints(request)
        await constraints.attach(body, requests)  # compiled off the event loop
    fmt = ChatFormat(
        logprobs=bool(body.logprobs),
        style=_style(engine, body),
        prompt_logprobs=body.prompt_logprobs is not None,
        tool_parser=constraints.parser if body.uses_tools else None,
        forced_tool_call=body.forces_tool_call,
    )
    return await _generate(request, engine, tenant, body, requests, response_id, fmt)


def _model_cards(request: Request, tenant: Tenant, engine: AsyncEngine) -> list[ModelCard]:
    created: int = request.app.state.started_at
    base = engine.model_id
    cards = []
    if tenant.allow_base:
        cards.append(
            ModelCard(
                id=base, created=created, owned_by=OWNED_BY, root=base, max_model_len=engine.max_model_len
            )
        )
    for name in sorted(engine.adapter_names()):
        if tenant.may_use_adapter(name):
            cards.append(
                ModelCard(
                    id=name,
                    created=created,
                    owned_by=OWNED_BY,
                    root=name,
                    parent=base,
                    max_model_len=engine.max_model_len,
                )
            )
    return cards


@router.get("/models", summary="The base model and the adapters the caller may use")
async def list_models(request: Request, tenant: TenantDep, engine: EngineDep) -> ModelList:
    return ModelList(data=_model_cards(request, tenant, engine))


@router.get("/models/{model_id:path}", summary="One model the caller may use (404 otherwise)")
async def retrieve_model(model_id: str, request: Request, tenant: TenantDep, engine: EngineDep) -> ModelCard:
    await resolve_model(model_id, tenant, engine)  # 404 exactly as for generation
    return next(card for card in _model_cards(request, tenant, engine) if card.id == model_id)


# ------------------------------------------------------------------------------------ vLLM tokenizer


@tokenizer_router.post(
    "/tokenize",
    response_model=None,
    summary="Token ids of a prompt or a conversation (vLLM); model = an adapter or the base",
    openapi_extra=_json_body(TokenizeRequest),
)
async def tokenize(request: Request, tenant: TenantDep, engine: EngineDep) -> TokenizeResponse:
    body = await read_request(request, TokenizeRequest, engine.max_model_len)
    await resolve_model(body.model, tenant, engine)  # every adapter shares the base's tokenizer
    with _as_api_error():
        if body.messages is not None:
            ids = engine.tokenize_chat([m.to_chat_message() for m in body.messages])
        else:
            ids = engine.tokenize(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=engine.max_model_len,
        tokens=ids,
        token_strs=engine.token_texts(ids) if body.return_token_strs else None,
    )


@tokenizer_router.post(
    "/detokenize",
    response_model=None,
    summary="Text of token ids (vLLM); model = an adapter or the base",
    openapi_extra=_json_body(DetokenizeRequest),
)
async def detokenize(request: Request, tenant: TenantDep, engine: EngineDep) -> DetokenizeResponse:
    body = await read_request(request, DetokenizeRequest, engine.max_model_len)
    await resolve_model(body.model, tenant, engine)
    with _as_api_error():
        text = engine.detokenize(body.tokens)
    return DetokenizeResponse(prompt=text)
