"""The FLUX VAE's decode memory, as measured, for ComfyUI's planning.

Before a decode ComfyUI frees `VAE.memory_used_decode(shape, dtype)` bytes, unloading model weights to make room.
For the FLUX VAE (any AutoencoderKL) it plans 2178 * 64 bytes per latent pixel and dtype byte: 4.25 GiB at 1024x1024
in bf16. Measured on an H200 (bench/vae_memory.py, bench/results/run16-vae_memory.json) the decode's peak above its
weights is 70,200 bytes per latent pixel and dtype byte, the same at 512..2048 px and in bf16, fp16 and fp32: half
the plan. Under a VRAM cap the surplus evicts DiT weights that the next image must load again (at 8 GiB, 3.7 GB of
the DiT left and came back for every image).

`fit` sets the instance's estimate to the measurement with a 20 % margin (other GPUs choose other convolution
algorithms and workspaces). If a GPU ever needs more, ComfyUI's decode catches the out-of-memory error and
retries tiled: an estimate that is too low costs time, never the image.
"""
from __future__ import annotations

MEASURED_BYTES_PER_LATENT_PIXEL = 70_200  # per dtype byte; peak above the weights
MARGIN = 1.2
BYTES_PER_LATENT_PIXEL = int(MEASURED_BYTES_PER_LATENT_PIXEL * MARGIN)


def decode_bytes(shape, dtype) -> int:
    """Bytes a FLUX VAE decode of a latent `shape` (B, C, H, W) needs beyond its weights, in `dtype`."""
    import comfy.model_management as mm

    return BYTES_PER_LATENT_PIXEL * int(shape[-2]) * int(shape[-1]) * mm.dtype_size(dtype)


DEFAULT_LATENT = (1, 16, 128, 128)  # a 1024x1024 image, NewBie's native size


def default_decode_bytes(device) -> int:
    """What decoding one 1024x1024 image needs on `device` beyond the VAE's weights, in the dtype ComfyUI picks
    for the FLUX VAE there (bf16, or fp32 on GPUs without it)."""
    import comfy.model_management as mm
    import torch

    return decode_bytes(DEFAULT_LATENT, mm.vae_dtype(device, [torch.bfloat16, torch.float32]))


def fit(vae) -> None:
    """Give ComfyUI's VAE object (the FLUX VAE) the measured decode estimate. ComfyUI sets `memory_used_decode` per
    instance for each VAE kind; the pack sets its own VAE's, nothing else. Encoding keeps ComfyUI's estimate."""
    vae.memory_used_decode = decode_bytes
