#!/usr/bin/env bash
# The main job: set up, then train on the embedded default (a few minutes on a 2-core CPU) and print
# the teacher's k-NN accuracy before and after. Extra arguments go to `dinolab train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dinolab train --output runs/default "$@"
