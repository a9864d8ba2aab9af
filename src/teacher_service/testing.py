"""Teacher services on free loopback ports: real servers, for tests, benchmarks and the trainer's self-teacher.

`BackgroundTeacher` runs the HTTP and gRPC servers in a thread of the calling process (tests,
benchmarks); `TeacherProcess` runs `potstill serve` as a child process (the demo, benchmarks,
a self-teacher the trainer serves, tests of the process itself). Both stop what they started on every exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

from teacher_service.config import ServeOptions
from teacher_service.serve import TeacherServer


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
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

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
        self, model: str, *extra_args: str, host: str = "127.0.0.1", threads: int | None = None, startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ):
        """env: variables added to the child's environment (settings such as POTSTILL_ADMIN_KEYS, kept off the command line)."""
        self.command = [sys.executable, "-m", "potstill.cli", "serve", "--model", model, "--host", host,
                        "--http-port", "0", "--grpc-port", "0", *extra_args]
        # torch reads its CPU thread count from OMP_NUM_THREADS at start.
        threads_env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        self.environment = {**os.environ, **threads_env, **(env or {})} if threads_env or env else None
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
