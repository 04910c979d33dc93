"""Euler ancestral sampling for rectified-flow models such as NewBie (ComfyUI's `CONST` model sampling).

The sampler is ComfyUI's own `sample_euler_ancestral_RF` (comfy/k_diffusion/sampling.py), the one its
`euler_ancestral` runs for flow models. The pack's node exposes its `eta` and `s_noise` for SamplerCustomAdvanced
and refuses up front what that function would turn into a NaN or a silently wrong image: an eta outside [0, 2]
and a schedule that is not a flow model's. tests/unit/test_sampling.py holds ComfyUI's function to the math below.

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

Nothing here imports ComfyUI at module import time, so the checks are testable without a host.
"""
from __future__ import annotations

import torch

ETA_RANGE = (0.0, 2.0)


def check_eta(eta: float) -> None:
    if not ETA_RANGE[0] <= float(eta) <= ETA_RANGE[1]:
        raise ValueError(f"Euler ancestral (rectified flow): eta={eta} is outside {list(ETA_RANGE)}; beyond it the "
                         "re-noising variance can be negative. Pick an eta between 0 and 2 (1 is the usual value).")


def check_schedule(sigmas) -> None:
    """Every step must denoise a flow model: 0 <= sigma_next <= sigma <= 1 and sigma > 0 (one host read)."""
    s = [float(v) for v in torch.as_tensor(sigmas).detach().float().cpu()]
    for sigma, sigma_next in zip(s, s[1:]):
        # A hair above 1 is float32 rounding of a schedule that starts at pure noise, not a different model.
        if not (0.0 <= sigma_next <= sigma <= 1.0 + 1e-6 and sigma > 0.0):
            raise ValueError(f"Euler ancestral (rectified flow): step from sigma={sigma} to sigma_next={sigma_next} "
                             "is not a denoising step of a flow model (needs 0 <= sigma_next <= sigma <= 1, "
                             "sigma > 0). Use a scheduler made for this model (e.g. 'simple' or 'beta' in "
                             "BasicScheduler).")


@torch.no_grad()
def sample_euler_ancestral_rf(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """A ComfyUI KSAMPLER sampler function: the checks above, then ComfyUI's sample_euler_ancestral_RF."""
    from comfy.k_diffusion.sampling import sample_euler_ancestral_RF

    check_eta(eta)
    check_schedule(sigmas)
    return sample_euler_ancestral_RF(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                     eta=eta, s_noise=s_noise, noise_sampler=noise_sampler)
