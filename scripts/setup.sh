#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with Potstill and everything its
# tests need. Torch comes first and pinned, so the CPU build is used where no GPU is wanted
# (set TORCH_SPEC, e.g. TORCH_SPEC="torch" on a CUDA node, to choose another build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[${POTSTILL_EXTRAS:-dev}]"
