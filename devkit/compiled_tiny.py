"""The tiny DiT with its blocks compiled by Inductor as the pack compiles them (one graph per block kind), and a
prompt pair of different lengths as real prompts are: for the CPU measurements of the first sampling run's compile
(bench/compile_dynamic_cpu.py, bench/compile_warm_cache_cpu.py). Needs the ComfyUI host on sys.path."""
from __future__ import annotations


def compiled_tiny_dit(dynamic: bool | None = None):
    """(patcher, (cond, uncond)): the tiny DiT, resident, its blocks wrapped by ComfyUI's own compile helper with
    Inductor (`dynamic` as torch.compile takes it; None leaves it to Dynamo, as the pack does)."""
    import torch

    from . import cfg_batch_errors, tiny_models

    tiny_models._comfy_cpu_safe()
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from pipeline import block_compile, rope_fusion

    dit = tiny_models.random_dit(torch.float32)
    patcher, cfg = cfg_batch_errors.model(dit)
    rope_fusion.enable()
    set_torch_compile_wrapper(patcher, backend="inductor", dynamic=dynamic,
                              keys=block_compile.block_keys(patcher.model.diffusion_model))
    return patcher, cfg_batch_errors.prompts(cfg, 12, 5)
