"""A VAE decode's eviction of a resident DiT, image after image, through ComfyUI's own patcher methods: for the
tests of pipeline/host_copies.py (CPU) and its check on a GPU (`python3 -m devkit.eviction_cycles`, which prints a
JSON verdict and exits non-zero where the pack's patcher gives other outputs than ComfyUI's)."""
from __future__ import annotations

import json
import sys

import torch

from . import tiny_models
from .dit_calls import dit_call, dit_inputs


def resident(parts, cls, device, precision="bf16", inplace=False):
    """The tiny DiT in patcher class `cls`, loaded on `device` by ComfyUI (offloaded to the CPU)."""
    import comfy.model_management as mm

    from pipeline import loader

    built, unet_config, _, _ = loader.build_model(parts, precision, dynamic=False)
    patcher = cls(built.model, load_device=device, offload_device=torch.device("cpu"),
                  weight_inplace_update=inplace)
    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher, unet_config


def cycle(patcher, share=3) -> int:
    """One image's worth: ComfyUI's partial unload of 1/`share` of the weights (a decode's room, as its
    free_memory asks for it), then its load for the next image. Returns the bytes the unload freed."""
    import comfy.model_management as mm

    freed = patcher.partially_unload(patcher.offload_device, memory_to_free=patcher.model_size() // share)
    mm.load_models_gpu([patcher], force_full_load=True)
    return freed


def a_patch(patcher, scale=0.5):
    """A clone with a 'diff' weight patch on every attention output projection (a LoRA's place)."""
    clone = patcher.clone()
    keys = [k for k in clone.model_state_dict() if k.endswith("attention.out.weight")]
    sd = clone.model_state_dict()
    clone.add_patches({k: (torch.full_like(sd[k], 0.01, device="cpu"),) for k in keys}, scale)
    return clone, keys


def compare(device: torch.device) -> dict:
    """ComfyUI's ModelPatcher and the pack's resident patcher through the same images: resident outputs, outputs
    after repeated evictions, a patched clone (in-place weight updates) and the base model again."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from pipeline import host_copies, vram_budget

    parts = tiny_models.in_memory_parts()
    verdict = {"device": str(device), "outputs_equal": {}}
    runs = {}
    for name, cls in (("comfy", comfy.model_patcher.ModelPatcher), ("pack", vram_budget.resident_patcher_class())):
        patcher, cfg = resident(parts, cls, device, inplace=True)
        inputs = dit_inputs(cfg, device)
        outs = [dit_call(patcher, cfg, inputs)]
        for _ in range(3):
            cycle(patcher)
            outs.append(dit_call(patcher, cfg, inputs))
        clone, _ = a_patch(patcher)  # ComfyUI unloads the base model to load the clone: the same weights
        mm.load_models_gpu([clone], force_full_load=True)
        outs.append(dit_call(clone, cfg, inputs))
        cycle(clone)
        outs.append(dit_call(clone, cfg, inputs))
        mm.load_models_gpu([patcher], force_full_load=True)
        outs.append(dit_call(patcher, cfg, inputs))
        cycle(patcher)
        outs.append(dit_call(patcher, cfg, inputs))
        runs[name] = [o.cpu() for o in outs]
        copies = getattr(patcher.model, "newbie_host_copies", None)
        if copies is not None:
            verdict["kept_bytes"], verdict["copied_bytes"] = copies.kept_bytes, copies.copied_bytes
            verdict["pinned"] = len(copies.pinned)
        mm.unload_all_models()
        del patcher, clone
    labels = ["resident", "evicted1", "evicted2", "evicted3", "patched", "patched_evicted", "base_again",
              "base_evicted"]
    for label, a, b in zip(labels, runs["comfy"], runs["pack"]):
        verdict["outputs_equal"][label] = bool(torch.equal(a, b))
    verdict["patch_changes_output"] = not torch.equal(runs["pack"][0], runs["pack"][4])
    verdict["ok"] = (all(verdict["outputs_equal"].values()) and verdict["patch_changes_output"]
                     and verdict.get("kept_bytes", 0) > 0 and host_copies.enabled())
    return verdict


if __name__ == "__main__":
    v = compare(torch.device("cuda"))
    print(json.dumps(v))
    sys.exit(0 if v["ok"] else 1)
