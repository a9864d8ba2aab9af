"""The HTTP adapter: FastAPI routes that convert, delegate to `TeacherService`, and convert back.

Bodies are JSON unless the request's Content-Type is `application/x-protobuf`; answers are JSON
unless its Accept header asks for `application/x-protobuf`. Every `TeacherError` becomes its
status code with a JSON body `{"error": {"type", "message", "field"}}`, and so does anything
else a handler raises (500, logged once); a client that hangs up is no error at all.
The published OpenAPI document carries the request schemas of `protocol`.

`POST /admin/v1/weights` replaces the served weights (admin key only, see `auth`): a JSON body
`{"path": ..., "model_version": ...}` names a checkpoint on the teacher's machine, an
`application/octet-stream` body streams one safetensors file (`?model_version=N` optional).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect

from potstill.v1 import teacher_pb2 as pb
from teacher_service import wire
from teacher_service.auth import bearer_matches, require_admin_key, require_usable_keys
from teacher_service.errors import InvalidRequest, RequestTimeout, RequestTooLarge, TeacherError, Unauthenticated, unexpected
from teacher_service.openai_compat import OpenAICompat
from teacher_service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    LoadWeightsRequest,
    OpenAIRequest,
    ScoreRequest,
    WeightsVersion,
)
from teacher_service.service import TeacherService
from teacher_service.weights import receive_into_file, weight_files

PROTOBUF = "application/x-protobuf"
OCTET_STREAM = "application/octet-stream"
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
# What each POST route reads from its body, published in /openapi.json.
REQUEST_SCHEMAS = {
    "/v1/score": ScoreRequest,
    "/v1/generate": GenerateRequest,
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
IGNORED_FIELDS_HEADER = "X-Potstill-Ignored-Fields"
CLIENT_CLOSED = 499  # nginx's status for a request whose client hung up: counted, never sent

log = logging.getLogger("potstill.http")


def build_app(
    service: TeacherService,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_need_api_key: bool = False,
    docs_without_api_key: bool = False,
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS,
    admin_keys: Sequence[str] = (),
    max_weights_bytes: int = 64 * 2**30,
) -> FastAPI:
    require_usable_keys(api_keys)
    require_usable_keys(admin_keys)
    docs_open = not api_keys or docs_without_api_key
    # With a key, the schema is for callers holding it, and the browser page (which cannot send it) is off.
    app = FastAPI(
        title="Potstill teacher", version="1", openapi_url="/openapi.json" if docs_open else None,
        docs_url="/docs" if docs_open else None, redoc_url=None,
    )
    app.openapi = lambda: _openapi_with_request_schemas(app)
    app.state.service = service
    app.state.openai = OpenAICompat(service)
    app.state.max_body_bytes = max_body_bytes
    app.state.body_timeout_seconds = body_timeout_seconds
    app.state.max_weights_bytes = max_weights_bytes
    authenticated = [Depends(_require_api_key(tuple(api_keys)))]
    app.include_router(_open_routes)
    # Prometheus scrapes without credentials unless the operator asks otherwise.
    app.include_router(_metrics_routes, dependencies=authenticated if metrics_need_api_key else [])
    app.include_router(_model_routes, dependencies=authenticated)
    app.include_router(_admin_routes, dependencies=[Depends(_require_admin_key(tuple(admin_keys)))])
    if not docs_open:
        app.add_api_route("/openapi.json", lambda: JSONResponse(app.openapi()), include_in_schema=False, dependencies=authenticated)
    app.add_exception_handler(TeacherError, _teacher_error_response)

    @app.middleware("http")
    async def answer_every_error_and_record_metrics(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientDisconnect:  # nobody to answer; not worth a traceback either
            response = Response(status_code=CLIENT_CLOSED)
        except Exception as error:
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            response = await _teacher_error_response(request, unexpected(error))
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        service.metrics.requests.labels(endpoint, "http", str(response.status_code)).inc()
        service.metrics.request_seconds.labels(endpoint, "http").observe(time.perf_counter() - started)
        return response

    return app


async def _teacher_error_response(request: Request, error: TeacherError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.to_json(), status_code=error.http_status, headers=headers)


def _require_api_key(api_keys: tuple[str, ...]):
    async def check(request: Request) -> None:
        if api_keys and not bearer_matches(request.headers.get("authorization", ""), api_keys):
            raise Unauthenticated("missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check


def _require_admin_key(admin_keys: tuple[str, ...]):
    async def check(request: Request) -> None:
        require_admin_key(request.headers.get("authorization", ""), admin_keys)

    return check


def _openapi_with_request_schemas(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request body schema of each POST route (the routes read their
    bodies themselves, to accept protobuf too, so FastAPI cannot see them)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation") for model in REQUEST_SCHEMAS.values()], ref_template="#/components/schemas/{model}"
        )
        document.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        for path, model in REQUEST_SCHEMAS.items():
            document["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        app.openapi_schema = document
    return app.openapi_schema


# --- request and response conversion ---


async def _read_body(request: Request) -> bytes:
    limit = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"body of {declared} bytes exceeds the limit of {limit}", field="body")
    chunks, size = [], 0
    timeout = request.app.state.body_timeout_seconds
    try:
        async with asyncio.timeout(timeout):  # a client trickling its body must not hold a connection forever
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(f"body exceeds the limit of {limit} bytes", field="body")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout} s", field="body") from None
    return b"".join(chunks)


async def _idle_limited(request: Request):
    """The body's chunks; a pause longer than the body timeout between two of them is a 408."""
    chunks = request.stream().__aiter__()
    timeout = request.app.state.body_timeout_seconds
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(f"no bytes of the body arrived for {timeout} s", field="body") from None
        yield chunk


