"""The FLUX VAE in diffusers' AutoencoderKL layout, for the tiny official-folder fixtures.

The product never converts the VAE: ComfyUI's VAE reads the diffusers layout itself (comfy/sd.py runs
comfy.diffusers_convert.convert_vae_state_dict). The fixtures need the opposite direction, and take it from the same
source: ComfyUI's own name map (`vae_conversion_map`, `vae_conversion_map_attn`), applied backwards. Every written
state dict is converted forward again by ComfyUI's converter and must give back the input exactly, so a map that
ComfyUI changes shows up here as an error rather than as a fixture ComfyUI cannot read.
"""
from __future__ import annotations

import re

import torch

# Name pieces only ComfyUI's layout has: a key still holding one after the map was not converted.
_COMFY_ONLY = re.compile(r"\.(down|up|block|mid)\.|nin_shortcut|(?<!conv_)norm_out|attn_1|\.upsample\.|\.downsample\.")
_ATTN = "mid.attn_1."
# ComfyUI's attention names -> the current diffusers names (its map also accepts older diffusers spellings).
_ATTN_TO_DIFFUSERS = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def _diffusers_key(key: str, conversion_map) -> str:
    if _ATTN in key:
        head, tail = key.split(_ATTN, 1)
        for ours, theirs in _ATTN_TO_DIFFUSERS.items():
            if tail.startswith(ours):
                tail = theirs + tail[len(ours):]
                break
        key = head + _ATTN + tail
    for sd_part, hf_part in reversed(conversion_map):
        key = key.replace(sd_part, hf_part)
    return key


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI VAE keys (AutoencodingEngine: encoder.* / decoder.*) -> diffusers AutoencoderKL keys; the attention's
    1x1 convolutions become Linear weights. Checked against ComfyUI's converter before returning."""
    from comfy import diffusers_convert

    out = {}
    for key, value in sd.items():
        if _ATTN in key and key.endswith(".weight") and value.ndim == 4 and key.split(_ATTN)[1].split(".")[0] != "norm":
            value = value.reshape(value.shape[0], value.shape[1])
        out[_diffusers_key(key, diffusers_convert.vae_conversion_map)] = value
    unmapped = sorted(k for k in out if _COMFY_ONLY.search(k))
    if unmapped:
        raise ValueError(f"VAE fixture: ComfyUI's map has no diffusers name for {unmapped[:8]}")
    back = diffusers_convert.convert_vae_state_dict(dict(out))
    if back.keys() != sd.keys() or any(back[k].shape != sd[k].shape or not torch.equal(back[k], sd[k]) for k in sd):
        wrong = sorted(set(sd) ^ set(back))[:8]
        raise ValueError(f"VAE fixture: ComfyUI's converter does not give the input back (keys differing: {wrong})")
    return out
