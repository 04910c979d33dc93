"""Opt-in regional compilation of NewBie's DiT: each transformer block compiled on its own (loader `compile: blocks`).

Upstream's TorchCompileModel compiles the whole DiT as one program: 140 s before the first 1024² image on an
H100 (shared/baseline.md). Next-DiT is 40 blocks of three kinds (2 context refiners without AdaLN, 2 noise
refiners and 36 main layers with it), and the blocks of one kind run the same code on the same shapes. Compiling
each block on its own lets Dynamo reuse one compiled graph for every block it fits (parameters are graph inputs,
not constants), so the compile cost is that of a few blocks, whatever the depth. Inductor's on-disk cache (its FX
graph cache, on by default) keeps the generated kernels, so a restarted server skips most of the compilation
(Dynamo still traces the few blocks again).

The compiled blocks are swapped in by ComfyUI's own helper (`comfy_api.torch_helpers.set_torch_compile_wrapper`,
an APPLY_MODEL wrapper), only for the duration of a model call, so loading, LoRA patching, offloading and the
OOM Guard see the plain modules. A sampling-run wrapper logs how many graphs each run compiled, so a user sees
the first run pay and the next ones not.

Off by default: its speed on a GPU has not been measured yet (bench/profile_dit.py `+compile` is the measurement).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

BLOCK_LISTS = ("context_refiner", "noise_refiner", "layers")
WRAPPER_KEY = "newbie_block_compile"
MODES = ("off", "blocks")


def block_keys(diffusion_model) -> list[str]:
    """The BaseModel attribute paths of every transformer block, as set_torch_compile_wrapper takes them."""
    return [f"diffusion_model.{name}.{i}" for name in BLOCK_LISTS
            for i in range(len(getattr(diffusion_model, name, None) or ()))]


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _log_compiles(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one sampling run; logs the graphs it compiled."""
    before = compiled_graph_count()
    try:
        return executor(*args, **kwargs)
    finally:
        new = compiled_graph_count() - before
        log.info("NewBie block compile: %d graph%s compiled in this sampling run (%d in this process)",
                 new, "" if new == 1 else "s", before + new)


def apply(patcher, backend: str = "inductor") -> int:
    """Compile each transformer block of the patcher's DiT (on first use); returns how many blocks."""
    import comfy.patcher_extension
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    keys = block_keys(patcher.model.diffusion_model)
    if not keys:
        raise ValueError("block compile: this model has no transformer blocks where NewBie's Next-DiT has them")
    set_torch_compile_wrapper(patcher, backend=backend, keys=keys)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _log_compiles)
    return len(keys)
