"""`potstill serve`: one process, one model, HTTP and gRPC side by side.

Both servers start listening before the model loads (so /health answers 503 and the gRPC
health service NOT_SERVING meanwhile). SIGTERM or SIGINT stops accepting new requests, lets
the ones in flight finish within the grace period, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

import uvicorn

from teacher_service.backends import BACKENDS, load_backend
from teacher_service.backends.base import BackendConfig
from teacher_service.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, GrpcTeacherServer
from teacher_service.http_server import DEFAULT_MAX_BODY_BYTES, build_app
from teacher_service.protocol import Limits
from teacher_service.service import ServiceSettings, TeacherService

log = logging.getLogger("potstill.serve")


@dataclass(frozen=True)
class ServeOptions:
    model: str
    backend: str = "hf"
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0 picks a free port
    grpc_port: int = 50051  # 0 picks a free port
    device: str = "cpu"
    dtype: str = "float32"
    api_key: str | None = None
    max_model_len: int | None = None
    max_top_logprobs: int = Limits.max_top_logprobs
    max_samples: int = Limits.max_samples
    max_new_tokens: int = Limits.max_new_tokens
    max_batch: int = Limits.max_batch
    max_queued_requests: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 30.0


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
        self.grpc = GrpcTeacherServer(self.service, options.api_key, options.max_message_bytes)
        self._http_socket = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
        self._http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._http_socket.bind((options.host, options.http_port))
        self.http_port = self._http_socket.getsockname()[1]
        self.grpc_port = self.grpc.bind(options.host, options.grpc_port)
        app = build_app(self.service, options.api_key, options.max_body_bytes)
        config = uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=int(options.grace_seconds), lifespan="off"
        )
        self.http = _UvicornWithoutSignals(config)
        self._http_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Listen on both ports, then load the model; returns once it serves."""
        await self.grpc.start()
        self._http_task = asyncio.create_task(self.http.serve(sockets=[self._http_socket]))
        log.info("listening: http://%s:%d grpc://%s:%d", self.options.host, self.http_port, self.options.host, self.grpc_port)
        backend = await asyncio.to_thread(load_backend, self.options.backend, _matching(BackendConfig, self.options))
        self.service.attach(backend)
        await self.grpc.set_serving(True)
        log.info("serving %s with the %s backend", self.options.model, self.options.backend)

    async def stop(self) -> None:
        """Stop accepting requests; those in flight finish within the grace period."""
        self.http.should_exit = True
        await asyncio.gather(self.grpc.stop(self.options.grace_seconds), self._http_task or asyncio.sleep(0))
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
        print(f"potstill teacher ready: http://{options.host}:{server.http_port} grpc://{options.host}:{server.grpc_port}", flush=True)
        await stop.wait()
    log.info("shutting down")
    starting.cancel()
    await server.stop()
    if starting.done() and not starting.cancelled() and starting.exception() is not None:
        raise starting.exception()


class BackgroundTeacher:
    """A teacher server running in a thread of this process (tests, the demo, benchmarks).

    Real sockets and real servers; only the process is shared. Use as a context manager.
    """

    def __init__(self, options: ServeOptions):
        self.options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="potstill-teacher", daemon=True)
        self.server: TeacherServer | None = None

    def start(self) -> BackgroundTeacher:
        self._thread.start()
        self.server = self._call(self._create)
        self._call(self.server.start())
        return self

    async def _create(self) -> TeacherServer:
        return TeacherServer(self.options)

    def _call(self, coroutine):
        if not asyncio.iscoroutine(coroutine):
            coroutine = coroutine()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.options.host}:{self.server.grpc_port}"

    def stop(self) -> None:
        if self.server is not None:
            self._call(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BackgroundTeacher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TeacherProcess:
    """`potstill serve` in a child process on free loopback ports (the demo, benchmarks).

    `start` returns once the child prints its ready line; `stop` sends SIGTERM and waits.
    Use as a context manager so the child is stopped on any exit, Ctrl-C included.
    """

    READY = "potstill teacher ready: "

    def __init__(
        self, model: str, *extra_args: str, host: str = "127.0.0.1", threads: int | None = None, startup_timeout: float = 300.0
    ):
        self.command = [sys.executable, "-m", "potstill.cli", "serve", "--model", model, "--host", host,
                        "--http-port", "0", "--grpc-port", "0", *extra_args]
        # torch reads its CPU thread count from OMP_NUM_THREADS at start.
        self.environment = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.http_url = self.grpc_url = ""

    def start(self) -> TeacherProcess:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.environment
        )
        ready = _read_line_with_timeout(self.process, self.READY, self.startup_timeout)
        self.http_url, self.grpc_url = ready.removeprefix(self.READY).split()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> TeacherProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_line_with_timeout(process: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The child's first stdout line starting with `prefix`; RuntimeError if it exits or times out first."""
    found: list[str] = []

    def read() -> None:
        for line in process.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        process.kill()
        raise RuntimeError(f"teacher process did not become ready within {timeout:.0f} s (exit code {process.poll()})")
    return found[0]


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeOptions(model="")
    parser.add_argument("--model", required=True, help="path or hub id of a causal language model")
    parser.add_argument("--backend", default=defaults.backend, choices=sorted(BACKENDS))
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--http-port", type=int, default=defaults.http_port, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port, help="0 picks a free port")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--api-key-file", type=Path, help="file holding the API key clients must send as a Bearer token")
    parser.add_argument("--max-model-len", type=int, help="cap on prompt + completion tokens (default: the model's)")
    parser.add_argument("--max-top-logprobs", type=int, default=defaults.max_top_logprobs)
    parser.add_argument("--max-samples", type=int, default=defaults.max_samples, help="largest n per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="most sequences or prompts per request (clients split larger batches)")
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests,
                        help="requests admitted at once; more are refused with 429 / RESOURCE_EXHAUSTED")
    parser.add_argument("--grace-seconds", type=float, default=defaults.grace_seconds,
                        help="how long in-flight requests may take to finish on SIGTERM")


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key_file.read_text().strip() if args.api_key_file else None
    options = replace(_matching(ServeOptions, args), api_key=api_key)
    asyncio.run(serve_until_signalled(options))
    # Every request has been answered; skip the interpreter's teardown of torch and transformers
    # (seconds per process), so a stopped teacher frees its ports and its node at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
