"""The fp16 stress set: NewBie weights rescaled so that a plain fp16 run overflows where Next-DiT does in
practice, to prove the pack's fp16 path stays finite and accurate (tests and bench/fp16_accuracy.py)."""
from __future__ import annotations

import torch

# Where the pressure goes (see pipeline/precision.py): a residual stream far above fp16's 65504 (patch
# embedding scaled up), and SwiGLU/FFN outputs above it (w1, w3, w2 scaled up).
EMBED_GAIN = 3.0e4
FFN_GAIN = 40.0


def stress_state_dict(sd: dict) -> dict:
    out = dict(sd)
    for key, value in sd.items():
        if key.startswith("x_embedder."):
            out[key] = (value.float() * EMBED_GAIN).to(value.dtype)
        elif ".feed_forward.w" in key:
            out[key] = (value.float() * FFN_GAIN).to(value.dtype)
    return out


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp64; inf when a has non-finite values."""
    if not torch.isfinite(a).all():
        return float("inf")
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp(min=1e-30))
