#!/usr/bin/env bash
# Create .venv (if missing) and install dinolab with its pinned dependencies (constraints.txt).
# Needs only Python >= 3.10 with pip and venv. Idempotent: a second run only checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch is pinned in constraints.txt (2.13.0); pip resolves everything against those pins.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
