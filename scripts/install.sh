#!/usr/bin/env bash
# Creates .venv and installs swarm into it: torch from its CPU wheel first (otherwise pip resolves
# torch to a multi-GB CUDA build), then the project and its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! command -v tmux >/dev/null 2>&1; then
  # the e2e test of `swarm status` runs it in a real terminal (tmux); best effort: root with apt only
  echo "==> installing tmux (for the terminal test of swarm status)"
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q tmux >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tmux >/dev/null 2>&1; } \
      || echo "    could not install tmux; install it yourself to run tests/e2e/test_monitoring_cli.py" >&2
  else
    echo "    not root or no apt-get: install tmux yourself to run tests/e2e/test_monitoring_cli.py" >&2
  fi
fi
# The NAT tests (tests/e2e/test_nat.py, benchmarks/nat.py) build home routers with nftables' `nft`
if ! command -v nft >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "==> installing nftables (for the NAT tests in network namespaces)"
    apt-get install -y -q nftables >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nftables >/dev/null 2>&1; } \
      || echo "    could not install nftables; tests/e2e/test_nat.py will skip" >&2
  else
    echo "    not root or no apt-get: tests/e2e/test_nat.py skips (it needs root and nftables)" >&2
  fi
fi
# The dashboard's browser test drives Debian's chromium through selenium with Debian's chromedriver
# (no browser download at test time). Checked on every run: it is cheap, and apt is not pip's stamp.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing chromium and chromedriver (for the dashboard's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "==> warning: chromium and chromedriver are missing; the dashboard's browser test needs them" \
         "(as root: apt-get install chromium chromium-driver)" >&2
  fi
fi
stamp=.venv/.swarm-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
echo "==> creating .venv with $($PYTHON --version)"
"$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip -q)
"${pip[@]}" install --upgrade pip >/dev/null
# torch's CPU build first (a wheel on disk, else the official CPU index); the Docker images share this step
scripts/install-torch.sh .venv/bin/python
echo "==> installing swarm and its dependencies"
"${pip[@]}" install -e ".[test]"
touch "$stamp"
echo "==> ready: .venv/bin/swarm"
