# Sourced at the start of a device-machine command: installs the carried wheels and unpacks the carried
# ComfyUI host (see bench/README.md). Sets COMFYUI_PATH and PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# the host from .carry, or as an earlier call of this warm machine unpacked it (bench/fa4_install.sh stash)
if [ -f .carry/comfy.tgz ]; then
  mkdir -p /tmp/host && tar -xzf .carry/comfy.tgz -C /tmp/host || { echo "host unpack failed"; exit 1; }
elif [ ! -d /tmp/host/ComfyUI ]; then
  echo "no host: carry .carry, or run bench/fa4_install.sh stash with it first"; exit 1
fi
export COMFYUI_PATH=/tmp/host/ComfyUI
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
