"""Euler ancestral sampling for rectified-flow models such as NewBie (ComfyUI's `CONST` model sampling).

The math
--------
A rectified-flow model is trained on straight paths between data and noise::

    x_t = (1 - t) * x0 + t * eps,        eps ~ N(0, I),  t = sigma in [0, 1]

ComfyUI hands the sampler a denoiser ``D(x, sigma)``, the model's estimate of ``x0``. Along the straight path
the velocity is ``dx/dsigma = eps - x0``, estimated from one evaluation as ``d = (x - D) / sigma``.

An ancestral step from ``sigma`` to ``sigma_next`` has two parts.

1. A deterministic Euler move, not to ``sigma_next`` but further down, to ``sigma_down``::

       x' = x + (sigma_down - sigma) * d = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * D

   If ``D`` were exact, ``x'`` would lie on the path at ``sigma_down``: ``(1 - sigma_down) x0 + sigma_down eps``.

2. Re-noise back up to ``sigma_next`` with fresh noise ``z ~ N(0, I)``::

       x_next = alpha_ratio * x' + renoise * s_noise * z

   chosen so that ``x_next`` has the marginal of the path at ``sigma_next``: the signal coefficient must become
   ``1 - sigma_next``, so ``alpha_ratio = (1 - sigma_next) / (1 - sigma_down)``; the noise variance must become
   ``sigma_next**2``, and the old noise already contributes ``(alpha_ratio * sigma_down)**2``, so
   ``renoise = sqrt(sigma_next**2 - (alpha_ratio * sigma_down)**2)``.

``eta`` decides how far below ``sigma_next`` the Euler move goes, interpolating the ratio ``sigma_next / sigma``::

    sigma_down = sigma_next * (1 + eta * (sigma_next / sigma - 1))

- ``eta = 0``: ``sigma_down = sigma_next``, ``alpha_ratio = 1``, ``renoise = 0``: plain Euler, no noise drawn.
- ``eta = 1``: ``sigma_down = sigma_next**2 / sigma``, ComfyUI's default for ``euler_ancestral``.
- ``0 <= eta <= 2`` keeps ``|sigma_down| <= sigma_next`` (for eta > 1 ``sigma_down`` may go negative: the Euler
  move overshoots past the clean estimate), and that keeps ``renoise**2 >= 0``: with ``a = alpha_ratio``,
  ``sigma_next**2 - (a * sigma_down)**2 >= 0`` is ``|sigma_down| * (1 - sigma_next) <= sigma_next * (1 - sigma_down)``,
  true for ``0 <= sigma_down <= sigma_next`` and for ``-sigma_next <= sigma_down < 0``. Beyond eta = 2 the
  variance can go negative, so such an eta is refused.

``s_noise`` scales the injected noise (1 keeps the marginal exact; below 1 gives smoother, above 1 grainier
results). When the model's ``model_sampling`` carries a ``noise_scale`` (newer ComfyUI), it multiplies
``s_noise``, as ComfyUI's own flow samplers do. The last step (``sigma_next == 0``) returns ``D`` itself.

Noise comes from ComfyUI's seeded noise sampler when ``extra_args`` carries a seed (SamplerCustomAdvanced and
KSampler put it there), so a seed gives the same images as ComfyUI's ``euler_ancestral`` on flow models, on CPU
and on GPU alike.

Nothing here imports ComfyUI at module import time, so the math is testable without a host.
"""
from __future__ import annotations

import math

import torch

ETA_RANGE = (0.0, 2.0)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """One rectified-flow ancestral step's coefficients: (sigma_down, alpha_ratio, renoise).

    ``sigma_down`` is where the Euler move lands, ``alpha_ratio = (1 - sigma_next) / (1 - sigma_down)`` rescales
    the signal and ``renoise = sqrt(sigma_next**2 - (alpha_ratio * sigma_down)**2)`` is the standard deviation of
    the fresh noise (before ``s_noise``). Accepts floats or one-element tensors; returns floats.
    """
    sigma, sigma_next, eta = float(sigma), float(sigma_next), float(eta)
    if not ETA_RANGE[0] <= eta <= ETA_RANGE[1]:
        raise ValueError(f"Euler ancestral (rectified flow): eta={eta} is outside {list(ETA_RANGE)}; beyond it the "
                         "re-noising variance can be negative. Pick an eta between 0 and 2 (1 is the usual value).")
    # A hair above 1 is float32 rounding of a schedule that starts at pure noise, not a different model.
    if not (0.0 <= sigma_next <= sigma <= 1.0 + 1e-6 and sigma > 0.0):
        raise ValueError(f"Euler ancestral (rectified flow): step from sigma={sigma} to sigma_next={sigma_next} is "
                         "not a denoising step of a flow model (needs 0 <= sigma_next <= sigma <= 1, sigma > 0). "
                         "Use a scheduler made for this model (e.g. 'simple' or 'beta' in BasicScheduler).")
    if sigma_next == 0.0:
        return 0.0, 1.0, 0.0
    sigma_down = sigma_next * (1.0 + eta * (sigma_next / sigma - 1.0))
    if sigma_down >= 1.0:  # only when sigma_next is 1 too: a step that moves nothing
        return sigma_down, 1.0, 0.0
    alpha_ratio = (1.0 - sigma_next) / (1.0 - sigma_down)
    # Rounding can leave a tiny negative variance at eta = 0 or 2, where it is exactly zero in theory.
    renoise = math.sqrt(max(sigma_next ** 2 - (alpha_ratio * sigma_down) ** 2, 0.0))
    return sigma_down, alpha_ratio, renoise


def _noise_scale(model) -> float:
    """The model_sampling `noise_scale` ComfyUI applies to flow-model noise, 1.0 on hosts (or models) without it.

    `model` is ComfyUI's KSamplerX0Inpaint; its `inner_model` is the guider, whose patcher holds the
    (possibly patched) model_sampling. A plain callable, as in the unit tests, has none.
    """
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    if patcher is None:
        return 1.0
    return float(getattr(patcher.get_model_object("model_sampling"), "noise_scale", 1.0))


@torch.no_grad()
def sample_euler_ancestral_rf(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """Euler ancestral for rectified flow (see the module docstring); a ComfyUI KSAMPLER sampler function.

    `model(x, sigma_batch, **extra_args)` returns the denoised estimate; `callback` gets
    {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} every step (ComfyUI's progress bar and previews);
    `noise_sampler(sigma, sigma_next)` returns unit Gaussian noise shaped like x.
    """
    from tqdm.auto import trange  # ComfyUI's own dependency; lazy so the module imports without it

    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        from comfy.k_diffusion.sampling import default_noise_sampler

        # The seeded stream ComfyUI's euler_ancestral uses, so the same seed gives the same image.
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    noise_gain = s_noise * _noise_scale(model)
    batch_ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * batch_ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        sigma_down, alpha_ratio, renoise = ancestral_step(sigma, sigma_next, eta)
        if sigma_next == 0:
            x = denoised
            continue
        ratio = sigma_down / float(sigma)
        x = ratio * x + (1.0 - ratio) * denoised
        # No draw at eta = 0 keeps the noise stream aligned with ComfyUI's sampler (it draws only when eta > 0).
        if eta > 0:
            x = alpha_ratio * x + (noise_gain * renoise) * noise_sampler(sigma, sigma_next)
    return x
