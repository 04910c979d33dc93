# Sourced at the start of a device-machine command: installs the carried wheels and unpacks the carried
# ComfyUI host (see bench/README.md). Sets COMFYUI_PATH and PYTHONPATH.
# .whl-av (ComfyUI's server needs it; bench/README.md) where it is carried
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  $(ls .whl-av/*.whl 2>/dev/null) \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/host && tar -xzf .carry/comfy.tgz -C /tmp/host && export COMFYUI_PATH=/tmp/host/ComfyUI
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
