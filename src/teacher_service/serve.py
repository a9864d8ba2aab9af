"""`potstill serve`: one process, one model, HTTP and gRPC side by side.

Both servers start listening before the model loads (so /health/ready answers 503 and the gRPC
health service NOT_SERVING meanwhile; /health/live answers 200 throughout). SIGTERM or SIGINT
turns readiness false at once, keeps answering for `drain_delay_seconds`, then stops accepting
new requests and lets the ones in flight finish within the grace period. Requests not answered
when it ends, those on the model included, are answered 503 / UNAVAILABLE (clients retry them
elsewhere) and the process exits without waiting for the pass under way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import fields
from pathlib import Path

import uvicorn

from potstill.devices import check_device
from potstill.flags import add_schema_arguments, settings_values
from potstill.logs import configure_logging
from potstill.usage import UsageError, check_model_source, one_line
from teacher_service.backends import load_backend
from teacher_service.backends.base import BackendConfig
from teacher_service.config import ENV_PREFIX, ServeOptions
from teacher_service.grpc_server import GrpcTeacherServer
from teacher_service.http_server import build_app
from teacher_service.service import ServiceSettings, TeacherService

log = logging.getLogger("potstill.serve")
# After the grace period: time for the 503s of abandoned requests to go out.
SHUTDOWN_ANSWER_SECONDS = 1.0


def _matching(settings_type, source):
    """`settings_type` built from the attributes of `source` that carry its field names."""
    names = [f.name for f in fields(settings_type) if hasattr(source, f.name)]
    return settings_type(**{name: getattr(source, name) for name in names})


class _UvicornWithoutSignals(uvicorn.Server):
    """Uvicorn leaves signals to us: one handler stops both servers together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class TeacherServer:
    """The HTTP and gRPC servers around one `TeacherService`, in the running event loop."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.service = TeacherService(_matching(ServiceSettings, options))
        self.grpc = GrpcTeacherServer(
            self.service, options.api_keys, options.max_message_bytes, open_reflection=options.docs_without_api_key,
            admin_keys=options.admin_keys, max_weights_bytes=options.max_weights_bytes,
        )
        # Made with IPPROTO_TCP so asyncio sets TCP_NODELAY on every accepted connection (it checks
        # the protocol); with protocol 0 small answers wait ~40 ms for the client's delayed ACK.
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self._http_socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._http_socket.bind((options.host, options.http_port))
        self.http_port = self._http_socket.getsockname()[1]
        tls = (Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes()) if options.tls else None
        self.grpc_port = self.grpc.bind(options.host, options.grpc_port, tls)
        app = build_app(
            self.service, options.api_keys, options.max_body_bytes, options.metrics_need_api_key,
            options.docs_without_api_key, options.body_timeout_seconds, options.admin_keys, options.max_weights_bytes,
        )
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", limit_concurrency=options.max_connections,
            # Past grace, unanswered requests are answered 503 by `stop`, within this second.
            timeout_graceful_shutdown=options.grace_seconds + SHUTDOWN_ANSWER_SECONDS,
            ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key,
        )
        self.http = _UvicornWithoutSignals(config)
        self._http_task: asyncio.Task | None = None

    @property
    def http_url(self) -> str:
        return f"{'https' if self.options.tls else 'http'}://{self.options.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.options.tls else 'grpc'}://{self.options.host}:{self.grpc_port}"

    async def start(self) -> None:
        """Listen on both ports, then load the model; returns once it serves."""
        await self.grpc.start()
        self._http_task = asyncio.create_task(self.http.serve(sockets=[self._http_socket]))
        log.info("listening: %s %s", self.http_url, self.grpc_url)
        try:
            backend = await asyncio.to_thread(load_backend, self.options.backend, _matching(BackendConfig, self.options))
        except OSError as error:  # transformers: no such model on the hub or on disk
            raise UsageError(f"--model {self.options.model}: {one_line(error)[:300]}") from None
        self.service.attach(backend)
        await self.grpc.set_serving(True)
        log.info("serving %s with the %s backend", self.options.model, self.options.backend)

    async def stop(self) -> None:
        """Report not ready, keep answering for the drain delay, then stop accepting requests;
        those in flight finish within the grace period."""
        self.service.begin_drain()
        await self.grpc.set_serving(False)
        await asyncio.sleep(self.options.drain_delay_seconds)
        self.http.should_exit = True
        grace = self.options.grace_seconds
        stopping = [asyncio.create_task(self.grpc.stop(grace + SHUTDOWN_ANSWER_SECONDS)), self._http_task or asyncio.create_task(asyncio.sleep(0))]
        await asyncio.wait(stopping, timeout=grace)
        self.service.abandon_queued()
        await asyncio.gather(*stopping)
        await asyncio.to_thread(self.service.close)


async def serve_until_signalled(options: ServeOptions) -> None:
    server = TeacherServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.create_task(server.start())
    await asyncio.wait([starting, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is None:
        print(f"potstill teacher ready: {server.http_url} {server.grpc_url}", flush=True)
        await stop.wait()
    log.info("shutting down")
    starting.cancel()
    await server.stop()
    if starting.done() and not starting.cancelled() and starting.exception() is not None:
        raise starting.exception()


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of settings (keys as the flags); environment variables and flags override it")
    add_schema_arguments(parser, ServeOptions, skip={"api_keys", "admin_keys"}, env_prefix=ENV_PREFIX)


def main(args: argparse.Namespace) -> None:
    options = ServeOptions(**settings_values(args, ServeOptions, args.config, ENV_PREFIX)).with_api_keys()
    configure_logging(options.log_format)
    options = options.model_copy(update={"device": check_device(options.device)})
    check_model_source("--model", options.model)
    asyncio.run(serve_until_signalled(options))
    # Every request has been answered; skip the interpreter's teardown of torch and transformers
    # (seconds per process), so a stopped teacher frees its ports and its node at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
