#!/usr/bin/env bash
# Create the isolated virtual environment for the kvpress peer runner.
#
# kvpress (NVIDIA) pins transformers<5.3, while headwise's own venv runs on 5.x latest, so the peer lives in its
# own venv at <repo>/.venv-kvpress (gitignored). headwise supports transformers 5.2, so it is installed there too,
# editable and without its dependency list (which would pull another transformers), plus the light packages it
# imports: the runner shares headwise's benchmark protocol, runner, store and model loader instead of copying them.
# Idempotent: re-running only installs what is missing. torch is installed first, pinned to 2.13.0, whose CPU
# wheel lies on local disk; any other torch version would download a multi-GB CUDA build.
#
# Usage: bash scripts/peers/setup_kvpress.sh            (from anywhere)
# Env:   PYTHON=python3.11   interpreter used to create the venv (default: python3)
#        KVPRESS_VERSION=0.5.5   kvpress release to install (default: 0.5.5, the one tested)
#        TRANSFORMERS_SPEC='transformers>=5.2,<5.3'   transformers version kvpress supports
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv-kvpress"
PYTHON="${PYTHON:-python3}"
KVPRESS_VERSION="${KVPRESS_VERSION:-0.5.5}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers>=5.2,<5.3}"

say() { printf '[setup_kvpress] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
else
    say "venv exists: $VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    say "torch 2.13.0 already installed"
else
    say "installing torch==2.13.0 (CPU wheel from local disk)"
    "${PIP[@]}" "torch==2.13.0"
fi

# headwise's runtime imports besides torch and transformers (matplotlib only draws reports: not needed here)
HEADWISE_DEPS=("safetensors>=0.4" "gguf>=0.10" "accelerate>=1.0" "numpy>=1.26" "tqdm>=4.66")
say "installing kvpress==$KVPRESS_VERSION, $TRANSFORMERS_SPEC and headwise's light deps (torch held at 2.13.0)"
"${PIP[@]}" "torch==2.13.0" "kvpress==$KVPRESS_VERSION" "$TRANSFORMERS_SPEC" "${HEADWISE_DEPS[@]}"

if "$VENV/bin/python" -c "import headwise, sys; sys.exit(0 if headwise.__file__.startswith('$REPO/src/') else 1)" \
    2>/dev/null; then
    say "headwise already installed (editable, from $REPO/src)"
else
    say "installing headwise editable, no deps"
    "${PIP[@]}" --no-deps -e "$REPO"
fi

say "installed versions:"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version

for name in ("kvpress", "transformers", "torch", "headwise", "accelerate", "gguf", "safetensors"):
    print(f"  {name}=={version(name)}")
PY
say "done; run the peer with: $VENV/bin/python scripts/peers/kvpress_runner.py --help"
