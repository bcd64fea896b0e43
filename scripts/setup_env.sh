#!/usr/bin/env bash
# Create (or refresh) the virtual environment with ddstrans and everything it needs.
# Idempotent: the install runs again only when pyproject.toml changed since the last one.
#   PYTHON=python3.11   interpreter for a new venv      DDSTRANS_VENV=.venv   where the venv lives
#   TORCH_SPEC='torch==2.13.0'  torch to install when the venv has none (e.g. a CUDA build on GPU machines)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${DDSTRANS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.ddstrans-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  # a fresh environment takes about 2.1 GB (torch 0.75 GB of it): say so up front instead of pip's ENOSPC traceback
  has_torch=1; "$venv/bin/python" -c "import torch" 2>/dev/null || has_torch=0
  need_mb=$(( has_torch ? 1500 : 2500 ))
  free_mb=$(df -Pm "$venv" | awk 'NR==2 {print $4}')
  if [ "${free_mb:-0}" -lt "$need_mb" ]; then
    echo "[setup] error: ${free_mb} MB free where $venv lives, the install needs about ${need_mb} MB" >&2
    exit 1
  fi
  echo "[setup] installing ddstrans and dependencies into $venv (about a minute)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  if [ "$has_torch" = 0 ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,demo,onnx]"
  echo "$want" > "$stamp"
fi
