"""The adapter to ComfyUI's memory functions: rungs 1-3 of the ladder through `comfy.model_management` and the
ModelPatcher (feature-checked on the host), and what counts as an out-of-memory error there."""
from __future__ import annotations

import gc
import sys
from typing import Sequence

import torch

from .. import compat
from .report import fmt_bytes


def model_management():
    """ComfyUI's model management when running inside ComfyUI (already imported there); None elsewhere.
    Never imported from here: importing it outside a host would initialise devices as a side effect."""
    return sys.modules.get("comfy.model_management")


def is_oom(error: BaseException) -> bool:
    """`comfy.model_management.is_oom`, or its `OOM_EXCEPTION` where a host has no `is_oom`."""
    mm = model_management()
    check = getattr(mm, "is_oom", None)
    if check is not None:
        return bool(check(error))
    return isinstance(error, getattr(mm, "OOM_EXCEPTION", torch.OutOfMemoryError))


class ComfyMemory:
    """Rungs 1-3 on one device. `in_use`: other ModelPatchers the running job needs (a sampling run's
    ControlNets and the like), which rung 2 must not unload."""

    def __init__(self, patcher, device, in_use: Sequence = ()):
        self.patcher = patcher
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mm = model_management()
        self.in_use = [p for p in (patcher, *in_use) if p is not None]
        patches_models = getattr(patcher, "model_patches_models", None)
        if patches_models is not None:
            self.in_use += list(patches_models())

    def _keep(self, loaded) -> bool:
        model = loaded.model  # a weak reference on some hosts: None once the patcher is gone
        if model is None:
            return False
        return any(model is p or getattr(model, "model", None) is getattr(p, "model", False) for p in self.in_use)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def free_bytes(self) -> int | None:
        get = getattr(self.mm, "get_free_memory", None)
        return int(get(self.device)) if get else None

    def total_bytes(self) -> int | None:
        get = getattr(self.mm, "get_total_memory", None)
        return int(get(self.device)) if get else None

    def empty_cache(self) -> str:
        before = self.free_bytes()
        gc.collect()
        if self.on_cpu:
            return "collected garbage (no allocator cache to empty on the CPU)"
        if self.mm is not None:
            self.mm.soft_empty_cache()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"emptied the allocator cache ({_gain(before, self.free_bytes())})"

    def free_other_models(self) -> str:
        if self.on_cpu or self.mm is None:
            return "unloaded no other models (they live in CPU memory)"
        keep = [lm for lm in getattr(self.mm, "current_loaded_models", []) if self._keep(lm)]
        before = self.free_bytes()
        unloaded = self.mm.free_memory(1e32, self.device, keep_loaded=keep) or []
        self.mm.soft_empty_cache()
        return f"unloaded {len(unloaded)} other model(s) from {self.device} ({_gain(before, self.free_bytes())})"

    def offload_weights(self, amount: int | None) -> str:
        patcher = self.patcher
        if self.on_cpu or patcher is None or patcher.load_device.type == "cpu":
            return "offloaded no weights (the model runs on the CPU)"
        loaded = compat.loaded_size(patcher)
        if not loaded or not compat.can_partially_unload(patcher):
            return "offloaded no weights (none of this model's weights are on the device)"
        amount = min(loaded, max(int(amount or 0), loaded // 4))
        freed = patcher.partially_unload(patcher.offload_device, amount)
        self.mm.soft_empty_cache()
        return (f"moved {fmt_bytes(freed)} of this model's weights to {patcher.offload_device} "
                f"({fmt_bytes(patcher.loaded_size())} stay on {self.device}; they stream in per layer)")


def _gain(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "free memory unknown"
    return f"{fmt_bytes(max(0, after - before))} more free, {fmt_bytes(after)} free now"
