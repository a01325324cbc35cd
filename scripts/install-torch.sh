#!/usr/bin/env bash
# Installs torch's CPU build into the Python given as $1 (a venv's python), unless it already imports
# torch: from a CPU wheel already on disk (pip's find-links) if there is one, else from the official
# CPU index (otherwise pip resolves torch to a multi-GB CUDA build). Shared by scripts/install.sh
# and the Docker images' deploy/install-image.sh.
set -euo pipefail
python=${1:?usage: install-torch.sh <python>}
TORCH_VERSION=${SWARM_TORCH_VERSION:-2.13.0}
if "$python" -c "import torch" 2>/dev/null; then
  exit 0
fi
echo "==> installing torch $TORCH_VERSION (CPU build)"
pip=("$python" -m pip -q)
if "${pip[@]}" download --no-index --no-deps "torch==$TORCH_VERSION" -d "$(mktemp -d)" >/dev/null 2>&1; then
  "${pip[@]}" install "torch==$TORCH_VERSION"
else
  "${pip[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
