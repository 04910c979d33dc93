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


@functools.cache
def patcher_class():
    """The non-dynamic ModelPatcher with the cap applied in `load` (both host lines call `load` for every
    full or partial load: ModelPatcher.partially_load and LoadedModel.model_load end there)."""
    import comfy.model_patcher

    class NewBieBudgetModelPatcher(comfy.model_patcher.ModelPatcher):
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
            cap = getattr(self.model, "newbie_vram_budget", None)
            if cap:
                lowvram_model_memory, full_load = capped_load_memory(lowvram_model_memory, full_load, cap)
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, **kwargs)

    return NewBieBudgetModelPatcher


# How much of the DiT a VAE decode may push out of a resident DiT every image before streaming the DiT pays more.
# Measured on an H200 (bench/results/run29, run25, run20): at 8 GiB the bf16 DiT stayed resident and compiled,
# and each 1024² decode unloaded 1993 MB of it that the next image loaded again (decode 0.9 s against 0.15 s,
# the reload in the next sampling): 5.78 s an image, against 5.04 s for the DiT streamed under dynamic VRAM at
# 4 GiB in the same call. At 6 GiB the fp8 DiT (3.9 GB), resident and compiled, was partly unloaded at every decode
# too (run20's log; about 0.6 GB by this estimate) and still took 0.55x upstream's time (run25): a compiled fp8 call
# took 0.102 s against 0.140 s eager (run22), which pays for that.
TOLERATED_EVICTION = 1024 ** 3
# A DiT quantized into the pack's plain-op layers (pipeline/quantized_ops.py) loses more than compilation when it
# streams: streamed, it runs ComfyUI's quantized layers eager, which quantize every activation. At 6 GiB on an H200
# the fp8 DiT (3.6 GiB) streamed that way sampled 2.46 it/s, 1.59x upstream bf16's time (run44), where resident and
# compiled it had sampled 7.56 it/s, 0.55x (run25), with part of it evicted at every decode. Eviction is not free:
# ComfyUI syncs per module when it reloads and pins each weight it offloads, and losing about 1 GB a decode cost
# about 1 s an image (run46: 4.90 s at 6 GiB against 3.79 s at 8 GiB, where nothing left), 0.56x upstream all the
# same against 1.59x streamed; so such a DiT may lose up to 2 GiB.
TOLERATED_EVICTION_PLAIN_QUANTIZED = 2 * 1024 ** 3


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
