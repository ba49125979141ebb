#!/usr/bin/env bash
# The comparison of docs/results.md: vanilla, PonderLM-2 K=1, stepwise K=2, adaptive K=3 (stable recipe),
# vanilla at the adaptive run's training FLOPs and a 2x-layer vanilla, over several seeds;
# held-out perplexity, downstream accuracy, FLOPs, halting plots (docs/results.md).
#   bash examples/compare_small.sh [--seeds 3] [--jobs 2] [--scale cpu|gpu] [--train-iters N] [--models a,b]
#   bash examples/compare_small.sh --iso-flops [--budgets 1,2,4] [--seeds 3] [--jobs 2] [--dry-run]  (docs/results.md)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$root/.venv/bin/python" "$root/examples/compare_small.py" "$@"
