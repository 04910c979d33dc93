"""Block-ahead weight streaming for a DiT that ComfyUI's non-dynamic patcher loaded in part.

When the DiT's weights do not fit, ComfyUI's non-dynamic ModelPatcher loads what fits and leaves the rest of the
layers on the host, pinned, with `comfy_cast_weights` set: each of those Linears then copies its own weight to the
GPU when it runs, through a cast buffer per offload stream that the next copy on that stream reuses once the layer
before is done with it (comfy.ops.cast_bias_weight), so the copies run a layer or two ahead at most. Dynamic
VRAM (comfy-aimdo, v0.33) does the same per Linear, and maps its pages as it goes. Measured at 6 GiB on an H100
(bench/results/run61 and run62: a profile of 4 sampling steps in each server), the GPU sat idle 47-59 % of those
steps under upstream's streaming and the pack's alike (447-556 ms a step, of which the copies took 74-93 ms and
the DiT's kernels about 140 ms): the GPU waited for the host, not for the link. With this module: 283 ms a step,
the GPU busy 76 % (run65); 0.73x and 0.93x upstream's image at 6 GiB, 0.60x at 4 GiB (run63, run64).

This module moves the streamed layers of each transformer block in one go, one block ahead:

- a DIFFUSION_MODEL wrapper plans, per block in running order (block_prefetch.blocks_in_order), which of its
  parameters are on the host (a cast layer's plain, pinned tensors; nothing else is touched), and allocates two
  device buffers of the largest such block's size;
- at the call's start the first streamed block is copied into one buffer on a side stream. As each streamed block
  starts (a forward pre-hook), the compute stream waits for its copy (an event, not the host), its parameters are
  pointed at their views in the buffer, and the next streamed block's copy is queued into the other buffer, behind
  an event recorded when the block before finished with it. As the block ends its parameters point back at their
  host tensors;
- ComfyUI's cast then finds the weight on the GPU and uses it as it is (LoRA and other weight functions are still
  applied by it, on a copy), so nothing changes numerically: the same bytes reach the same layers, only earlier.

The host never waits on the GPU here, so it runs ahead and the copies overlap the blocks before them. The wrapper
restores every parameter in any case (a failing call too). The two buffers are room ComfyUI's load does not know of:
`StreamRoom` makes the pack's non-dynamic patchers leave it free when they load in part. Quantized layers (a
QuantizedTensor or the pack's fp8/int8 tensors), unpinned host tensors and compiled blocks are left to ComfyUI's
own cast. With ComfyUI's pinned memory off (`comfy_pins`) nothing would stream: the loader then leaves a DiT that
does not fit to dynamic VRAM, and `StreamRoom` holds no room back. `NEWBIE_BLOCK_STREAM=0` in the server's
environment turns it off: the loader then streams under ComfyUI's dynamic VRAM where the host has it
(pipeline/block_prefetch.py), as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import env_switch
from .block_prefetch import blocks_in_order

WRAPPER_KEY = "newbie_block_stream"
SLOTS = 2  # one buffer in use by the running block, one being filled for the next
ALIGN = 512  # bytes; each parameter's view starts on this boundary
GENERATION_ATTR = "newbie_stream_generation"  # on the diffusion model, bumped when its weights may have moved
_PLAN_ATTR = "_newbie_stream_plan"


def enabled() -> bool:
    """Not switched off by NEWBIE_BLOCK_STREAM=0 (for comparisons, or a system where it misbehaves)."""
    return env_switch.switch("NEWBIE_BLOCK_STREAM", True)


def comfy_pins() -> bool:
    """Whether ComfyUI pins the host memory of the layers a partial load leaves out: its `pin_memory` does nothing
    with pinned memory off (`--disable-pinned-memory`, or no pinnable RAM: MAX_PINNED_MEMORY <= 0). Unpinned layers
    are left to ComfyUI's own cast (a copy from pageable memory cannot run ahead on a side stream), which dynamic
    VRAM streams faster (run61: 7.62 s against 9.55 s an image at 6 GiB with its pins)."""
    import comfy.model_management as mm

    return getattr(mm, "MAX_PINNED_MEMORY", 0) > 0


def available(device) -> bool:
    """Whether `device` can stream this way: a CUDA GPU (side streams and events) whose host layers ComfyUI pins."""
    return getattr(device, "type", None) == "cuda" and torch.cuda.is_available() and comfy_pins()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def host_pinned(t) -> bool:
    """A plain tensor in pinned host memory (what a non-dynamic patcher leaves of a layer it did not load)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.is_pinned()


