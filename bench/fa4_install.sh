# On the device machine, after bench/device_env.sh has run in an earlier call of the same warm machine
# (/tmp/site, /tmp/host): flash-attn-4 from the parts bench/fa4_pack.sh made.
#   bash bench/fa4_install.sh stash      # a call carrying .fa4a
#   source bench/fa4_install.sh          # the next call, carrying .fa4b: installs it in /tmp/site_fa4, sets the env
#   or, in-process only, two calls: `bash bench/fa4_install.sh stash` carrying .fa4a, then
#   `source bench/device_env.sh && source bench/fa4_install.sh` carrying .whl, .carry and .fa4b
# pip's --target does not run the DSL's .pth file (it puts nvidia_cutlass_dsl/dsl_packages on sys.path), so that
# directory goes on PYTHONPATH here; a normal `pip install` needs none of this.
if [ "${1:-}" = stash ]; then
  mkdir -p /tmp/fa4parts && cp .fa4a/cu13.part1 /tmp/fa4parts/ && ls -la /tmp/fa4parts
  exit $?
fi
test -f /tmp/fa4parts/cu13.part1 -a -d /tmp/host/ComfyUI -a -d /tmp/site || { echo "fa4_install: the machine went cold (no stash, host or wheels in /tmp)"; exit 3; }
cat /tmp/fa4parts/cu13.part1 .fa4b/cu13.part2 > /tmp/cu13.tar.xz
echo "$(cat .fa4b/cu13.sha256)  /tmp/cu13.tar.xz" | sha256sum -c || exit 4
rm -rf /tmp/site_fa4 && mkdir -p /tmp/site_fa4
# the wheels first: pip --target replaces a top-level directory it finds, the archive is unpacked into it after
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_fa4 .fa4b/*.whl || exit 5
tar -xJf /tmp/cu13.tar.xz -C /tmp/site_fa4 || exit 5
export PYTHONUNBUFFERED=1 COMFYUI_PATH=/tmp/host/ComfyUI
export PYTHONPATH=/tmp/site:/tmp/site_fa4:/tmp/site_fa4/nvidia_cutlass_dsl/dsl_packages
python3 -c "import flash_attn.cute.interface" 2>&1 | tail -4
python3 -c "from pipeline import flash_attn4 as f; assert f.installed(); print('flash-attn-4', f.version())" || exit 7
