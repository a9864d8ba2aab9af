"""The gRPC adapter: `potstill.v1.Teacher` and `TeacherAdmin` over grpc.aio, plus the standard health and reflection services.

Servicer methods convert protobuf to plain data, delegate to `TeacherService`, and convert back;
a `TeacherError` aborts the call with its gRPC code, `field: message` as details and its kind in
the trailing metadata. Requests arrive as bytes and are parsed here, so a malformed message is
INVALID_ARGUMENT; anything unexpected is INTERNAL (logged once), and counted as such.
`TeacherAdmin` takes the admin keys only (PERMISSION_DENIED when the teacher has none).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.auth import bearer_matches, require_admin_key, require_usable_keys
from teacher_service.errors import InvalidRequest, TeacherError, Unauthenticated, unexpected
from teacher_service.protocol import GenerateRequest, ScoreRequest, WeightsVersion
from teacher_service.service import TeacherService
from teacher_service.weights import receive_into_file, weight_files

TEACHER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherAdmin"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20

log = logging.getLogger("potstill.grpc")


async def _abort(context: grpc.aio.ServicerContext, error: TeacherError) -> None:
    context.set_trailing_metadata(error.grpc_trailers())
    await context.abort(error.grpc_code, error.grpc_details())


def _rpc(endpoint: str, request_type: type | None):
    """Wrap a servicer method: the request parsed from bytes (a stream's messages are left to the
    method: `request_type` None), metrics, and every error turned into its status code (a server
    bug into INTERNAL)."""

    def decorate(method):
        @functools.wraps(method)
        async def handle(self, request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            outcome = "OK"
            try:
                return await method(self, wire.decode_request(request_type, request) if request_type else request, context)
            except TeacherError as error:
                outcome = error.grpc_code.name
                await _abort(context, error)
            except asyncio.CancelledError:  # the client hung up or its deadline passed
                outcome = grpc.StatusCode.CANCELLED.name
                raise
            except Exception as error:
                log.exception("unexpected error answering %s", endpoint)
                outcome = grpc.StatusCode.INTERNAL.name
                await _abort(context, unexpected(error))
            finally:
                metrics = self.service.metrics
                metrics.requests.labels(endpoint, "grpc", outcome).inc()
                metrics.request_seconds.labels(endpoint, "grpc").observe(time.perf_counter() - started)

        return handle

    return decorate


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    def __init__(self, service: TeacherService):
        self.service = service

    @_rpc("GetModelInfo", pb.ModelInfoRequest)
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        return wire.model_info_pb(self.service.model_info())

    @_rpc("Score", pb.ScoreRequest)
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        parsed = self.service.parse(ScoreRequest, wire.score_request_data(request))
        return wire.score_response_pb(await self.service.score(parsed))

    @_rpc("Generate", pb.GenerateRequest)
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        parsed = self.service.parse(GenerateRequest, wire.generate_request_data(request))
        return wire.generate_response_pb(await self.service.generate(parsed))


class AdminServicer:
    """`potstill.v1.TeacherAdmin`: weight pushes, by path (one message) or as streamed safetensors chunks."""

    def __init__(self, service: TeacherService, max_weights_bytes: int):
        self.service = service
        self.max_weights_bytes = max_weights_bytes

    @_rpc("LoadWeights", None)
    async def LoadWeights(self, request_stream, context) -> pb.LoadWeightsResponse:
        messages = (wire.decode_request(pb.LoadWeightsRequest, data) async for data in request_stream)
        first = await anext(messages, None)
        source = first.WhichOneof("source") if first is not None else None
        if source is None:
            raise InvalidRequest("the first message must set path or safetensors_chunk", field="source")
        version = self.service.parse(WeightsVersion, {"model_version": first.model_version or None}).model_version
        if source == "path":
            files = await asyncio.to_thread(weight_files, first.path)
            loaded = await self.service.load_weights(files, version, "path")
        else:
            received = await receive_into_file(_chunks(first, messages), self.max_weights_bytes)
            try:
                loaded = await self.service.load_weights([received], version, "body")
            finally:
                received.unlink(missing_ok=True)
        return pb.LoadWeightsResponse(model_version=loaded.model_version, tensors=loaded.tensors, seconds=loaded.seconds)


async def _chunks(first: pb.LoadWeightsRequest, messages):
    """The safetensors bytes of a LoadWeights stream, in order; every message must carry a chunk."""
    yield first.safetensors_chunk
    async for message in messages:
        if message.WhichOneof("source") != "safetensors_chunk":
            raise InvalidRequest("after a safetensors_chunk every message must carry one", field="source")
        yield message.safetensors_chunk


def _serialize(message) -> bytes:
    return message.SerializeToString()


# How each service's methods are called (reflection's one method streams both ways).
_HANDLER_KINDS = {TEACHER_SERVICE_NAME: grpc.unary_unary_rpc_method_handler, ADMIN_SERVICE_NAME: grpc.stream_unary_rpc_method_handler}


def _method_handlers(service_name: str, servicer) -> grpc.GenericRpcHandler:
    """A service's handlers taking raw bytes (no deserializer): `_rpc` (or the method) parses
    them, so garbage is the caller's INVALID_ARGUMENT rather than gRPC's own failure."""
    handler = _HANDLER_KINDS[service_name]
    methods = {
        name: handler(getattr(servicer, name), response_serializer=_serialize)
        for name in pb.DESCRIPTOR.services_by_name[service_name.rpartition(".")[2]].methods_by_name
    }
    return grpc.method_handlers_generic_handler(service_name, methods)


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <key>` metadata (the scheme in any case): an
    API key for the Teacher (when the teacher has any), an admin key for TeacherAdmin (always).

    Health checks stay open, so orchestrators can probe without the key; reflection too when
    `open_reflection` (the operator chose to publish the API) or when there are no API keys."""

    def __init__(self, api_keys: Sequence[str], admin_keys: Sequence[str] = (), open_reflection: bool = False):
        self._api_keys = tuple(api_keys)
        self._admin_keys = tuple(admin_keys)
        self._open = {HEALTH_SERVICE_NAME, *([reflection.SERVICE_NAME] if open_reflection else [])}

    async def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        try:
            if service == ADMIN_SERVICE_NAME:
                require_admin_key(sent, self._admin_keys)
            elif self._api_keys and service not in self._open and not bearer_matches(sent, self._api_keys):
                raise Unauthenticated("missing or wrong API key: send metadata 'authorization: Bearer <key>'")
        except TeacherError as error:
            return _refusal(error, _HANDLER_KINDS.get(service, grpc.stream_stream_rpc_method_handler))
        return await continuation(handler_call_details)


