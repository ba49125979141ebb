#!/usr/bin/env bash
# The CI test suite: set up .venv (idempotent), then every test not marked `slow`.
# `bash scripts/run_tests.sh -m slow` runs the slow ones instead; other pytest flags pass through.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
cd "$root"
if [[ " $* " == *" -m "* ]]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -m "not slow" "$@"
