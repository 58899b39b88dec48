#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels dinolab needs but the GPU machine lacks (it has no network).
# Run on a machine with PyPI access; bench/gpu_check.sh installs them there with pip --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip download --only-binary=:all: --no-deps -d .whl omegaconf antlr4-python3-runtime PyYAML
ls -l .whl
