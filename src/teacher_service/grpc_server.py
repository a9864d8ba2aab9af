"""The gRPC adapter: `potstill.v1.Teacher` over grpc.aio, plus the standard health and reflection services.

Servicer methods convert protobuf to plain data, delegate to `TeacherService`, and convert back;
a `TeacherError` aborts the call with its gRPC code and `field: message` as details.
"""

from __future__ import annotations

import functools
import secrets
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from teacher_service import wire
from teacher_service.errors import TeacherError, Unauthenticated
from teacher_service.protocol import GenerateRequest, ScoreRequest
from teacher_service.service import TeacherService

TEACHER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20


def _rpc(endpoint: str):
    """Wrap a servicer method: metrics, and `TeacherError` turned into its status code."""

    def decorate(method):
        @functools.wraps(method)
        async def handle(self: TeacherServicer, request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            outcome = "OK"
            try:
                return await method(self, request, context)
            except TeacherError as error:
                outcome = error.grpc_code.name
                await context.abort(error.grpc_code, error.grpc_details())
            finally:
                metrics = self.service.metrics
                metrics.requests.labels(endpoint, "grpc", outcome).inc()
                metrics.request_seconds.labels(endpoint, "grpc").observe(time.perf_counter() - started)

        return handle

    return decorate


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    def __init__(self, service: TeacherService):
        self.service = service

    @_rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        return wire.model_info_pb(self.service.model_info())

    @_rpc("Score")
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        parsed = self.service.parse(ScoreRequest, wire.score_request_data(request))
        return wire.score_response_pb(await self.service.score(parsed))

    @_rpc("Generate")
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        parsed = self.service.parse(GenerateRequest, wire.generate_request_data(request))
        return wire.generate_response_pb(await self.service.generate(parsed))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the Teacher service without `authorization: Bearer <key>` metadata.

    Health checks stay open, so orchestrators can probe without the key.
    """

    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(f"/{TEACHER_SERVICE_NAME}/"):
            return await continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if secrets.compare_digest(sent.encode(), self._expected):
            return await continuation(handler_call_details)
        return _refusal(Unauthenticated("missing or wrong API key: send metadata 'authorization: Bearer <key>'"))


def _refusal(error: TeacherError) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(error.grpc_code, error.grpc_details())

    return grpc.unary_unary_rpc_method_handler(refuse)


class GrpcTeacherServer:
    """The gRPC server of one service: Teacher, health and reflection on one port."""

    def __init__(self, service: TeacherService, api_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        teacher_pb2_grpc.add_TeacherServicer_to_server(TeacherServicer(service), self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (TEACHER_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
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
