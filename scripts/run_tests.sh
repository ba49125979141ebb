#!/usr/bin/env bash
# The CI test suite: set up .venv (idempotent), then every test, the slow ones (multi-process
# runs, faults, tools end to end) included, on two pytest-xdist workers.
# `bash scripts/run_tests.sh -m "not slow"` is the quick development loop; other pytest flags pass
# through (`-n 0`: one process, e.g. to debug with `-s`; `-n 4` on a machine with more cores).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
cd "$root"
# Two workers, each with its training subprocesses, share the cores: one intra-op thread each, or
# the OpenMP threads spin against each other. `--dist loadscope` keeps a module's tests on one
# worker, so a module-scoped fixture (a reference training run) is built once.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Lint and format first (seconds; ruff is pinned in requirements.txt, configured in pyproject.toml).
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
exec .venv/bin/python -m pytest -n 2 --dist loadscope --durations 20 "$@"
