"""The FLUX VAE kept on the GPU beside a resident DiT, in ComfyUI's non-dynamic ModelPatcher (NEWBIE_VAE_RESIDENT=0
leaves it to ComfyUI's default patcher).

Where ComfyUI's dynamic VRAM is on (comfy-aimdo, v0.33), `comfy.sd.VAE` puts the VAE in the dynamic-VRAM patcher:
every decode prepares it again ("prepared for dynamic VRAM loading. 159MB Staged" once an image in the server's
log) and each layer fetches and casts its weight through aimdo as it runs. ComfyUI's own VAEs that must not be
offloaded get its plain ModelPatcher instead (`VAE.disable_offload`), which loads the weights once and keeps them
while the GPU has room. Where the pack's DiT stays resident (the loader's plan: its weights, a call's activations
and a 1024² decode fit), the VAE's 160 MB do too, so the pack gives its VAE that plain patcher, with the weights in
the dtype ComfyUI chose for them (the file's tensors are taken as they are under dynamic VRAM;
`loader.settle_weight_dtypes` converts them once, as for the DiT). Under a VRAM budget, or where the DiT streams,
the VAE stays with dynamic VRAM, which gives its memory back between decodes.
"""
from __future__ import annotations

import logging

from . import compat, env_switch

log = logging.getLogger(__name__)

SWITCH = "NEWBIE_VAE_RESIDENT"


def enabled() -> bool:
    return env_switch.switch(SWITCH, True)


def keep(vae, settle) -> bool:
    """Give ComfyUI's VAE object a non-dynamic ModelPatcher where it has a dynamic one and the switch is on; `settle`
    converts a model's weights to the dtypes its layers were built for. Returns whether it did."""
    if not enabled() or not compat.is_dynamic(vae.patcher):
        return False
    import comfy.model_patcher

    dynamic = vae.patcher
    settle(vae.first_stage_model)
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=dynamic.load_device,
                                                   offload_device=dynamic.offload_device)
    log.info("NewBie VAE: kept on the GPU between decodes (ComfyUI's non-dynamic patcher; %s=0 for dynamic VRAM)",
             SWITCH)
    return True
