"""Pushing new weights to a teacher service: its admin endpoint over HTTP or its admin RPC over gRPC.

    pusher = WeightPusher("grpc://127.0.0.1:50051", admin_key)   # nothing to close: a connection per push
    version = await pusher.push_tensors(model_state, model_version=11)   # streamed safetensors
    version = await pusher.push_path("/shared/run/step-10")              # a path the teacher can read

Tensors travel as safetensors bytes (never pickle): one HTTP body, or gRPC messages of
`CHUNK_BYTES` each. Failures are the teacher clients' two errors (`TeacherUnavailable`,
`TeacherRequestError` with the server's field), classified the same way.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import ssl
from pathlib import Path

import grpc
import httpx
import torch
from safetensors.torch import save

from potstill.v1 import teacher_pb2 as pb
from potstill.v1 import teacher_pb2_grpc
from trainer_client.teachers import TeacherUnavailable, _grpc_error, _http_error

CHUNK_BYTES = 2 * 2**20  # per gRPC message: under gRPC's default 4 MiB limit, whatever the server's setting


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """One safetensors file of `tensors` (contiguous CPU copies), as bytes."""
    return save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()})


class WeightPusher:
    """The admin side of one teacher endpoint (http(s):// or grpc(s)://), with its admin key."""

    def __init__(self, url: str, admin_key: str, timeout: float = 600.0, ca_file: str | None = None):
        """ca_file: PEM roots for grpcs:// and https:// (default: the system's)."""
        self.url = url
        self.timeout = timeout
        self.ca_file = ca_file
        self._grpc = urlsplit(url).scheme in ("grpc", "grpcs")
        self._authorization = f"Bearer {admin_key}"

    async def push_tensors(self, tensors: dict[str, torch.Tensor], model_version: int | None = None) -> int:
        """Stream `tensors` as one safetensors file; returns the version the teacher now serves."""
        data = safetensors_bytes(tensors)
        if self._grpc:
            chunks = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
            first = [pb.LoadWeightsRequest(safetensors_chunk=chunks[0], model_version=model_version or 0)]
            return await self._load(first + [pb.LoadWeightsRequest(safetensors_chunk=chunk) for chunk in chunks[1:]])
        params = {"model_version": model_version} if model_version else None
        return await self._post(content=data, params=params, headers={"Content-Type": "application/octet-stream"})

    async def push_path(self, path: str, model_version: int | None = None) -> int:
        """Load the checkpoint at `path` (on the teacher's machine); returns the version now served."""
        if self._grpc:
            return await self._load([pb.LoadWeightsRequest(path=path, model_version=model_version or 0)])
        return await self._post(json={"path": path, **({"model_version": model_version} if model_version else {})})

    async def _post(self, **request) -> int:
        headers = {"Authorization": self._authorization, **request.pop("headers", {})}
        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        async with httpx.AsyncClient(base_url=self.url.rstrip("/"), timeout=self.timeout, verify=verify) as client:
            try:
                response = await client.post("/admin/v1/weights", headers=headers, **request)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
                raise TeacherUnavailable(f"{type(error).__name__}: {error or 'no answer'}", url=self.url) from None
        if response.status_code >= 400:
            raise _http_error(self.url, response)
        return int(response.json()["model_version"])

    async def _load(self, messages: list[pb.LoadWeightsRequest]) -> int:
        # A channel per push: pushes are rare, and nothing is left open between them.
        target = urlsplit(self.url).netloc
        if self.url.startswith("grpcs"):
            roots = Path(self.ca_file).read_bytes() if self.ca_file else None
            channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
        else:
            channel = grpc.aio.insecure_channel(target)
        async with channel:
            admin = teacher_pb2_grpc.TeacherAdminStub(channel)
            try:
                answer = await admin.LoadWeights(iter(messages), timeout=self.timeout, metadata=(("authorization", self._authorization),))
            except grpc.aio.AioRpcError as error:
                raise _grpc_error(self.url, error) from None
        return answer.model_version
