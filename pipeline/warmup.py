"""Taking the first-run cost before the real job: weights staged on the GPU, kernels chosen, allocator grown.

The warm-up runs exactly the code paths of a real job at the requested size, through ComfyUI's own entry
points: one sampling step of the model at that latent size with a CFG batch (comfy.sample.sample), a text
encode if a CLIP is given, a VAE decode of a latent of that size if a VAE is given. It uses its own seeded
generator and dummy inputs, and returns nothing to the graph but a report, so it cannot change any output.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


def _dummy_conditioning(model, tokens: int):
    cfg = model.model.model_config.unet_config
    cond = torch.zeros(1, tokens, cfg.get("cap_feat_dim", 2560))
    extra = {}
    if cfg.get("clip_text_dim"):
        extra["pooled_output"] = torch.zeros(1, cfg["clip_text_dim"])
    return [[cond, extra]]


def warm_up(model, width: int, height: int, batch_size: int = 1, steps: int = 2, clip=None, vae=None,
            tokens: int = 128) -> str:
    import comfy.model_management as mm
    import comfy.sample

    lines = []
    t_all = time.perf_counter()
    if clip is not None:
        t = time.perf_counter()
        clip.encode_from_tokens_scheduled(clip.tokenize("warm-up " * (tokens // 2)))
        lines.append(f"text encoders: {time.perf_counter() - t:.2f} s")
    latent_format = model.get_model_object("latent_format")
    channels = getattr(latent_format, "latent_channels", 16)
    latent = torch.zeros(batch_size, channels, height // 8, width // 8)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(latent.shape, generator=gen)
    cond = _dummy_conditioning(model, tokens)
    t = time.perf_counter()
    import comfy.utils

    pbar = comfy.utils.ProgressBar(steps)  # the warm-up's steps drive ComfyUI's progress bar like a real job's
    samples = comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", cond, cond, latent,
                                  disable_pbar=True, seed=0,
                                  callback=lambda step, x0, x, total: pbar.update_absolute(step + 1, total))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    lines.append(f"model: {steps} steps at {width}x{height} (batch {batch_size}, CFG) in {time.perf_counter() - t:.2f} s")
    if vae is not None:
        t = time.perf_counter()
        vae.decode(latent_format.process_out(samples.to(torch.float32)))
        lines.append(f"VAE decode at {width}x{height}: {time.perf_counter() - t:.2f} s")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"GPU memory after warm-up: {(total - free) / 2**30:.2f} GiB used of {total / 2**30:.1f} GiB "
                     f"(reserved by PyTorch {torch.cuda.memory_reserved() / 2**30:.2f} GiB)")
    lines.append(f"total {time.perf_counter() - t_all:.2f} s on {mm.get_torch_device()}")
    report = "\n".join(lines)
    log.info("NewBie warm-up:\n%s", report)
    return report
