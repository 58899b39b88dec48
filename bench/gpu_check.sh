#!/usr/bin/env bash
# The GPU check in one command (issue 17), for a bare machine without network:
#   bash bench/gpu_check.sh            # results in $OUT (or ./gpu_check_out): results.json, results.md
# 1. dinolab's missing dependencies from the git-ignored .whl/ (filled beforehand by bench/fetch_wheels.sh;
#    it must travel with the checkout), installed offline, only where omegaconf is missing;
# 2. dinolab from the checkout (PYTHONPATH, nothing built);
# 3. bench/gpu_check.py on CUDA under `timeout 540` (each part also has its own budget, ~8 minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-gpu_check_out}"
mkdir -p "$OUTDIR"
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
    if [ -d .whl ]; then
        "$PY" -m pip install --no-index --find-links .whl/ omegaconf antlr4-python3-runtime 2>&1 | tail -3
    else
        echo "gpu_check.sh: omegaconf missing and no .whl/ folder (run bench/fetch_wheels.sh where PyPI is reachable)" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, dinolab; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'dinolab', dinolab.__version__)"
timeout 540 "$PY" bench/gpu_check.py --device "${GPU_CHECK_DEVICE:-cuda}" --out "$OUTDIR" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check.sh: stopped by timeout 540; $OUTDIR/results.json holds the parts that finished" >&2
exit $rc
