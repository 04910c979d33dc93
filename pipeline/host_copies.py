"""Host copies of the weights a VAE decode pushes out of a resident DiT, kept for the next decode.

At 8 GiB a resident 16-bit DiT and a 1024² VAE decode do not fit together. Before each decode ComfyUI's
`partially_unload` moves about 2 GB of the DiT's layers to the CPU (`module.to(offload_device)`: a copy into fresh
pageable memory), and the next image's sampling run loads them back. The weights have not changed in between, so
from the second image on both copies are waste. `HostCopies` keeps what the first eviction copied out, pinned
through ComfyUI's `pin_memory` (within its pinned-memory limit, where it allows), and when ComfyUI later moves the
same unchanged weight off the GPU again, it hands that copy back instead of copying: the unload frees the GPU memory
without a transfer, and the reload reads pinned memory.

"Unchanged" is decided without reading the weights. A weight is linked to its host copy by the load that brings it
from that copy to the GPU; the link holds its address, and a weight at another address is not the linked one. The
copy is forgotten when one of ComfyUI's ways
of changing a weight touches the key: `patch_weight_to_device` (LoRA and other weight patches, forced casts) and
hook patches. The patcher mixin in vram_budget.py reports those; nothing else in ComfyUI writes a model's weights.

The interception is a TorchFunctionMode, active only inside the pack's patchers' `partially_unload` and
`unpatch_model`. It sees the `Tensor.to` that ComfyUI's `module.to` applies to each parameter; ComfyUI's code runs
unchanged. The price is host memory: the kept copies (about 2 GB at 8 GiB) stay in RAM while their weights are
back on the GPU. NEWBIE_HOST_COPIES=0 turns this off.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref

import torch
from torch.overrides import TorchFunctionMode

from . import env_switch

log = logging.getLogger(__name__)

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not quantized tensor subclasses: their `to` is their own


def enabled() -> bool:
    return env_switch.switch("NEWBIE_HOST_COPIES", True)


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type != "cpu"


def _weight(model, key: str):
    try:
        return functools.reduce(getattr, key.split("."), model)
    except AttributeError:
        return None


def _pin(t: torch.Tensor) -> bool:
    import comfy.model_management as mm

    return bool(mm.pin_memory(t))


def _unpin(t: torch.Tensor) -> None:
    import comfy.model_management as mm

    mm.unpin_memory(t)


class HostCopies:
    """One model's kept host copies, by ComfyUI weight key. `on_device` tells a weight on the load device from one
    on the host (the CPU tests set their own)."""

    def __init__(self):
        self.on_device = _on_device
        self.copies: dict[str, torch.Tensor] = {}
        self.links: dict[str, int] = {}  # key -> address of the weight on the device loaded from the copy
        self.pinned: set[str] = set()
        self.kept_bytes = 0  # moved off the device without a copy
        self.copied_bytes = 0  # moved off the device by a copy
        self.announced = False

    def forget(self, key: str) -> None:
        self.links.pop(key, None)
        copy = self.copies.pop(key, None)
        if key in self.pinned:
            self.pinned.discard(key)
            _unpin(copy)

    def release(self) -> None:
        for key in list(self.copies):
            self.forget(key)

    def resting(self, model) -> set[str]:
        """Before a load: the keys whose weight is on the host as its kept copy."""
        out = set()
        for key, copy in self.copies.items():
            w = _weight(model, key)
            if w is not None and not self.on_device(w) and w.data_ptr() == copy.data_ptr():
                out.add(key)
        return out

    def relink(self, model, resting: set[str]) -> None:
        """After a load: link each weight the load brought to the device from its copy (`resting` before it). A
        weight linked before keeps its link while it is the same tensor; a copy whose weight is anything else now
        is forgotten."""
        for key, copy in list(self.copies.items()):
            w = _weight(model, key)
            if w is None or w.shape != copy.shape or w.dtype != copy.dtype:
                self.forget(key)
            elif not self.on_device(w):
                if w.data_ptr() != copy.data_ptr():
                    self.forget(key)
                else:
                    self.links.pop(key, None)  # still on the host, as this copy
            elif key in resting:
                self.links[key] = w.data_ptr()
            elif self.links.get(key) != w.data_ptr():
                self.forget(key)

    def offload(self, key: str, t: torch.Tensor, func, args, kwargs, keep_new: bool):
        """ComfyUI's `t.to(...)` of weight `key`: its kept copy where that is valid, else the copy made now (kept
        for the next time when `keep_new`)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if device is None or device.type != "cpu" or (dtype is not None and dtype != t.dtype) \
                or type(t) not in _PLAIN or not self.on_device(t):
            return func(*args, **kwargs)
        copy = self.copies.get(key)
        if copy is not None and self.links.get(key) == t.data_ptr() and copy.shape == t.shape \
                and copy.dtype == t.dtype:
            self.kept_bytes += copy.nbytes
            return copy
        out = func(*args, **kwargs)
        self.forget(key)
        self.copied_bytes += out.nbytes
        if keep_new and out.is_contiguous():
            self.copies[key] = out = out.detach()
            if _pin(out):
                self.pinned.add(key)
        return out

    def kept_size(self) -> int:
        return sum(c.nbytes for c in self.copies.values())


class _Offloading(TorchFunctionMode):
    def __init__(self, copies: HostCopies, model, keep_new: bool):
        super().__init__()
        self.copies, self.model, self.keep_new = copies, model, keep_new
        self.keys = {id(p): name for name, p in model.named_parameters()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args:
            key = self.keys.get(id(args[0]))
            # the identity check: a parameter ComfyUI replaced during the unload may reuse a freed one's id
            if key is not None and _weight(self.model, key) is args[0]:
                return self.copies.offload(key, args[0], func, args, kwargs, self.keep_new)
        return func(*args, **kwargs)


def _kept(model) -> HostCopies | None:
    return getattr(model, "newbie_host_copies", None)


def of(model) -> HostCopies:
    """The model's host copies (made on first use; released with the model)."""
    copies = _kept(model)
    if copies is None:
        copies = HostCopies()
        model.newbie_host_copies = copies
        # unpinned through ComfyUI when the model goes; at the server's exit the process's memory goes anyway
        weakref.finalize(model, copies.release).atexit = False
    return copies


@contextlib.contextmanager
def offloading(model, keep_new: bool):
    """Inside: weights ComfyUI moves off the device leave as their kept copies where those are valid; with
    `keep_new`, the copies made are kept (a partial unload's, which the next image loads back)."""
    if not enabled():
        yield
        return
    copies = of(model)
    with _Offloading(copies, model, keep_new):
        yield
    if keep_new and copies.copies and not copies.announced:
        copies.announced = True
        log.info("NewBie DiT: keeping host copies of the %.2f GB a partial unload moved off the GPU (%s): later "
                 "unloads drop them without copying, and loads read them back", copies.kept_size() / 1e9,
                 "pinned" if copies.pinned else "not pinned")


# The patchers' hooks below act on copies a model already has; they make none.
def forget(model, key: str) -> None:
    """Weight `key` is about to change: its copy no longer stands for it."""
    if (copies := _kept(model)) is not None:
        copies.forget(key)


def resting(model) -> set[str]:
    return copies.resting(model) if (copies := _kept(model)) is not None else set()


def relink(model, resting_keys: set[str]) -> None:
    if (copies := _kept(model)) is not None:
        copies.relink(model, resting_keys)
