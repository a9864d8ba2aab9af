#!/usr/bin/env bash
# Installs Potstill for one image role into the Python environment of $PYTHON (default: python3),
# from the repo root. The Dockerfiles run it, and CI runs it in fresh virtual environments, so a
# broken install step fails CI although no image is built there.
#
#   deploy/docker/install.sh teacher-cpu   # HTTP + gRPC teacher, transformers backend, CPU torch
#   deploy/docker/install.sh teacher-gpu   # the same plus the vLLM backend (CUDA torch, via vllm's pins)
#   deploy/docker/install.sh trainer       # the student trainer (torch as TORCH_SPEC says)
#
# TORCH_SPEC chooses the torch build first (empty: let the extras pull it); TORCH_INDEX_URL, when
# set, is where it comes from (the CPU images set the PyTorch CPU index).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
case "${1:-}" in
  teacher-cpu) extras=serve ;;
  teacher-gpu) extras=serve,vllm ;;
  trainer) extras=train ;;
  *) echo "usage: $0 teacher-cpu|teacher-gpu|trainer" >&2; exit 2 ;;
esac
pip=("$python" -m pip install --no-cache-dir --quiet)
if [ -n "${TORCH_SPEC:-}" ]; then
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
"${pip[@]}" ".[$extras]"
"$python" -m potstill.cli --help >/dev/null  # the entry point imports