def _refusal(error: TeacherError, handler_kind) -> grpc.RpcMethodHandler:
    """A handler of the method's kind that only refuses."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        await _abort(context, error)

    return handler_kind(refuse)


class GrpcTeacherServer:
    """The gRPC server of one service: Teacher, health and reflection on one port."""

    def __init__(
        self, service: TeacherService, api_keys: Sequence[str] = (), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        open_reflection: bool = False, admin_keys: Sequence[str] = (), max_weights_bytes: int = 64 * 2**30,
    ):
        require_usable_keys(api_keys)
        require_usable_keys(admin_keys)
        self.server = grpc.aio.server(
            interceptors=[KeyInterceptor(api_keys, admin_keys, open_reflection)],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.server.add_generic_rpc_handlers((
            _method_handlers(TEACHER_SERVICE_NAME, TeacherServicer(service)),
            _method_handlers(ADMIN_SERVICE_NAME, AdminServicer(service, max_weights_bytes)),
        ))
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (TEACHER_SERVICE_NAME, ADMIN_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )

    def bind(self, host: str, port: int, tls: tuple[bytes, bytes] | None = None) -> int:
        """Listen on host:port (0 picks a free port), over TLS with `tls` = (PEM key, PEM certificate); returns the port."""
        if tls is None:
            return self.server.add_insecure_port(f"{host}:{port}")
        return self.server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls]))

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", TEACHER_SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls and let those in flight finish within `grace` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace)
