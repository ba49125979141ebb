#!/usr/bin/env bash
# The main job: set up .venv (idempotent), build the default offline corpus, train a vanilla and
# an adaptive latent-CoT model on the same tokens, print held-out perplexities side by side.
# Extra flags go to the driver (e.g. `bash examples/quickstart.sh --train-iters 50`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$root/.venv/bin/python" "$root/examples/compare_vanilla_adaptive.py" "$@"
