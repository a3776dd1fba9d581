"""The OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

``model`` names the base (``engine.model_id``) or an adapter. A model the tenant may not use answers
exactly like one that does not exist (404 ``model_not_found``), whether it is another tenant's adapter
or the base for a tenant with ``allow_base: false``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.api.auth import Tenant, TenantDep
from server.api.errors import ApiError
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    ModelCard,
    ModelList,
    parse_request,
)
from server.api.streaming import (
    ChatFormat,
    CompletionFormat,
    Generation,
    ResponseFormat,
    await_first_event,
    collect,
    sse_events,
)
from server.config import Settings
from server.engine.engine import AsyncEngine
from server.engine.types import EngineError, FinishReason, GenerationRequest, InvalidRequestError

router = APIRouter(prefix="/v1", tags=["openai"])

OWNED_BY = "loraserve"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; never reaches anyone


def get_engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


def _json_body(schema: type[GenerationFields]) -> dict[str, Any]:
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


RequestT = TypeVar("RequestT", bound=GenerationFields)


async def read_request(request: Request, schema: type[RequestT], max_model_len: int) -> RequestT:
    """Body -> validated request, or a 400 naming the param. The body limit is enforced while the body
    streams in (BodyLimitMiddleware)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
    with _as_api_error():
        body = parse_request(bytes(raw), schema)
        body.check_supported(max_model_len)
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
    engine: AsyncEngine,
    tenant: Tenant,
    body: GenerationFields,
    generation_request: GenerationRequest,
    fmt: ResponseFormat,
) -> Response:
    # GenerationRequest -> engine -> TokenEvents -> response; submit() raises before any token.
    token_stream = await engine.add_request(generation_request)
    g = Generation(
        request_id=generation_request.request_id,
        model=body.model,
        adapter=generation_request.adapter,
        tenant=tenant.name,
        prompt_tokens=token_stream.prompt_tokens,
    )
    headers = {"X-Request-Id": g.request_id}
    if body.stream:
        # headers go out with the first event, so a failure before any token is a real HTTP status
        if not await await_first_event(request, engine, token_stream, g):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        first = await token_stream.peek()
        if first.finish_reason is FinishReason.ERROR and not first.token_ids:
            g.absorb(first)
            g.log_finished()
            raise first.error or EngineError("generation failed")
        settings: Settings = request.app.state.settings
        return EventSourceResponse(
            sse_events(engine, token_stream, g, fmt, include_usage=body.include_usage),
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


@router.post(
    "/completions",
    response_model=None,
    summary="Create a completion (OpenAI CreateCompletion)",
    openapi_extra=_json_body(CompletionRequest),
)
async def create_completion(request: Request, tenant: TenantDep, engine: EngineDep) -> Response:
    body = await read_request(request, CompletionRequest, engine.max_model_len)
    adapter = await resolve_model(body.model, tenant, engine)
    with _as_api_error():
        # CompletionRequest -> GenerationRequest
        generation_request = body.to_generation_request(
            f"cmpl-{uuid.uuid4().hex}", adapter=adapter, tenant=tenant.name
        )
    return await _generate(request, engine, tenant, body, generation_request, CompletionFormat())


@router.post(
    "/chat/completions",
    response_model=None,
    summary="Create a chat completion (OpenAI CreateChatCompletion)",
    openapi_extra=_json_body(ChatCompletionRequest),
)
async def create_chat_completion(request: Request, tenant: TenantDep, engine: EngineDep) -> Response:
    body = await read_request(request, ChatCompletionRequest, engine.max_model_len)
    adapter = await resolve_model(body.model, tenant, engine)
    with _as_api_error():
        # ChatCompletionRequest -> GenerationRequest
        generation_request = body.to_generation_request(
            f"chatcmpl-{uuid.uuid4().hex}",
            adapter=adapter,
            tenant=tenant.name,
            max_model_len=engine.max_model_len,
        )
    return await _generate(request, engine, tenant, body, generation_request, ChatFormat())


@router.get("/models", summary="The base model and the adapters the caller may use")
async def list_models(request: Request, tenant: TenantDep, engine: EngineDep) -> ModelList:
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
    return ModelList(data=cards)
