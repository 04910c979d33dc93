"""`vram_budget_gb`: a hard cap on how many bytes of the DiT's weights stay on the GPU.

For a GPU shared with other programs. ComfyUI's loaders size a model's residency from the memory free at load
time: the legacy loader takes what it finds and keeps it, and dynamic VRAM (comfy-aimdo, v0.33's default) pages
weights on demand with no per-model limit. With a budget the DiT is held by the legacy (non-dynamic) ModelPatcher
through the subclass below, whose `load` never asks for more than the budget; the layers beyond it stay in
system memory and are streamed in per call by ComfyUI's own lowvram casting (`comfy_cast_weights`), as on a
card that small. The budget lives on the model object, so it survives `clone()` (LoRA loaders, other patches).
"""
from __future__ import annotations

import functools

from . import block_stream, host_copies

GIB = 1024 ** 3


def budget_bytes(vram_budget_gb: float | None) -> int | None:
    """0 or None: no cap. Otherwise the cap in bytes (at least 1 MiB, so a tiny budget still means 'cap')."""
    if not vram_budget_gb or vram_budget_gb <= 0:
        return None
    return max(int(vram_budget_gb * GIB), 1024 ** 2)


def capped_load_memory(requested: float, full_load: bool, cap: int) -> tuple[float, bool]:
    """ComfyUI's `lowvram_model_memory` (0 = load everything) limited to `cap`; a capped load is never full."""
    if requested == 0 or requested > cap:
        return cap, False
    return requested, full_load


class HostCopyEviction:
    """ModelPatcher mixin for a DiT that stays on the GPU: what a partial unload pushes out leaves and comes back
    without copying the same bytes every image.

    What a partial unload pushes out is the room of a VAE decode, and the next image's sampling loads all of it
    back. Two things made that cost more than it must:
    - ComfyUI pins every weight its non-dynamic patcher offloads in `partially_unload` (cudaHostRegister) and unpins
      it at the next load: each weight pinned and unpinned once an image. Those pin requests are dropped here.
      Measured on an H200 at 8 GiB (bench/results/run54, same call, the 1024² decode evicting 1993 MB of the bf16
      DiT every image): 5.12 s an image with the pins against 4.48 s with ComfyUI's --disable-pinned-memory (decode
      1.10 s against 0.60 s). Dropping them (run55, another machine): 4.97 s against 4.99 s.
    - The unload copies the weights to fresh pageable memory and the load copies them back. pipeline/host_copies.py
      keeps the first unload's copies (pinned, once) and hands them back at later unloads of the unchanged weights.
      Measured on an H100 at 8 GiB (run56, run57, same calls): 4.28 and 4.01 s an image against 5.58 and 4.67 s
      with NEWBIE_HOST_COPIES=0 (decode 0.35 and 0.28 s against 1.24 and 0.68 s).
    Weights a partial *load* leaves on the host (streamed at every call) are still pinned as ComfyUI does."""

    newbie_evicting = False

    def partially_unload(self, *args, **kwargs):
        self.newbie_evicting = True
        try:
            with host_copies.offloading(self.model, keep_new=True):
                return super().partially_unload(*args, **kwargs)
        finally:
            self.newbie_evicting = False

    def unpatch_model(self, *args, **kwargs):
        with host_copies.offloading(self.model, keep_new=False):
            return super().unpatch_model(*args, **kwargs)

    def load(self, *args, **kwargs):
        resting = host_copies.resting(self.model)
        try:
            return super().load(*args, **kwargs)
        finally:
            host_copies.relink(self.model, resting)

    def patch_weight_to_device(self, key, *args, **kwargs):
        force_cast = kwargs.get("force_cast", args[3] if len(args) > 3 else False)  # v0.33's fourth option
        if key in self.patches or force_cast:
            host_copies.forget(self.model, key)
        return super().patch_weight_to_device(key, *args, **kwargs)

    def patch_hook_weight_to_device(self, hooks, combined_patches, key, *args, **kwargs):
        host_copies.forget(self.model, key)
        return super().patch_hook_weight_to_device(hooks, combined_patches, key, *args, **kwargs)

    def pin_weight_to_device(self, key):
        if self.newbie_evicting:
            return None
        return super().pin_weight_to_device(key)