@dataclass(frozen=True)
class StreamedBlock:
    """One block's parameters left on the host: (parameter, its host tensor, offset in a buffer), and the bytes."""
    block: torch.nn.Module
    params: tuple
    nbytes: int


def plan(blocks, streamed=host_pinned) -> list[StreamedBlock]:
    """The blocks (in running order) that have parameters to stream, each with where they go in a buffer. Only cast
    layers (`comfy_cast_weights` set: ComfyUI casts them at every call) whose every parameter is `streamed` count: a
    layer with a quantized weight is left whole to ComfyUI's cast."""
    out = []
    for block in blocks:
        params, offset = [], 0
        for module in block.modules():
            own = list(module.parameters(recurse=False))
            if not (own and getattr(module, "comfy_cast_weights", False) and all(streamed(p.data) for p in own)):
                continue
            for p in own:
                params.append((p, p.data, offset))
                offset += _aligned(_nbytes(p.data))
        if params:
            out.append(StreamedBlock(block, tuple(params), offset))
    return out


def block_bytes(diffusion_model) -> int:
    """The most bytes any one block's parameters take (what a buffer must hold if a whole block streams)."""
    return max((sum(_aligned(_nbytes(p)) for p in b.parameters()) for b in blocks_in_order(diffusion_model)),
               default=0)


class CudaCopier:
    """Copies on a side stream, ordered against the compute stream by events only (the host never waits)."""

    _streams: dict = {}

    def __init__(self, device):
        self.main = torch.cuda.current_stream(device)
        self.side = CudaCopier._streams.get(device)
        if self.side is None:
            self.side = CudaCopier._streams[device] = torch.cuda.Stream(device)
        self.side.wait_stream(self.main)  # the buffers were allocated on the compute stream
        self.ready: dict[int, torch.cuda.Event] = {}
        self.free: dict[int, torch.cuda.Event] = {}

    def copy(self, slot: int, sources, dests) -> None:
        with torch.cuda.stream(self.side):
            released = self.free.pop(slot, None)
            if released is not None:
                self.side.wait_event(released)  # the block before is done with this buffer
            for src, dst in zip(sources, dests):
                dst.copy_(src, non_blocking=True)
            self.ready[slot] = self.side.record_event()

    def wait_ready(self, slot: int) -> None:
        event = self.ready.pop(slot, None)
        if event is not None:
            self.main.wait_event(event)

    def release(self, slot: int) -> None:
        self.free[slot] = self.main.record_event()

    def finish(self) -> None:
        self.main.wait_stream(self.side)  # nothing of the side stream outlives the call's buffers


class InlineCopier:
    """Copies at once on the calling thread (a CPU: the tests)."""

    def copy(self, slot, sources, dests) -> None:
        for src, dst in zip(sources, dests):
            dst.copy_(src)

    def wait_ready(self, slot) -> None:
        pass

    def release(self, slot) -> None:
        pass

    def finish(self) -> None:
        pass


class Streamer:
    """One call's streaming: `SLOTS` buffers, the planned blocks, and the parameters pointed at a buffer now."""

    def __init__(self, blocks: list[StreamedBlock], device, copier):
        self.blocks = blocks
        self.index = {id(b.block): i for i, b in enumerate(blocks)}
        size = max(b.nbytes for b in blocks)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(min(SLOTS, len(blocks)))]
        self.copier = copier
        self.fetched: dict[int, list] = {}  # block index -> its parameters' views, copy queued
        self.swapped: list = []  # (parameter, host tensor) pointed at a buffer now

    def _slot(self, i: int) -> int:
        return i % len(self.slots)

    def fetch(self, i: int) -> None:
        """Queue block i's copy into its buffer (once; nothing past the last block)."""
        if i >= len(self.blocks) or i in self.fetched:
            return
        buf = self.slots[self._slot(i)]
        params = self.blocks[i].params
        views = [buf[off:off + _nbytes(host)].view(host.dtype).view(host.shape) for _, host, off in params]
        self.copier.copy(self._slot(i), [host for _, host, _ in params], views)
        self.fetched[i] = views

    def enter(self, block) -> None:
        i = self.index.get(id(block))
        if i is None:
            return
        self.fetch(i)
        self.copier.wait_ready(self._slot(i))
        for (p, host, _), view in zip(self.blocks[i].params, self.fetched.pop(i)):
            p.data = view
            self.swapped.append((p, host))
        self.fetch(i + 1)

    def leave(self, block) -> None:
        i = self.index.get(id(block))
        if i is None:
            return
        self.copier.release(self._slot(i))
        self.restore()

    def restore(self) -> None:
        """Point every swapped parameter back at its host tensor."""
        for p, host in self.swapped:
            p.data = host
        self.swapped.clear()


