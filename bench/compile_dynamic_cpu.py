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
    import torch

    from devkit import cfg_batch_errors, tiny_models

    tiny_models._comfy_cpu_safe()
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from pipeline import block_compile, rope_fusion

    dit = tiny_models.random_state_dict(tiny_models._meta_state_shapes(tiny_models.TINY)["dit"], 0, torch.float32)
    patcher, cfg = cfg_batch_errors.model(dit)
    rope_fusion.enable()
    set_torch_compile_wrapper(patcher, backend="inductor", dynamic={"default": None, "true": True}[dynamic],
                              keys=block_compile.block_keys(patcher.model.diffusion_model))
    t = time.perf_counter()
    cfg_batch_errors.sample(patcher, *cfg_batch_errors.prompts(cfg, 12, 5), mode="off")
    print(f"dynamic={dynamic}: {block_compile.compiled_graph_count()} graphs, first run {time.perf_counter() - t:.1f} s",
          flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        for mode in ("default", "true"):  # each in a fresh process: Dynamo's and Inductor's in-memory state apart
            subprocess.run([sys.executable, __file__, mode], check=True)
