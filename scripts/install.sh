#!/usr/bin/env bash
# Install everything scipion-gsplat needs on Debian 12 (run as root):
#   system packages (python3-venv, python3-tk, RELION for the reference checks)
#   and a virtual environment .venv with torch 2.13.0 (CPU) and the plugin,
#   resolved in one pip call so Scipion's numpy/scipy pins hold.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GSPLAT_VENV:-$PWD/.venv}"
PY="${PYTHON:-python3}"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    need=""
    # xvfb, xdotool, imagemagick: the GUI tests (tests/test_gui.py) run Tk on a virtual display;
    # slurm-wlm, munge: the cluster tests start a real Slurm queue (scripts/slurm_local.sh)
    for pkg in python3-venv python3-tk python3-dev relion xvfb xdotool imagemagick slurm-wlm munge; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
    done
    if [ -n "$need" ]; then
        echo "[install] apt-get install$need"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq $need >/dev/null
    fi
else
    echo "[install] not root or no apt-get: skipping system packages (RELION checks will be skipped)"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating $VENV"
    "$PY" -m venv "$VENV"
fi
pip_quiet() {  # run pip; show its output only on failure (minus local-index noise)
    local log
    log="$(mktemp)"
    if ! "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$log" || true
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}
# Editable install: the package runs from this checkout (programs/ is mapped to
# scipion_gsplat.programs), so the tests, the demo and Scipion use this code.
# scipion-em-relion: the RELION plugin the chaining tests run our outputs through
# (never a dependency of the plugin itself); it drives Debian's RELION 3.1.
echo "[install] pip install torch==2.13.0 scipion-em-relion==5.0.2 -e .[test]"
pip_quiet install --progress-bar off torch==2.13.0 scipion-em-relion==5.0.2 -e ".[test]"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c "import tkinter, torch, pwem, scipion_gsplat.programs.simulate; print('[install] ok: torch', torch.__version__)"
for exe in Xvfb xdotool import slurmctld; do  # GUI tests: a virtual display; cluster tests: Slurm
    command -v "$exe" >/dev/null 2>&1 || echo "[install] $exe not found: the GUI or cluster tests will fail"
done
