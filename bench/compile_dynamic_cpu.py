"""How many block graphs the first sampling run compiles, and how long it takes, with the blocks compiled as the
pack does (`dynamic` left to Dynamo: static first, dynamic after a second caption length) and with every size
dynamic from the start. Tiny DiT on the CPU with Inductor; a prompt pair of different lengths, as real prompts are.

    COMFYUI_PATH=~/comfy/ComfyUI python bench/compile_dynamic_cpu.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(dynamic: str) -> None:
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    from devkit import cfg_batch_errors
    from devkit.compiled_tiny import compiled_tiny_dit
    from pipeline import block_compile

    patcher, prompts = compiled_tiny_dit(dynamic={"default": None, "true": True}[dynamic])
    t = time.perf_counter()
    cfg_batch_errors.sample(patcher, *prompts, mode="off")
    print(f"dynamic={dynamic}: {block_compile.compiled_graph_count()} graphs, first run {time.perf_counter() - t:.1f} s",
          flush=True)

if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        for mode in ("default", "true"):  # each in a fresh process: Dynamo's and Inductor's in-memory state apart
            subprocess.run([sys.executable, __file__, mode], check=True)
