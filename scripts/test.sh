#!/usr/bin/env bash
# Set up and run the whole test suite on CPU. The browser test needs Debian's chromium and
# chromium-driver: they are installed here when missing and possible, else that test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${DINOLAB_BROWSER_INSTALL:-1}" != "0" ]; then
    bash scripts/install_browser.sh || echo "test.sh: no chromium: the browser test will be skipped"
fi
export DINOLAB_BROWSER_INSTALL=0  # installed (or not) above; the test itself must not try again
exec .venv/bin/python -m pytest "$@"
