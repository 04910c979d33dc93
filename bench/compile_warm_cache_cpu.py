"""Where the first sampling run's time goes when Inductor's on-disk cache is already filled: tiny DiT on the CPU,
blocks compiled as the pack does, a prompt pair of different lengths. A first process fills a fresh cache, a
second one (the measurement) times its first and second run and prints torch.compile's phase timers as the
pack's compile log line gives them (pipeline/block_compile.py).

    COMFYUI_PATH=~/comfy/ComfyUI python bench/compile_warm_cache_cpu.py
    # what inside: python -m cProfile -s tottime bench/compile_warm_cache_cpu.py measure | head -30
    #   (with TORCHINDUCTOR_CACHE_DIR set to a cache the first form filled)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(label: str) -> None:
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    from devkit import cfg_batch_errors
    from devkit.compiled_tiny import compiled_tiny_dit
    from pipeline import block_compile

    patcher, prompts = compiled_tiny_dit()
    before, caches = block_compile.compile_phase_seconds(), block_compile.cache_counts()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        cfg_batch_errors.sample(patcher, *prompts, mode="off")
        times.append(time.perf_counter() - t)
    print(f"{label}: first run {times[0]:.1f} s, second {times[1]:.1f} s, "
          f"{block_compile.compiled_graph_count()} graphs"
          f"{block_compile.describe_compile_time(before, block_compile.compile_phase_seconds())}"
          f"{block_compile.describe_cache_use(caches, block_compile.cache_counts())}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for label in ("fill", "measure"):  # fresh processes: only the disk cache carries over
                subprocess.run([sys.executable, __file__, label], check=True, env=env)
