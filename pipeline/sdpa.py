"""The scaled-dot-product attention NewBie's DiT runs: PyTorch SDPA with cuDNN's attention tried first.

Upstream ComfyUI (comfy/ops.py) puts FlashAttention-2 first, and PyTorch's own order differs between versions
(2.11 picked cuDNN on an H200). On Hopper cuDNN's fused attention is faster at NewBie's shapes (24 heads of 96 over
~4.3k tokens): 35 against 47 ms of attention a CFG step, the same error against fp32 (bench/attention_backends.py,
run30), where attention is about a third of a step's GPU time. The order is a priority list, not a restriction:
where cuDNN declines an input (a mask it cannot take, an old GPU, a CPU tensor) PyTorch takes the next backend,
so the result is the same attention up to rounding.

`NEWBIE_SDPA` chooses the order, read at each call (a compiled block bakes the order in when it is traced):
`auto` (cuDNN first on CUDA GPUs of compute capability 9.0 or newer), `cudnn`, `flash`, or `torch` (PyTorch's
own order, untouched).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import env_switch

MODES = ("auto", "cudnn", "flash", "torch")


def mode() -> str:
    value = env_switch.value("NEWBIE_SDPA", "auto")
    return value if value in MODES else "auto"


def _priority_supported() -> bool:
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        return False
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


_HAS_PRIORITY = _priority_supported()


def _hopper_or_newer(index) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _order(first: str):
    from torch.nn.attention import SDPBackend as B

    head = [B.CUDNN_ATTENTION, B.FLASH_ATTENTION] if first == "cudnn" else [B.FLASH_ATTENTION, B.CUDNN_ATTENTION]
    return head + [B.EFFICIENT_ATTENTION, B.MATH]


def first_backend(device: torch.device) -> str | None:
    """The backend put first for tensors on `device` ("cudnn" or "flash"), None for PyTorch's own order."""
    m = mode()
    if m == "torch" or device.type != "cuda" or not _HAS_PRIORITY:
        return None
    if m == "auto":
        return "cudnn" if _hopper_or_newer(device.index) else None
    return m


@torch.compiler.assume_constant_result
def _first_backend_constant(device: torch.device) -> str | None:
    """first_backend as a compiled block traces it: evaluated once and baked in, so Dynamo neither guards on the
    environment nor traces the capability check (a tuple comparison there broke the trace on an H200)."""
    return first_backend(device)


def sdpa(q, k, v, attn_mask=None):
    """F.scaled_dot_product_attention(q, k, v, attn_mask) ([B, H, N, D]) in the backend order `first_backend`."""
    first = _first_backend_constant(q.device)
    if first is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_order(first), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
