#!/usr/bin/env bash
# The GPU checks of extraction in one prepared run, for a session lent a CUDA machine.
#
#   bash bench/gpu-check.sh fetch   # here (PyPI reachable): the wheels the GPU machine lacks, into .whl/
#   bash bench/gpu-check.sh         # there, through the device tool: carry [".whl"], timeout_s 540
#
# The GPU machine has python3 with a CUDA build of torch and transformers, and no network:
# nnsight (the benchmark's nnsight column) and what it needs beside them travel as wheels
# for Python 3.12 in .whl/ (git-ignored). Without them the nnsight column says "skipped".
# What it prints also lands in $OUT (or ./gpu-check-out): the device, the CUDA tests (a real
# torch.cuda.OutOfMemoryError among them), and the benchmark in bfloat16 at batch 64, whose
# tables carry tokens/s, the share of the FLOP-bound limit and a real OutOfMemoryError halved
# in place. The steps' time limits add up to 450 s, inside the 540 s asked of the device tool,
# so a machine that is slower than expected still returns every finished step's output.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
  # The versions bench/requirements.txt and requirements.txt resolve to here.
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl \
    nnsight==0.8.1 greenlet==3.5.6 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 websocket-client==1.9.2 zstandard==0.25.0
fi

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

status=0
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, its output to the screen and $OUT/NAME
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

step device.txt 30 bash -c 'nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"'
# pytest-django is not there: the CUDA tests need no database (tests/conftest.py copes without it).
step cuda-tests.txt 120 python3 -m pytest -m cuda -p no:cacheprovider -o addopts= -v tests/extraction/test_cuda.py
step bench-cuda-bf16.md 200 python3 bench/extraction.py --device cuda --model-dtype bfloat16 --batch-size 64 \
  --samples 512 --pair-reps 4 --no-rss
# The CPU run's conditions (float32, batch 16, 64 samples) on the GPU, for the side-by-side.
step bench-cuda-fp32.md 100 python3 bench/extraction.py --device cuda --no-oom --no-rss
exit $status
