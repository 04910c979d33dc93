"""The pack's hand-written Triton kernels as `torch.library.triton_op`s (pipeline/swiglu_fp8.py, pipeline/qkv_rope.py):
registered where this PyTorch has `triton_op`, and used only where Triton can run them."""
from __future__ import annotations

import torch


def register(name: str):
    """A decorator: the function as the `triton_op` `name` where this PyTorch has it (2.6 and newer); else None, and
    the kernel is not used."""
    def wrap(fn):
        return torch.library.triton_op(name, mutates_args=())(fn) if hasattr(torch.library, "triton_op") else None
    return wrap


def available(device) -> bool:
    """Whether Triton kernels can run for a model on `device`: a CUDA device with Triton."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on(device, op) -> bool:
    """Whether `op` (a `register`ed op, or None) can run for a model on `device`: a CUDA device with Triton."""
    return op is not None and available(device)
