"""How far batching a positive and a negative prompt of different lengths into one DiT call
(pipeline/cfg_batch.py) moves a sampling run, against the two separate calls ComfyUI makes without it: ComfyUI's
own sampler on a tiny model. tests/unit/test_cfg_batch.py bounds these figures; bench/cfg_batch_cpu_errors.py
prints them."""
from __future__ import annotations

import contextlib
import os

import torch

from . import stress

STEPS = 3


def model(dit: dict, precision: str = "fp32"):
    """(ModelPatcher, unet config) of a DiT state dict through the pack's loader, resident."""
    from .tiny_models import dit_patcher

    return dit_patcher(dict(dit), precision)


def prompts(cfg, positive: int, negative: int, seed: int = 5):
    """Random (cond, uncond) conditionings with captions of `positive` and `negative` tokens."""
    g = torch.Generator().manual_seed(seed)
    return tuple([[torch.randn(1, n, cfg["cap_feat_dim"], generator=g),
                   {"pooled_output": torch.randn(1, cfg["clip_text_dim"], generator=g)}]] for n in (positive, negative))


@contextlib.contextmanager
def environ(name: str, value: str):
    """The server-environment switch `name` (a NEWBIE_* variable) set to `value` for the duration."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def batching(mode: str):
    """The pack's batching mode (pipeline/cfg_batch.py `mode`: auto, always, off) for the duration."""
    return environ("NEWBIE_CFG_BATCH", mode)


def sample(patcher, cond, uncond, steps: int = STEPS, mode: str = "always"):
    """ComfyUI's sampler (euler_ancestral, CFG 5) with the pack's batching in `mode` (by default always: on a CPU
    the weights are resident, where `auto` keeps the prompts apart); returns (latent, batch size of each DiT
    call)."""
    import comfy.patcher_extension as pe
    import comfy.sample

    batches = []

    def count(executor, *args, **kwargs):
        batches.append(int(args[0].shape[0]))
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "devkit_count", count)
    try:
        latent = torch.zeros(1, 16, 8, 8)
        with batching(mode):
            out = comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, 1), steps, 5.0, "euler_ancestral",
                                      "simple", cond, uncond, latent, seed=1, disable_pbar=True)
    finally:
        patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, "devkit_count")
    return out, batches


def unbatched(patcher):
    """A clone of `patcher` without the pack's batching: prompts of different lengths run as two calls."""
    import comfy.patcher_extension as pe

    from pipeline import cfg_batch

    patcher = patcher.clone()
    patcher.remove_wrappers_with_key(pe.WrappersMP.CALC_COND_BATCH, cfg_batch.WRAPPER_KEY)
    return patcher


def batched_vs_separate(dit: dict, precision: str, positive: int = 12, negative: int = 5) -> dict:
    """Relative error of the batched run's latent against the separate calls', and the calls each made."""
    patcher, cfg = model(dit, precision)
    cond, uncond = prompts(cfg, positive, negative)
    batched, batches = sample(patcher, cond, uncond)
    separate, separate_batches = sample(unbatched(patcher), cond, uncond)
    return {"rel_error": stress.relative_error(batched, separate), "batched_calls": batches,
            "separate_calls": separate_batches}


def padding_attended_error(dit: dict, positive: int = 12, negative: int = 5) -> float:
    """The control: the batched fp32 run with the padding keys attended (the per-sample attention switched off),
    against the separate calls."""
    from pipeline import cfg_batch

    patcher, cfg = model(dit)
    cond, uncond = prompts(cfg, positive, negative)
    separate, _ = sample(unbatched(patcher), cond, uncond)
    split = cfg_batch.split_by_padding
    cfg_batch.split_by_padding = lambda *args: None
    try:
        attended, _ = sample(patcher, cond, uncond)
    finally:
        cfg_batch.split_by_padding = split
    return stress.relative_error(attended, separate)
