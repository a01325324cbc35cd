#!/usr/bin/env bash
# Downloads, here, the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has torch and
# transformers but no network. Run from a checkout whose .venv is installed (make install):
#
#     benchmarks/gpu_wheels.sh                 # into .whl/, for CPython 3.12 on manylinux x86-64
#     PY_VERSION=3.11 benchmarks/gpu_wheels.sh /tmp/wheels
#
# What it takes: swarm's runtime dependencies, walked from the installed package's metadata, at the
# versions this .venv runs (so what was tested here is what runs there), less torch, transformers and
# their own dependencies (the GPU machine's builds stay) and the large packages every torch image holds:
# the whole folder must fit the 64 MiB that travels to the device machine.
# A dependency published only as a source archive (a pure-Python one, such as varint) is built into a
# wheel here. pytest and pytest-timeout come along for the gpu tests.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py_version=${PY_VERSION:-3.12}
python=.venv/bin/python
[ -x "$python" ] || { echo "no .venv here: run 'make install' first" >&2; exit 2; }
mkdir -p "$dest"

# name==version for every distribution swarm needs at run time, torch's subtree and the big ones left out
mapfile -t pins < <("$python" - <<'EOF'
import re
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

SKIP = {"torch", "triton", "transformers", "tokenizers", "hf-xet", "numpy", "scipy", "pyarrow", "pandas",
        "sympy", "networkx", "mpmath", "jinja2", "markupsafe", "filelock", "fsspec", "setuptools", "pip", "wheel"}
seen, todo = {}, ["swarm", "pytest", "pytest-timeout"]
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or name in SKIP or name.startswith("nvidia-"):
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        continue
    seen[name] = dist.version
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)
seen.pop("swarm", None)
print("\n".join(f"{name}=={version}" for name, version in sorted(seen.items())))
EOF
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64; do
  platforms+=(--platform "$tag")
done
echo "==> ${#pins[@]} wheels for CPython $py_version (manylinux x86-64) into $dest"
for pin in "${pins[@]}"; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" \
        --implementation cp "${platforms[@]}" -d "$dest" "$pin" >/dev/null 2>&1; then
    echo "    $pin: no wheel published; building one here"
    "$python" -m pip wheel -q --no-deps -w "$dest" "$pin"
  fi
done
du -sh "$dest"
