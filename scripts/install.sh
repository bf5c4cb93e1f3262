#!/usr/bin/env bash
# Installs sspsam and everything it needs into the current Python (a venv is a good idea).
#
# Why a script and not only `pip install -e .`: open_clip_torch declares torchvision as a
# dependency, and no torchvision wheel on PyPI imports beside the CPU build of torch 2.13.0
# this project pins (its compiled ops link against CUDA torch libraries). sspsam never needs
# torchvision: it uses open_clip's and segment_anything's pure-torch model modules only
# (see sspsam/backbones/_imports.py). So those two are installed without their dependencies.
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q --no-deps "open_clip_torch==3.3.0" "segment_anything==1.0"
$PY -m pip install -q -e ".[dev,serve,batch]"
# A broken torchvision (left by an earlier plain install) would break imports elsewhere.
if $PY -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  $PY -c "import torchvision" 2>/dev/null || $PY -m pip uninstall -y -q torchvision
fi
# The web page's browser test drives Debian's headless Chromium; best effort (the test skips
# with a clear message where it cannot be installed).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "install.sh: chromium could not be installed; the browser test will be skipped" >&2
fi
