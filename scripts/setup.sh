#!/usr/bin/env bash
# Sets up a Python environment that can run ComfyUI with this pack and its tests. Idempotent: a second run
# only checks that everything is installed. Needs network access to PyPI (nothing else).
#   NEWBIE_VENV   where the virtual environment lives (default ~/.cache/comfyui-newbie-lowvram/venv)
#   COMFYUI_PATH  the ComfyUI to run (default ~/comfy/ComfyUI, or the ComfyUI whose custom_nodes/ holds this pack)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NEWBIE_VENV:-$HOME/.cache/comfyui-newbie-lowvram/venv}
py=${PYTHON:-python3}

find_host() {
  for c in "${COMFYUI_PATH:-}" "$HOME/comfy/ComfyUI" "$(cd "$here/../.." && pwd)"; do
    if [ -n "$c" ] && [ -f "$c/main.py" ] && [ -d "$c/comfy" ]; then echo "$c"; return; fi
  done
}
host=$(find_host || true)

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment at $venv"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip "$@"; }
quiet() { grep -v -E "is ignored: it is neither|^$" || true; }

# ComfyUI imports torchaudio at start-up; torch 2.9.1 is the release line with matching torchvision and
# torchaudio wheels on PyPI for x86_64 and aarch64.
if ! "$venv/bin/python" -c "import torch, torchvision, torchaudio" 2>/dev/null; then
  echo "[setup] installing torch 2.9.1, torchvision, torchaudio (several GB the first time)"
  pip install -q torch==2.9.1 torchvision==0.24.1 2>&1 | quiet
  pip install -q torch==2.9.1 'torchaudio==2.9.*' 2>&1 | quiet
fi

reqs=("-r" "$here/requirements.txt" "-r" "$here/requirements-test.txt")
if [ -n "$host" ]; then
  grep -v -E '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$host/requirements.txt" > "$venv/host-requirements.txt"
  reqs+=("-r" "$venv/host-requirements.txt")
  echo "[setup] ComfyUI host: $host"
else
  # Without a host the pure-logic tests still run; these are the packages they import.
  reqs+=("safetensors" "sentencepiece" "numpy" "pillow")
  echo "[setup] !!! no ComfyUI host found (looked at \$COMFYUI_PATH, ~/comfy/ComfyUI, $here/../..);" \
       "host tests will be skipped. See the README to get one."
fi
pip install -q "${reqs[@]}" 2>&1 | quiet
bash "$here/scripts/install_browser.sh" || true   # Chromium + playwright-core for tests/browser; never fails
echo "[setup] ready: $venv/bin/python"
