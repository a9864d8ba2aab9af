#!/usr/bin/env bash
# Regenerates the Python modules of proto/ into src/potstill/v1 (committed, so installs need no protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src proto/potstill/v1/teacher.proto
