#!/usr/bin/env bash
# The Docker images' install (Dockerfile, Dockerfile.cuda), runnable outside Docker too (the packaging
# test runs it): a venv at $1 with swarm installed from this checkout (not editable, no test extras),
# the way scripts/install.sh installs it.
#   $2 = cpu:    torch's CPU build, through scripts/install-torch.sh (as scripts/install.sh does)
#   $2 = system: keep the interpreter's own torch (PyTorch's CUDA image): the venv sees its site-packages
# Then it checks that the install imports and that `swarm --help` runs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: install-image.sh <venv dir> cpu|system}
mode=${2:?usage: install-image.sh <venv dir> cpu|system}
PYTHON=${PYTHON:-python3}
case "$mode" in
  cpu) "$PYTHON" -m venv "$venv" ;;
  system) "$PYTHON" -c "import torch" && "$PYTHON" -m venv --system-site-packages "$venv" ;;
  *) echo "install-image.sh: the torch mode must be cpu or system, not '$mode'" >&2; exit 2 ;;
esac
if [ "$mode" = cpu ]; then
  scripts/install-torch.sh "$venv/bin/python"
fi
echo "==> installing swarm into $venv"
"$venv/bin/python" -m pip -q install .
"$venv/bin/python" -c "import swarm, torch, hivemind; print('swarm installed; torch', torch.__version__)"
"$venv/bin/swarm" --help >/dev/null
