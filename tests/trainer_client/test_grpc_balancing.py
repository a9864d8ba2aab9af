"""One gRPC teacher URL whose name resolves to several pods (a headless Service) spreads its
requests over all of them: a real DNS server on loopback answers two addresses for one name,
a real teacher listens on each, and both see traffic from one client."""

from __future__ import annotations

import asyncio
import socket

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.teachers import GrpcTeacherClient

NAME = "teachers.potstill.test"
ADDRESSES = ("127.0.0.1", "127.0.0.2")  # both loopback


class TwoPods(BaseResolver):
    """A headless Service's DNS: the name resolves to every pod's address."""

    def resolve(self, request, handler):
        reply = request.reply()
        if request.q.qtype == QTYPE.A and str(request.q.qname).rstrip(".") == NAME:
            for address in ADDRESSES:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=5))
        return reply


@pytest.fixture
def dns_server():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = DNSServer(TwoPods(), port=port, address="127.0.0.1", logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    yield f"127.0.0.1:{port}"
    server.stop()


def grpc_requests_answered(teacher: BackgroundTeacher) -> float:
    samples = teacher.server.service.metrics.requests.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_total") and s.labels["transport"] == "grpc")


def test_one_url_spreads_requests_over_every_resolved_address(tiny_model_dir, dns_server):
    first = BackgroundTeacher(ServeOptions(model=tiny_model_dir, host=ADDRESSES[0], http_port=0, grpc_port=0)).start()
    try:
        port = first.server.grpc_port
        with BackgroundTeacher(ServeOptions(model=tiny_model_dir, host=ADDRESSES[1], http_port=0, grpc_port=port)) as second:

            async def score_many() -> None:
                client = GrpcTeacherClient(f"grpc://{NAME}:{port}", dns_server=dns_server, timeout=10)
                try:
                    for _ in range(20):
                        await client.score({"sequences": [{"prompt": [1, 2], "completion": [3]}], "top_logprobs": 2})
                finally:
                    await client.close()

            asyncio.run(score_many())
            counts = [grpc_requests_answered(first), grpc_requests_answered(second)]
    finally:
        first.stop()
    assert sum(counts) == 20
    assert min(counts) >= 3, f"requests per pod: {counts}"
