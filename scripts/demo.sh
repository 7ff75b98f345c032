#!/usr/bin/env bash
# Install everything (scripts/install.sh) and run the demo (scripts/demo.py):
# simulated lysozyme particles -> headless Scipion project -> import ->
# Fourier reconstruction with half maps and FSC -> resolution printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${GSPLAT_VENV:-$PWD/.venv}"
exec "$VENV/bin/python" scripts/demo.py "$@"
