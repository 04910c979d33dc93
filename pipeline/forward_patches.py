"""Forwards of the DiT's own modules replaced through ComfyUI's object patches, which ComfyUI undoes when it unpatches
the model (pipeline/swiglu_fp8.py, pipeline/qkv_rope.py)."""
from __future__ import annotations

import types
from typing import Callable, Iterable

import torch


def patch_forwards(patcher, modules: Iterable[tuple[str, torch.nn.Module]], forward: Callable) -> int:
    """Give each (name, module) of the patcher's diffusion model `forward`, bound to the module as a method: one
    function for all of them, so that Dynamo's guard on it holds across blocks (run94). Returns how many."""
    n = 0
    for name, module in modules:
        patcher.add_object_patch(f"diffusion_model.{name}.forward", types.MethodType(forward, module))
        n += 1
    return n
