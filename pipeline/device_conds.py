"""The sampling run's conditioning on the GPU, copied there once a run instead of at every DiT call.

ComfyUI keeps a prompt's conditioning where its text encoder left it, on the intermediate device (the CPU unless
ComfyUI runs with --gpu-only), and `BaseModel._apply_model` copies it to the GPU at every DiT call: the caption
(`cast_to_device`; for NewBie the Gemma caption, [1, L, 2560], converted to the model's dtype on the CPU first) and
each extra conditioning (`convert_tensor`: the Jina pooled text). That is two host-to-device copies from pageable
memory per call, 100 an image at 25 steps with CFG, each with its conversion on the CPU; a copy from pageable memory
may also make the CPU wait for the GPU to reach it (CUDA promises no asynchrony for pageable memory). Upstream's best
configuration in the bench, `--gpu-only`, has its conditioning on the GPU from the start.

A SAMPLER_SAMPLE wrapper (the loader attaches it) hands the sampler a copy of the run's processed conditionings
(`CFGGuider.conds`, after ComfyUI's `process_conds`) in which each CONDRegular (and subclass) holding a tensor
elsewhere holds it on the sampling device instead, made with the cond's own `_copy_with`, so it concatenates,
batches and slices as before. Everything else in a conditioning is shared as it was. The originals are put back when
the run ends, so nothing of it stays on the GPU. The arithmetic is unchanged: `_apply_model` still casts to the
model's dtype, now on the GPU, and a float32 to bf16 or fp16 conversion rounds to nearest even on either side.

Left as they are: a run on the CPU, a run with ComfyUI's multi-GPU clones (each device gets its own copies there),
and conditionings larger than MAX_BYTES together (a bounded cost; they are then copied per call as before).
NEWBIE_DEVICE_CONDS=0 turns it off (for comparisons; bench switch `hostconds`).

What it measured (H100, bench/results/NOTES.md, sixteenth session): the warm bf16 image took 3.58 and 3.51 s
against 3.66 s both rounds with the per-call copies (0.78x and 0.76x upstream's best against 0.80x, run77). In the
sampler in-process the CPU spent 9 ms a step outside the DiT calls instead of 69, and a step took 128.3 against
131.8 ms (run76): the CPU now waits for the GPU inside the calls, on a full launch queue, not before them.
"""
from __future__ import annotations

import torch

from . import env_switch

WRAPPER_KEY = "newbie_device_conds"
# At most this many bytes of conditioning held on the GPU for a run (NewBie's prompt pair is about 3 MB).
MAX_BYTES = 256 * 1024 ** 2


def _movable(cond, device) -> bool:
    """A CONDRegular (or subclass) whose tensor is elsewhere than `device`."""
    import comfy.conds

    tensor = getattr(cond, "cond", None)
    return (isinstance(cond, comfy.conds.CONDRegular) and isinstance(tensor, torch.Tensor)
            and tensor.device != device)


def _has_model_conds(c) -> bool:
    """A conditioning dict of ComfyUI's processed conditionings, with its model conditionings."""
    return isinstance(c, dict) and isinstance(c.get("model_conds"), dict)


def _entries(conds: dict):
    """Each conditioning dict of ComfyUI's processed conditionings ({"positive": [dict, ...], ...})."""
    for entries in conds.values():
        if isinstance(entries, list):
            yield from filter(_has_model_conds, entries)


def bytes_to_move(conds: dict, device) -> int:
    """Bytes of the tensors `on_device` would copy (each distinct tensor once)."""
    seen = {}
    for c in _entries(conds):
        for cond in c["model_conds"].values():
            if _movable(cond, device):
                seen[id(cond.cond)] = cond.cond.numel() * cond.cond.element_size()
    return sum(seen.values())


def on_device(conds: dict, device) -> dict:
    """A copy of `conds` whose model conditionings hold their tensors on `device` (each distinct tensor copied once);
    `conds` itself is left as it was."""
    copies: dict[int, torch.Tensor] = {}

    def moved(cond):
        if not _movable(cond, device):
            return cond
        tensor = copies.get(id(cond.cond))
        if tensor is None:
            tensor = copies[id(cond.cond)] = cond.cond.to(device)
        return cond._copy_with(tensor)

    out = {}
    for kind, entries in conds.items():
        if not isinstance(entries, list):
            out[kind] = entries
            continue
        out[kind] = [{**c, "model_conds": {k: moved(v) for k, v in c["model_conds"].items()}}
                     if _has_model_conds(c) else c for c in entries]
    return out


def applies(guider, noise, extra_args) -> bool:
    """Whether this run's conditionings go to its device: switched on, a GPU run without multi-GPU clones, some
    conditioning elsewhere, and no more than MAX_BYTES of it."""
    device = getattr(noise, "device", None)
    conds = getattr(guider, "conds", None)
    if not env_switch.switch("NEWBIE_DEVICE_CONDS", True) or device is None or device.type == "cpu":
        return False
    if not isinstance(conds, dict) or (extra_args or {}).get("model_options", {}).get("multigpu_clones"):
        return False
    return 0 < bytes_to_move(conds, device) <= MAX_BYTES


def _sample(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
            disable_pbar=False):
    """SAMPLER_SAMPLE wrapper: the sampler's run with the guider's conditionings on its device (`applies`)."""
    if not applies(guider, noise, extra_args):
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
    original = guider.conds
    guider.conds = on_device(original, noise.device)
    try:
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
    finally:
        guider.conds = original


def attach(patcher) -> None:
    """Give this model's sampling runs their conditioning on the GPU (replaces an earlier attach)."""
    import comfy.patcher_extension as pe

    patcher.remove_wrappers_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
    patcher.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, _sample)
