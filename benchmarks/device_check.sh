#!/usr/bin/env bash
# Entry of the prepared GPU device check (benchmarks/device_check.py: parts b, a, c, d in 355 s,
# stopped at 370 s; about 6 minutes on one H100 80 GB with the install). On the lent machine, which
# reaches no registry and lacks deepspeed, diffusers and webdataset, it installs the wheels that
# benchmarks/build_device_wheels.sh put in .device_wheels/ (carry that folder) into /tmp/mdt_site,
# without touching the machine's Python. $OUT gets five JSON files (the tool returns 8 at most).
#   bash benchmarks/device_check.sh                 # all parts, JSON under $OUT (else ./device_out)
#   bash benchmarks/device_check.sh --parts b,c     # arguments go to device_check.py
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed must not JIT-build CUDA ops: the trainer uses torch's AdamW and timm's Adan (client
# optimizers), ZeRO-2 on CUDA loads no op, and the shared-memory comm op is built for CPU runs only.
export DS_BUILD_OPS=0 DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/mdt_torch_extensions}
# One inductor cache for device_check.py and every child it starts (and a rerun on the same machine).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/mdt_inductor_cache}
if [ -d .device_wheels/data ]; then export MDT_DS_DATA=${MDT_DS_DATA:-$PWD/.device_wheels/data}; fi
if ! "$PY" -c "import deepspeed, diffusers, webdataset" 2>/dev/null; then
  if ! ls .device_wheels/*.whl >/dev/null 2>&1; then
    echo "deepspeed/diffusers/webdataset missing and no .device_wheels/: run benchmarks/build_device_wheels.sh here and carry .device_wheels" >&2
    exit 2
  fi
  SITE=/tmp/mdt_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .device_wheels/*.whl \
    || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$SITE"  # only the missing packages are in it (--no-deps)
fi
"$PY" -c "import deepspeed, diffusers, webdataset, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
# The parts' limits sum to 355 s (device_check.LIMITS_S); SIGTERM at 370 s makes it save and stop,
# SIGKILL 10 s later.
exec timeout -k 10 370 "$PY" benchmarks/device_check.py "$@"
