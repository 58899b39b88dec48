#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian/Ubuntu packages) for the explorer's browser test
# (tests/viz/test_viz_browser.py). Does nothing when both are already on PATH.
# Usage: scripts/install_browser.sh    (needs root or passwordless sudo; exits non-zero if it cannot install)
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if (have chromium || have chromium-browser) && have chromedriver; then
    echo "install_browser: chromium and chromedriver already installed"
    exit 0
fi

if ! have apt-get; then
    echo "install_browser: apt-get not found; install chromium and chromedriver by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser: need root (or passwordless sudo) to install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian names the packages chromium / chromium-driver; Ubuntu's apt names are chromium-browser /
# chromium-chromedriver (snap wrappers there, which may not run in containers).
if apt-cache show chromium-driver >/dev/null 2>&1; then
    $SUDO apt-get install -y -qq chromium chromium-driver
else
    $SUDO apt-get install -y -qq chromium-browser chromium-chromedriver
fi

if (have chromium || have chromium-browser) && have chromedriver; then
    echo "install_browser: installed $(chromedriver --version | head -n1)"
else
    echo "install_browser: packages installed but chromium/chromedriver are not on PATH" >&2
    exit 1
fi
