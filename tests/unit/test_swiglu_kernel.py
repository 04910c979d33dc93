"""bench/swiglu_kernel.py: the hand-written kernel for fp8's w2 input (an experiment the bench times against
Inductor's). On the CPU its arithmetic runs under Triton's interpreter, which decides at import, hence the
subprocess; on a GPU its fp8 output is held to the error of the pack's own formula."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_scripts

_INTERPRETED = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
import bench_scripts
kernel = bench_scripts.load("swiglu_kernel")
g = torch.Generator().manual_seed(0)
rows, cols = 7, 300  # a tail of 44 columns past the 2 blocks of 128; 3 programs: 2 dead rows in the last pass
a = torch.randn(rows, cols, generator=g, dtype=torch.bfloat16) * 3
b = torch.randn(rows, cols, generator=g, dtype=torch.bfloat16)
a[2], b[5] = 0, b[5] * 1e4  # an all-zero row; a row far beyond e4m3's 448
out, scale = kernel.swiglu_rowwise(a, b, programs=3, block=128, num_warps=4, out_dtype=torch.float32)
h = torch.nn.functional.silu(a.float()) * b.float()
want_scale = h.abs().amax(-1, keepdim=True).clamp(min=kernel.MIN_ROW_AMAX) / kernel.E4M3_MAX
want = (h / want_scale).clamp(-kernel.E4M3_MAX, kernel.E4M3_MAX)
print(json.dumps({{
    "scale_rel": ((scale - want_scale).abs() / want_scale).max().item(),
    "value_abs": (out - want).abs().max().item(),
    "row_max": out.abs().amax(-1).tolist(),
    "zero_row": out[2].abs().max().item(),
}}))
"""


def test_the_kernel_scales_each_row_by_its_amax_under_the_interpreter():
    """silu(g) * u in fp32, each row's scale its amax / 448, the values divided by it: every live row then reaches
    448 exactly, a row of zeros stays zero, and the column tail and the rows past the last are masked."""
    tests = str(Path(bench_scripts.__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", _INTERPRETED.format(tests=tests)], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["scale_rel"] < 1e-6, r
    assert r["value_abs"] < 1e-3, r  # of values up to 448: fp32 rounding of the sigmoid and the division
    assert r["zero_row"] == 0.0
    assert [m for i, m in enumerate(r["row_max"]) if i != 2] == pytest.approx([448.0] * 6, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)")
def test_the_kernels_fp8_is_as_close_to_fp32_as_the_packs_formula():
    """On a GPU, the e4m3 output dequantised is as close to the fp32 product as the pack's formula (the kernel
    Inductor fuses today), whose product is rounded to bf16 first."""
    kernel = bench_scripts.load("swiglu_kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(300, 9216, generator=g, device="cuda", dtype=torch.bfloat16) * 2
    b = torch.randn(300, 9216, generator=g, device="cuda", dtype=torch.bfloat16)
    h = torch.nn.functional.silu(a.float()) * b.float()

    def error(q, scale):
        return ((q.float() * scale - h).norm() / h.norm()).item()

    ours = error(*kernel.swiglu_rowwise(a, b, programs=264))
    theirs = error(*kernel.reference(a, b))
    assert ours < 0.05 and ours <= theirs * 1.05 + 1e-3, (ours, theirs)
