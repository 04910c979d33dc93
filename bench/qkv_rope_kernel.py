"""NextDiT's attention inputs (q/k RMSNorm + RoPE, v) by the pack's kernel (pipeline/qkv_rope.py) against Inductor's
kernels for the same function and PyTorch's eager ops, at NewBie's size: 24 heads and 8 key/value heads of 96 over
a 1024x1024 image and its caption (4356 tokens), bf16. The pack's kernel at 2, 4 and 8 warps and its op are checked
against the PyTorch form (the share of values a rounding apart) and timed with CUDA events; the bytes it must move
(the projection read once, q, k, v written once) give the bandwidth. run123: 29.9 us a call at 4 warps (2.2 TB/s),
Inductor's kernels 91.5, PyTorch's eager ops 546 (H100); two earlier forms of the kernel, since removed, took 205
(a program a token, each pair's values read with stride-2 loads) and 108.6 us (a program a head), runs 122-123.

    python3 bench/qkv_rope_kernel.py --out $OUT      # CUDA: OUT/qkv_rope_kernel.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devkit.cuda_timing import time_us  # noqa: E402
from devkit.rope_freqs import rotations  # noqa: E402
from pipeline import qkv_rope  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, TOKENS = 24, 8, 96, 4356


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = torch.randn(1, TOKENS, width, generator=g, device="cuda", dtype=torch.bfloat16) * 2
    freqs = rotations(torch.rand(1, TOKENS, 1, HEAD_DIM // 2, generator=g, device="cuda") * 6.3)
    qw, kw = (torch.rand(HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    call = (qkv, freqs, qw, kw, 1e-6, HEADS, KV_HEADS)
    want = qkv_rope.reference(*call)
    moved = qkv.numel() * 2 * 2  # read once, written once as q, k, v
    compiled = torch.compile(lambda *a: tuple(t.contiguous() for t in qkv_rope.reference(*a)))
    candidates = {"eager PyTorch": lambda: qkv_rope.reference(*call), "Inductor": lambda: compiled(*call),
                  "op (pack's launch)": lambda: qkv_rope.qkv_norm_rope(*call)}
    for warps in (2, 4, 8):
        candidates[f"kernel, {warps} warps"] = (lambda w=warps: qkv_rope.launch(*call, num_warps=w))
    results = {}
    for name, fn in candidates.items():
        out = fn()
        unequal = max((a != b).float().mean().item() for a, b in zip(out, want))
        times = time_us(fn, iters=100)
        us = statistics.median(times)
        results[name] = {"us": round(us, 2), "spread_us": [round(min(times), 2), round(max(times), 2)],
                         "tb_per_s": round(moved / us / 1e6, 2), "unequal_share": round(unequal, 5)}
        print(f"{name:>22}: {us:8.2f} us  {moved / us / 1e6:5.2f} TB/s  unequal {unequal:.5f}", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": TOKENS,
              "bytes_moved": moved, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qkv_rope_kernel.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
