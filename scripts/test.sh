#!/usr/bin/env bash
# Install everything (scripts/install.sh) and run the full test suite.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k reconstruct).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${GSPLAT_VENV:-$PWD/.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# pytest's own exit code is the script's (5 = no tests collected is a failure too)
exec "$VENV/bin/pytest" -q -p no:cacheprovider "$@"
