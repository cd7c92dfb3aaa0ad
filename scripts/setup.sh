#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: apt packages FFCV builds against, .venv, pip packages,
# fastkd itself (editable). A second run checks a stamp and returns in seconds.
#   bash scripts/setup.sh            # what the README's two commands call first
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTKD_VENV:-.venv}
STAMP="$VENV/.fastkd-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# 1. System packages FFCV compiles against (libjpeg-turbo, OpenCV) and pkg-config to find them.
need=()
for p in pkg-config libturbojpeg0-dev libopencv-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. Virtual environment.
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel

# 3. Packages. torch/torchvision pinned to the CUDA 13 build this platform serves (runs on CPU too).
"$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install -q numpy pillow pyyaml rich numba scikit-learn matplotlib pytest pytest-xdist \
    timm safetensors tensorboard wandb tyro nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg
# FFCV builds from source against the apt libraries; it needs numpy + cython at build time.
"$PY" -m pip install -q cython
"$PY" -m pip install -q --no-build-isolation "ffcv==1.0.2"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .

echo "$want" > "$STAMP"
echo "[setup] done: $VENV"
