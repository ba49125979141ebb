#!/usr/bin/env bash
# Every GPU claim in one command (under 8 minutes on one H100): each mode trains 20 bf16 steps
# over NCCL with the attention dispatch checked (no SDPA math kernel), the 1b throughput
# benchmark with MFU, and the memory model against torch.cuda.max_memory_allocated at the
# example config. The last line of output is one JSON object; exit status 0 when all hold.
#   scripts/gpu_check.sh                 on a CUDA machine
#   scripts/gpu_check.sh --cpu-dry-run   the same steps at tiny size on the CPU
# See benchmarks/gpu_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
