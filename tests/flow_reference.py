"""The rectified-flow Euler ancestral step written from its derivation (pipeline/sampling.py's docstring): the
reference the tests hold ComfyUI's `sample_euler_ancestral_RF` (which the pack's sampler node runs) against."""
from __future__ import annotations

import math

def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """One rectified-flow ancestral step's coefficients: (sigma_down, alpha_ratio, renoise).

    ``sigma_down`` is where the Euler move lands, ``alpha_ratio = (1 - sigma_next) / (1 - sigma_down)`` rescales
    the signal and ``renoise = sqrt(sigma_next**2 - (alpha_ratio * sigma_down)**2)`` is the standard deviation of
    the fresh noise (before ``s_noise``). Accepts floats or one-element tensors; returns floats.
    """
    sigma, sigma_next, eta = float(sigma), float(sigma_next), float(eta)
    if sigma_next == 0.0:
        return 0.0, 1.0, 0.0
    sigma_down = sigma_next * (1.0 + eta * (sigma_next / sigma - 1.0))
    if sigma_down >= 1.0:  # only when sigma_next is 1 too: a step that moves nothing
        return sigma_down, 1.0, 0.0
    alpha_ratio = (1.0 - sigma_next) / (1.0 - sigma_down)
    # Rounding can leave a tiny negative variance at eta = 0 or 2, where it is exactly zero in theory.
    renoise = math.sqrt(max(sigma_next ** 2 - (alpha_ratio * sigma_down) ** 2, 0.0))
    return sigma_down, alpha_ratio, renoise