def _is_protobuf(header: str | None) -> bool:
    return header is not None and PROTOBUF in header


async def _request_data(request: Request, pb_type: type | None = None, to_data=None) -> Any:
    """Plain data from a JSON body, or from a protobuf body where the endpoint has a message for it."""
    body = await _read_body(request)
    if pb_type is not None and _is_protobuf(request.headers.get("content-type")):
        return to_data(wire.decode_request(pb_type, body))
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"malformed JSON: {error}", field="body") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise InvalidRequest("JSON nested too deeply", field="body") from None


def _answer(request: Request, as_json: Any, as_protobuf) -> Response:
    if _is_protobuf(request.headers.get("accept")):
        return Response(content=as_protobuf().SerializeToString(), media_type=PROTOBUF)
    return JSONResponse(as_json())


def _service(request: Request) -> TeacherService:
    return request.app.state.service


# --- routes ---

_open_routes = APIRouter()
_metrics_routes = APIRouter()
_model_routes = APIRouter()
_admin_routes = APIRouter(include_in_schema=False)


@_open_routes.get("/health")
@_open_routes.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded; 503 while loading and from SIGTERM on (draining)."""
    service = _service(request)
    if not service.ready:
        return JSONResponse({"status": "draining" if service.draining else "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


@_open_routes.get("/health/live")
async def live() -> JSONResponse:
    """200 whenever the server answers at all: loading or draining is not a reason to restart it."""
    return JSONResponse({"status": "alive"})


@_metrics_routes.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.exposition(), media_type="text/plain; version=0.0.4")


@_model_routes.get("/v1/model")
async def model_info(request: Request) -> Response:
    info = _service(request).model_info()
    return _answer(request, info.model_dump, lambda: wire.model_info_pb(info))


@_model_routes.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """OpenAI's model list, so tools that look up the model name first work."""
    service = _service(request)
    info = service.model_info()
    card = {"id": info.model, "object": "model", "created": service.created, "owned_by": "potstill", "root": info.model,
            "parent": None, "max_model_len": info.max_model_len, "permission": []}
    return JSONResponse({"object": "list", "data": [card]})


@_model_routes.post("/v1/score")
async def score(request: Request) -> Response:
    service = _service(request)
    data = await _request_data(request, pb.ScoreRequest, wire.score_request_data)
    result = await service.score(service.parse(ScoreRequest, data))
    return _answer(request, result.to_json, lambda: wire.score_response_pb(result))


@_model_routes.post("/v1/generate")
async def generate(request: Request) -> Response:
    service = _service(request)
    data = await _request_data(request, pb.GenerateRequest, wire.generate_request_data)
    result = await service.generate(service.parse(GenerateRequest, data))
    return _answer(request, result.to_json, lambda: wire.generate_response_pb(result))


@_model_routes.post("/v1/completions")
async def completions(request: Request) -> Response:
    parsed = _service(request).parse(CompletionRequest, await _request_data(request))
    openai = request.app.state.openai
    return await _openai_answer(parsed, openai.completions_stream if parsed.stream else openai.completions)


@_model_routes.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    parsed = _service(request).parse(ChatCompletionRequest, await _request_data(request))
    openai = request.app.state.openai
    return await _openai_answer(parsed, openai.chat_completions_stream if parsed.stream else openai.chat_completions)


async def _openai_answer(parsed: OpenAIRequest, answer) -> Response:
    """JSON, or server-sent events for `stream: true`; fields ignored as vLLM ignores them are named
    in a header (and logged), so a misspelt setting does not pass unnoticed."""
    ignored = parsed.ignored_fields
    headers = {}
    if ignored:
        # A JSON list (ASCII, escaped), cut short: the names are the caller's, of any length or number.
        shown = [name[:64] for name in ignored[:16]] + (["..."] if len(ignored) > 16 else [])
        headers[IGNORED_FIELDS_HEADER] = json.dumps(shown)
        log.warning("ignored unknown request fields: %s", headers[IGNORED_FIELDS_HEADER])
    result = await answer(parsed)
    if parsed.stream:
        return StreamingResponse(result, media_type="text/event-stream", headers=headers)
    return JSONResponse(result, headers=headers)


@_admin_routes.post("/admin/v1/weights")
async def load_weights(request: Request) -> JSONResponse:
    """New weights without a restart: a checkpoint path (JSON) or streamed safetensors bytes."""
    service = _service(request)
    if OCTET_STREAM not in (request.headers.get("content-type") or ""):
        parsed = service.parse(LoadWeightsRequest, await _request_data(request))
        files = await asyncio.to_thread(weight_files, parsed.path)
        return JSONResponse((await service.load_weights(files, parsed.model_version, "path")).to_json())
    version = _query_version(request, service)
    received = await receive_into_file(_idle_limited(request), request.app.state.max_weights_bytes)
    try:
        return JSONResponse((await service.load_weights([received], version, "body")).to_json())
    finally:
        received.unlink(missing_ok=True)


def _query_version(request: Request, service: TeacherService) -> int | None:
    raw = request.query_params.get("model_version")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"must be an integer, got {raw!r}", field="model_version") from None
    return service.parse(WeightsVersion, {"model_version": value}).model_version
