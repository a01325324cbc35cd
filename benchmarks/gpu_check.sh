#!/usr/bin/env bash
# The GPU check, in one go (at most 8 minutes), on a machine with one NVIDIA GPU, torch and transformers,
# and no network:
#   1. installs swarm's other dependencies from the wheel files it is handed (benchmarks/gpu_wheels.sh
#      downloads them on a machine with pip's registry; see benchmarks/README.md);
#   2. runs the tests marked gpu;
#   3. trains a Llama-style 16 layers x 1024 model (batch 8 x 512) locally and through 2 peers sharing the
#      GPU, in bfloat16, and generates with it the same two ways;
#   4. prints swarm/local for training (target >= 0.8) and for decode (target >= 0.5), and the overhead
#      of a hop in ms.
#
#     benchmarks/gpu_check.sh --wheels .whl          # on the GPU machine
#     benchmarks/gpu_check.sh --cpu-smoke            # here, on the CPU: every step, a tiny model, no install
#
# Each step's full output is kept under --logs (default: $OUT when set, else a new temporary folder).
# Exit status: 0 when every step ran (a figure below its target is reported, not failed: it is a
# measurement), 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels=.whl
smoke=0
logs=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --cpu-smoke) smoke=1; shift ;;
    --logs) logs=${2:?--logs needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[ -n "$logs" ] || logs=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
started=$SECONDS
failed=()

step() {  # step NAME TIMEOUT COMMAND...: run it, log it, note a failure, go on
  local name=$1 limit=$2; shift 2
  echo "==> $name (at most ${limit}s; log: $logs/$name.log)"
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed+=("$name (exit $rc)")
    echo "    FAILED with exit $rc; its last lines:"
    tail -n 15 "$logs/$name.log" | sed 's/^/    | /'
  fi
  return $rc
}

if [ $smoke = 1 ]; then
  python=.venv/bin/python
  [ -x "$python" ] || { echo "no .venv here: run 'make install' first" >&2; exit 2; }
  device=cpu dtype=bfloat16
  train_model=(--family llama --layers 2 --hidden 64 --batch 2 --seq 32 --steps 2 --rounds 1 --warmup 1)
  generate_model=(--layers 2 --hidden 64 --batch 2 --prompt 8 --new-tokens 4 --rounds 1)
  hop_calls=(--calls 5)
else
  python=python3
  device=cuda dtype=bfloat16
  train_model=(--family llama --layers 16 --hidden 1024 --batch 8 --seq 512 --steps 5 --rounds 3 --warmup 2)
  generate_model=(--layers 16 --hidden 1024 --batch 8 --prompt 128 --new-tokens 64 --rounds 3)
  hop_calls=(--calls 30)
  [ -d "$wheels" ] || { echo "no wheel folder '$wheels' (make it with benchmarks/gpu_wheels.sh; see benchmarks/README.md)" >&2; exit 2; }
  nvidia-smi -L || true
  step install 180 "$python" -m pip install --no-index --find-links "$wheels" --no-build-isolation -e . \
    || { echo "the install failed: nothing else can run" >&2; exit 1; }
  "$python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" \
    || exit 1
fi

step gpu-tests 150 "$python" -m pytest -m gpu -q -p no:cacheprovider -o addopts= -rs tests
tail -n 3 "$logs/gpu-tests.log" | sed 's/^/    /'
step train 240 "$python" benchmarks/train_throughput.py --free --device "$device" --dtype "$dtype" "${train_model[@]}"
step generate 150 "$python" benchmarks/generate_throughput.py --device "$device" --dtype "$dtype" "${generate_model[@]}"
step hop 90 "$python" benchmarks/hop_latency.py "${hop_calls[@]}"

figure() {  # figure LOG PATTERN: the last line of LOG matching PATTERN, or "missing"
  grep -E "$2" "$logs/$1.log" 2>/dev/null | tail -n 1 || true
}
echo
echo "==> figures ($( [ $smoke = 1 ] && echo 'CPU smoke run: tiny model, not a measurement' || "$python" -c 'import torch; print(torch.cuda.get_device_name(0))'), $dtype)"
echo "training:   $(figure train "^ratio swarm/local")  (GPU target >= 0.8)"
echo "            $(figure train '^a swarm step beyond')"
echo "generation: $(figure generate '^ratio swarm/local decode')  (target >= 0.5)"
echo "            $(figure generate '^ratio swarm/local time to first token')"
echo "per hop:    $(figure hop 'stage forward')"
echo "            $(figure hop '^stage RPC')"
echo "took $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}" >&2
  exit 1
fi
