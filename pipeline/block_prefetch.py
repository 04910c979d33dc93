"""Each block's weights fetched as one unit for a DiT streamed under dynamic VRAM (ComfyUI's prefetch queue).

Where a DiT that does not fit streams under dynamic VRAM (a quantized DiT, or with the pack's block streamer
switched off, pipeline/block_stream.py), comfy-aimdo holds its weights in pinned system memory and each Linear
fetches its own weight when it runs. ComfyUI has a queue that fetches a whole transformer block as one unit on an
offload stream (`comfy.model_prefetch`, used by the LTX-AV, MiniMax and Gemma-4 models). It fetches each block as
that block starts (`prefetch_queue_pop` casts `queue[0]`, the block about to run), not one ahead: the copies only
overlap what runs before as far as the host is ahead of the GPU. It sampled 5.11 against 4.76 it/s at 4 GiB on an
H200 (run28); at 6 GiB on an H100 it did not pay reliably (7.76 s with it against 10.51 s without in run59, 8.10
against 7.62 s in run61). Lumina-2's Next-DiT, which NewBie uses, does not use the queue. This module adds it from
outside through a DIFFUSION_MODEL wrapper:

- the wrapper builds ComfyUI's queue from the DiT's blocks in the order they run (2 context refiners, 2 noise
  refiners, then the main layers). `make_prefetch_queue` returns None unless the call is on a dynamic-VRAM patcher
  on a GPU with offload streams (`transformer_options["prefetch_dynamic_vbars"]`, set by ComfyUI's
  BaseModel), so a resident or compiled DiT, a CPU, or a host without the queue runs as before;
- a forward pre-hook on each block pops the queue as the block starts, as those models do in their own loops;
- after the call the last block is released (`prefetch_queue_pop(..., None)`); the hooks are removed in any case.
  A call that fails midway leaves its queue to ComfyUI, which cleans up every queue after the node
  (execution.py).

Nothing changes numerically: the same weights reach the same layers, only earlier. `NEWBIE_BLOCK_PREFETCH=0` in
the server's environment turns it off (each Linear then fetches its own weight, as upstream's Next-DiT does).
"""
from __future__ import annotations

import functools

from . import env_switch

WRAPPER_KEY = "newbie_block_prefetch"
BLOCK_ORDER = ("context_refiner", "noise_refiner", "layers")  # the order Next-DiT runs its blocks in


@functools.cache
def _prefetch_module():
    """ComfyUI's prefetch queue (comfy.model_prefetch, v0.33 with comfy-aimdo), or None where the host lacks it."""
    try:
        import comfy.model_prefetch as mp
    except ImportError:
        return None
    return mp if all(hasattr(mp, f) for f in ("make_prefetch_queue", "prefetch_queue_pop")) else None


def available() -> bool:
    return _prefetch_module() is not None


def enabled() -> bool:
    """Not switched off by NEWBIE_BLOCK_PREFETCH=0 (for comparisons, or a host where it misbehaves)."""
    return env_switch.switch("NEWBIE_BLOCK_PREFETCH", True)


def blocks_in_order(diffusion_model) -> list:
    """The DiT's transformer blocks in the order a call runs them."""
    return [block for name in BLOCK_ORDER for block in (getattr(diffusion_model, name, None) or ())]


def _prefetching_call(executor, x, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the call with each block's weights fetched as one unit on an offload stream."""
    mp = _prefetch_module()
    blocks = blocks_in_order(executor.class_obj)
    queue = mp.make_prefetch_queue(list(blocks), x.device, kwargs.get("transformer_options") or {}) \
        if blocks else None
    if queue is None:
        return executor(x, *args, **kwargs)

    def pop(block, _args):
        mp.prefetch_queue_pop(queue, x.device, block)

    handles = [block.register_forward_pre_hook(pop) for block in blocks]
    try:
        out = executor(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    mp.prefetch_queue_pop(queue, x.device, None)
    return out


def attach(patcher) -> bool:
    """Prefetch the blocks of the patcher's DiT when it runs streamed (replaces an earlier attach); False where
    the host has no prefetch queue or it is switched off."""
    if not (available() and enabled()):
        return False
    import comfy.patcher_extension as pe

    patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _prefetching_call)
    return True
