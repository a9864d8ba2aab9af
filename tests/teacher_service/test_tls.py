"""TLS on both transports: a teacher serving HTTPS and gRPC over TLS with a certificate made on
the spot, reached by the real clients given the CA, refused by clients that do not trust it."""

from __future__ import annotations

import asyncio
import datetime
import json
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.teachers import TeacherClientError, connect_client

SCORE = {"sequences": [{"prompt": [1, 2, 3], "completion": [4, 5]}], "top_logprobs": 3}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it, as PEM files."""
    root = tmp_path_factory.mktemp("tls")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("potstill test CA", ca_key, "potstill test CA", ca_key, ca=True)
    server = _certificate("localhost", server_key, "potstill test CA", ca_key, ca=False)
    files = {
        "ca": (root / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "cert": (root / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
        "key": (root / "server.key", server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {name: str(path) for name, (path, _) in files.items()}


@pytest.fixture(scope="module")
def tls_teacher(tiny_model_dir, certificates):
    options = ServeOptions(model=tiny_model_dir, http_port=0, grpc_port=0, tls_cert=certificates["cert"], tls_key=certificates["key"])
    with BackgroundTeacher(options) as teacher:
        yield teacher


def score_over(url: str, ca_file: str | None):
    async def call():
        client = connect_client(url, ca_file=ca_file, timeout=10)
        try:
            return await client.score(SCORE)
        finally:
            await client.close()

    return asyncio.run(call())


def test_both_transports_answer_over_tls_to_clients_that_trust_the_ca(tls_teacher, certificates):
    assert tls_teacher.http_url.startswith("https://") and tls_teacher.grpc_url.startswith("grpcs://")
    over_grpc = score_over(tls_teacher.grpc_url, certificates["ca"])
    over_https = score_over(tls_teacher.http_url, certificates["ca"])
    assert over_grpc.results[0].top_ids.tolist() == over_https.results[0].top_ids.tolist()
    assert httpx.get(tls_teacher.http_url + "/health", verify=ssl.create_default_context(cafile=certificates["ca"])).json() == {"status": "ok"}


def test_clients_without_the_ca_and_plain_connections_are_refused(tls_teacher):
    for url in (tls_teacher.grpc_url, tls_teacher.http_url):
        with pytest.raises(TeacherClientError):
            score_over(url, ca_file=None)  # the system's roots do not include the test CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_teacher.http_url.replace("https://", "http://") + "/health", timeout=5)


def test_query_reaches_a_tls_teacher_with_a_ca_file(tls_teacher, certificates):
    command = [sys.executable, "-m", "potstill.cli", "query", tls_teacher.grpc_url, "info", "--ca-file", certificates["ca"]]
    answer = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0 and "vocab_size" in answer.stdout, answer.stderr


def test_a_certificate_without_its_key_is_refused(tiny_model_dir, certificates):
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        ServeOptions(model=tiny_model_dir, tls_cert=certificates["cert"])


def test_a_training_run_reaches_tls_teachers_with_its_ca_file(tls_teacher, certificates, tiny_model_dir, tmp_path):
    from potstill.toy.arithmetic import make_rows, write_jsonl
    from trainer_client.config import TrainConfig
    from trainer_client.trainer import train

    data = str(write_jsonl(make_rows(16, seed=0), tmp_path / "train.jsonl"))
    config = TrainConfig(student=tiny_model_dir, data=data, output=str(tmp_path / "run"), method="logit-kd", steps=2,
                         batch_size=2, top_k=3, teachers=[tls_teacher.grpc_url, tls_teacher.http_url],
                         teacher_ca_file=certificates["ca"], teacher_max_wait=5)
    train(config, progress=False)
    traffic = json.loads((tmp_path / "run" / "teacher_traffic.json").read_text())
    assert sorted(url.split("://")[0] for url in traffic) == ["grpcs", "https"]
    assert all(endpoint["requests"] > 0 for endpoint in traffic.values())
