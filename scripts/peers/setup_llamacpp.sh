#!/usr/bin/env bash
# Create the virtual environment for the llama.cpp serving peer: llama-cpp-python with its OpenAI-compatible
# server, at <repo>/.venv-llamacpp (gitignored). The registry serves only
# its source, so pip compiles llama.cpp for this CPU (cmake and a C++ compiler; several minutes on 2 cores).
# Idempotent: re-running only installs what is missing.
#
# Usage: bash scripts/peers/setup_llamacpp.sh
# Env:   PYTHON=python3.11                  interpreter used to create the venv (default: python3)
#        LLAMA_CPP_VERSION=0.3.36           llama-cpp-python release (default: 0.3.36, the one tried here)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv-llamacpp"
PYTHON="${PYTHON:-python3}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
say() { printf '[setup_llamacpp] %s\n' "$*"; }

[ -x "$VENV/bin/python" ] || { say "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
if "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    say "llama-cpp-python already installed"
else
    say "building llama-cpp-python[server]==$VERSION from source"
    "$VENV/bin/python" -m pip install --disable-pip-version-check "llama-cpp-python[server]==$VERSION" openai
fi
"$VENV/bin/python" -c "import llama_cpp; print('[setup_llamacpp] llama-cpp-python', llama_cpp.__version__)"
