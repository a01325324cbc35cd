#!/usr/bin/env bash
# Runs the whole test suite. pytest's exit 5 ("no tests collected") is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit $rc