@functools.cache
def resident_patcher_class():
    """ComfyUI's non-dynamic ModelPatcher for a DiT the loader keeps on the GPU, whole (resident) or in part (the
    rest streamed a block ahead, pipeline/block_stream.py), with `HostCopyEviction` and `block_stream.StreamRoom`."""
    import comfy.model_patcher

    class NewBieResidentModelPatcher(block_stream.StreamRoom, HostCopyEviction, comfy.model_patcher.ModelPatcher):
        pass

    return NewBieResidentModelPatcher


@functools.cache
def patcher_class():
    """The non-dynamic ModelPatcher with the cap applied in `load` (both host lines call `load` for every
    full or partial load: ModelPatcher.partially_load and LoadedModel.model_load end there), and
    `HostCopyEviction` (a decode's eviction of its resident part comes back at the next load, as for a resident DiT)."""
    import comfy.model_patcher

    class NewBieBudgetModelPatcher(block_stream.StreamRoom, BudgetCap, HostCopyEviction,
                                   comfy.model_patcher.ModelPatcher):
        pass

    return NewBieBudgetModelPatcher


class BudgetCap:
    """ModelPatcher mixin: every load keeps at most the model's `newbie_vram_budget` bytes of weights on the GPU. It
    comes after block_stream.StreamRoom, which leaves room for the streamer's buffers out of what ComfyUI offers, so
    the user's cap counts weights only, as before the streamer."""

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        cap = getattr(self.model, "newbie_vram_budget", None)
        if cap:
            lowvram_model_memory, full_load = capped_load_memory(lowvram_model_memory, full_load, cap)
        return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, **kwargs)


# How much of a resident DiT a VAE decode may push out every image before the loader streams the DiT instead. Evicting
# is not free: ComfyUI syncs per module when it unloads, pins each weight it offloads, and loads it all again at the
# next sampling run. But streaming costs more, because a streamed DiT runs eager (compiled blocks need resident
# weights) and fetches part of its weights at every call. Measured on an H200, same call (bench/results/run53): at 8
# GiB the bf16 DiT resident and compiled lost 1993 MB at every 1024² decode (decode 1.2 s against 0.15 s, sampling
# 3.92 s against about 3.3 s unconstrained): 5.36 s an image, against 7.20 s for the default of the time, the DiT
# streamed eager under dynamic VRAM (upstream 6.48 s). That is about 0.85 s a GB evicted against 3.6 s for streaming,
# a break-even near 4 GB; about a third of it was ComfyUI pinning the evicted weights, which the pack's patchers no
# longer do (`HostCopyEviction`, run54/run55), and from the second image on they copy nothing either way (host copies,
# run56/run57), so the break-even is higher now. The fp8 DiT told the same at 6 GiB (run44, run46: about 1 GB evicted
# an image, 0.56x upstream, against 1.59x streamed). An earlier rule (1 GiB, from run29's 5.78 s resident at 8 GiB
# against 5.04 s streamed at 4 GiB) predates the fixes that made both paths faster and took a recompile after each
# decode away (block_compile.own_cast_state). 3 GiB covers a 1024² decode (2.6 GiB by vae_memory's estimate) with room
# to spare under the break-even; a larger decode still counts against the room.
TOLERATED_EVICTION = 3 * 1024 ** 3


def decode_eviction(weight_bytes: int, room: int, decode_bytes: int, reserve: int = 0) -> int:
    """Bytes of a resident DiT's `weight_bytes` that a decode needing `decode_bytes` (and ComfyUI's `reserve`) pushes
    out of `room` (room_for_weights) every image; ComfyUI loads them back for the next. A lower bound: ComfyUI
    also frees room for the VAE's weights (1993 MB left at 8 GiB in run54 where this gives about 1.4 GiB)."""
    return max(0, weight_bytes + decode_bytes + reserve - room)


def room_beside_decode(room: int, decode_bytes: int, tolerated: int = TOLERATED_EVICTION) -> int:
    """The room a resident DiT (weights and a call's activations) may plan on: `room` less the part of a decode's
    `decode_bytes` beyond `tolerated`, which would otherwise evict it every image."""
    return room - max(0, decode_bytes - tolerated)


def room_for_weights(device) -> int:
    """Bytes a model could take on `device` now: the free memory plus what ComfyUI's loaded models hold there
    (it unloads those when a model needs the room)."""
    import comfy.model_management as mm

    held = sum(m.model_loaded_memory() for m in mm.current_loaded_models
               if getattr(m, "device", None) == device and hasattr(m, "model_loaded_memory"))
    return int(mm.get_free_memory(device)) + int(held)
