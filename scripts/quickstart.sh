#!/usr/bin/env bash
# One command: set everything up, then generate an image headlessly through ComfyUI with this pack.
# Arguments go to scripts/generate.py (--help lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh"
exec "${NEWBIE_VENV:-$HOME/.cache/comfyui-newbie-lowvram/venv}/bin/python" "$here/scripts/generate.py" "$@"
