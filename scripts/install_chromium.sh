#!/usr/bin/env bash
# Headless Chromium + chromedriver for tests/test_browser.py (CI runs this on a fresh machine).
# Python packages come from `pip install -c constraints.txt -e ".[dev]"`, not from here.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "install_chromium.sh: install chromium and chromium-driver with your package manager for the browser test" >&2
  exit 1
fi
