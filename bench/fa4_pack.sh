#!/usr/bin/env bash
# Here (a machine with PyPI): flash-attn-4 and its CuTe DSL as carries for the device machine, which has no network.
# Its CUDA 13 compiler wheel (nvidia-cutlass-dsl-libs-cu13, 92 MB) is too large for one call's 64 MiB carry, so it
# travels unpacked and xz-compressed (64 MB) in two parts: .fa4a (first 56 MB) and .fa4b (the rest, with the small
# wheels). On the device, one call carries .fa4a and `bench/fa4_install.sh stash`es it in /tmp; the next call, sent
# while the machine is still warm, carries .fa4b and runs `source bench/fa4_install.sh`. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .fa4a .fa4b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
work=$(mktemp -d)
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --pre -d "$work" "$@"
}
# flash-attn-4's requirements less what the device image has (torch, einops, typing_extensions, cuda-bindings,
# protobuf); nvidia-cutlass-dsl-libs-core holds the DSL's Python package (`cutlass.cute`)
get flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
mkdir "$work/cu13" && (cd "$work/cu13" && python3 -m zipfile -e "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -C "$work/cu13" -cf - . | xz -T0 -9 > "$work/cu13.tar.xz"
rm -rf .fa4a .fa4b && mkdir .fa4a .fa4b
# .fa4b (18 MB) also fits beside .whl and .carry (with the working tree, under a call's 64 MiB) for the two-call chain
# of bench/README.md
head -c 56000000 "$work/cu13.tar.xz" > .fa4a/cu13.part1
tail -c +56000001 "$work/cu13.tar.xz" > .fa4b/cu13.part2
sha256sum "$work/cu13.tar.xz" | cut -c1-64 > .fa4b/cu13.sha256
find "$work" -maxdepth 1 -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} .fa4b/ \;
rm -rf "$work"
du -sh .fa4a .fa4b
