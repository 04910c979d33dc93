"""A sampling run without a host sync per step: the Euler-ancestral loop gets its noise levels on the CPU.

ComfyUI moves the sampling run's sigmas to the GPU (`CFGGuider.outer_sample`), and k-diffusion's Euler-ancestral
loop for flow models (`sample_euler_ancestral_RF`, which `sample_euler_ancestral` runs for them, and the pack's
sampler node) asks `if sigmas[i + 1] == 0` at every step: a host read of a GPU value, which waits for the whole
step to finish. The GPU then sits idle while the CPU issues the next step's first kernels. Given the same sigmas
on the CPU, that comparison and the step's coefficients are computed on the host, and the CPU runs ahead across
steps.

Nothing else changes: each step's arithmetic is the same float32 operations on 0-dim tensors, on the host instead
of the GPU (IEEE float32 gives the same results for these: +, -, *, / and the square root that `** 0.5` becomes),
and a 0-dim tensor multiplies a GPU tensor as a scalar. The model still gets its sigma on the GPU (`sigmas[i] *
s_in`, s_in on the GPU). ComfyUI's `transformer_options["sample_sigmas"]` stays on the GPU. Measured on an H100
(bench/results/NOTES.md, runs 66-69): the latent bit-identical (the tiny DiT, bf16 and fp16); the resident,
compiled bf16 DiT 4-5 % faster a warm image in the server (3.65 s against 3.86, run68; 3.60 against 3.76, run69),
one stream sync a step fewer in-process (run66).

A SAMPLER_SAMPLE wrapper (ComfyUI's hook around a sampler's run) hands the sampler a CPU copy of the sigmas where
every use of them is known to accept one:
- the sampler function is one of SAMPLERS (flow-model Euler ancestral), and the model samples a flow (its
  model_sampling is ComfyUI's CONST, for which `sample_euler_ancestral` runs the RF loop): other samplers reshape
  sigmas against the latent (`append_dims`), which a CPU tensor cannot do with a GPU one;
- no inpainting mask (KSamplerX0Inpaint passes the sigmas to mask functions of other nodes).
Compiled and eager runs alike. Until run74 it was kept to compiled runs: the tiny eager DiT's check had recorded
more stream syncs with host sigmas (136 against 21 over 6 steps, runs 66 and 68). The profiler's stacks (run72)
showed 127 of those 136 in ComfyUI's `ModelPatcher.load`: the host run came first and loaded the model. Loaded
beforehand (devkit/host_sigmas_check.py), the eager run waits once a step less, as the compiled one does: 15
against 21 in bf16, 21 against 27 in fp16 (run74). What that is worth to an eager run's time was not seen: at a
6 GiB budget (streamed eager) the two were within the server's noise (run69).
Elsewhere the sigmas pass through as ComfyUI gave them. NEWBIE_HOST_SIGMAS=0 turns it off (for comparisons).
"""
from __future__ import annotations

import functools

import torch

from . import env_switch

WRAPPER_KEY = "newbie_host_sigmas"
SAMPLERS = ("sample_euler_ancestral", "sample_euler_ancestral_RF")


@functools.cache
def _samplers() -> frozenset:
    """The sampler functions that take CPU sigmas: k-diffusion's by name (those this ComfyUI has), and the pack's."""
    import comfy.k_diffusion.sampling as kd

    from . import sampling

    return frozenset([getattr(kd, n) for n in SAMPLERS if hasattr(kd, n)] + [sampling.sample_euler_ancestral_rf])


def _samples_a_flow(guider) -> bool:
    import comfy.model_sampling

    model_sampling = getattr(getattr(guider, "inner_model", None), "model_sampling", None)
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def eligible(sampler, guider, denoise_mask, extra_args) -> bool:
    """Whether every use of this sampler run's sigmas accepts them on the host (the rules in the module
    docstring)."""
    model_options = (extra_args or {}).get("model_options", {})
    if denoise_mask is not None or "denoise_mask_function" in model_options:
        return False
    return getattr(sampler, "sampler_function", None) in _samplers() and _samples_a_flow(guider)


def _sample(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
            disable_pbar=False):
    """SAMPLER_SAMPLE wrapper: the sampler's run, with its sigmas on the host where that is `eligible`."""
    if (env_switch.switch("NEWBIE_HOST_SIGMAS", True) and eligible(executor.class_obj, guider, denoise_mask, extra_args)
            and isinstance(sigmas, torch.Tensor) and sigmas.device.type != "cpu"):
        sigmas = sigmas.cpu()  # one host read for the whole run
    return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def attach(patcher) -> None:
    """Hand flow-model Euler-ancestral runs of this model their sigmas on the host (replaces an earlier attach)."""
    import comfy.patcher_extension as pe

    patcher.remove_wrappers_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
    patcher.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, _sample)