def _holds(p, host) -> bool:
    """Whether parameter p holds `host` now (p.data is a new alias at every access: compare where they point)."""
    return p.device == host.device and p.data_ptr() == host.data_ptr()


def planned(diffusion_model, streamed=host_pinned) -> list[StreamedBlock]:
    """plan() of the model's blocks, kept on the model while its weights have not moved (GENERATION_ATTR, bumped by
    StreamRoom's patchers at each load and unload) and every planned parameter still holds its host tensor."""
    generation = getattr(diffusion_model, GENERATION_ATTR, None)
    cached = getattr(diffusion_model, _PLAN_ATTR, None)
    if generation is not None and cached is not None and cached[0] == generation and \
            all(_holds(p, host) for b in cached[1] for p, host, _ in b.params):
        return cached[1]
    blocks = plan(blocks_in_order(diffusion_model), streamed)
    if generation is not None:
        setattr(diffusion_model, _PLAN_ATTR, (generation, blocks))
    return blocks


def run_streamed(executor, x, args, kwargs, copier_for=CudaCopier, streamed=host_pinned):
    """The DiT call with its host-held blocks streamed one block ahead (as the module docstring says); a plain call
    where nothing is on the host."""
    diffusion_model = executor.class_obj
    blocks = planned(diffusion_model, streamed)
    if not blocks:
        return executor(x, *args, **kwargs)
    streamer = Streamer(blocks, x.device, copier_for(x.device))
    handles = []
    try:
        for b in blocks:
            handles.append(b.block.register_forward_pre_hook(lambda m, _args: streamer.enter(m)))
            handles.append(b.block.register_forward_hook(lambda m, _args, _out: streamer.leave(m)))
        streamer.fetch(0)
        return executor(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        streamer.restore()
        streamer.copier.finish()


def _streaming_call(executor, x, *args, **kwargs):
    """DIFFUSION_MODEL wrapper (see run_streamed); dynamic VRAM's calls and calls off a CUDA GPU pass through."""
    topts = kwargs.get("transformer_options") or {}
    if topts.get("prefetch_dynamic_vbars") or not available(x.device):
        return executor(x, *args, **kwargs)
    return run_streamed(executor, x, args, kwargs)


def attach(patcher) -> bool:
    """Stream the patcher's host-held blocks a block ahead (replaces an earlier attach); False where switched off."""
    import comfy.patcher_extension as pe

    patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    if not enabled():
        return False
    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _streaming_call)
    return True


def detach(patcher) -> None:
    import comfy.patcher_extension as pe

    patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)


def attached(patcher) -> bool:
    import comfy.patcher_extension as pe

    return bool(patcher.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY))


class StreamRoom:
    """ModelPatcher mixin for the pack's non-dynamic patchers: a partial load leaves room for the streamer's buffers
    (SLOTS x the largest block), and every load and unload marks the DiT's weights as moved (GENERATION_ATTR)."""

    def _newbie_moved(self) -> None:
        dm = getattr(self.model, "diffusion_model", None)
        if dm is not None:
            setattr(dm, GENERATION_ATTR, getattr(dm, GENERATION_ATTR, 0) + 1)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        dm = getattr(self.model, "diffusion_model", None)
        if (not full_load and dm is not None and attached(self) and 0 < lowvram_model_memory < self.model_size()
                and comfy_pins()):  # unpinned host layers are not streamed: no buffers to make room for
            room = SLOTS * block_bytes(dm)
            lowvram_model_memory = max(self.model.model_loaded_weight_memory, lowvram_model_memory - room, 1)
        try:
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, **kwargs)
        finally:
            self._newbie_moved()

    def partially_unload(self, *args, **kwargs):
        try:
            return super().partially_unload(*args, **kwargs)
        finally:
            self._newbie_moved()

    def unpatch_model(self, *args, **kwargs):
        try:
            return super().unpatch_model(*args, **kwargs)
        finally:
            self._newbie_moved()
