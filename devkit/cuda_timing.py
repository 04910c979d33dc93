"""Kernel timing for the device benches (bench/swiglu_kernel.py, bench/qkv_rope_kernel.py)."""
from __future__ import annotations

import torch


def time_us(fn, iters: int = 50, repeats: int = 5) -> list[float]:
    """Microseconds a call, `repeats` times over `iters` back-to-back calls (CUDA events), after one warm call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return times
