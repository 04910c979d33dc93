"""A guarded VAE: a shallow copy of the VAE whose `first_stage_model` is a proxy that sends `decode` through
the guard, so an out-of-memory decode is retried whole before ComfyUI's `VAE.decode` sees the error. When the
retries are used up the error goes on to `VAE.decode`, whose tiled fallback then runs as it would without the
guard. Every other attribute is the real model's (the VAE's ModelPatcher still holds the real one)."""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

from .guard import OOMGuard


Around = Callable[[Callable[[], Any], Any, Any], Any]  # (the real decode call, the latent, the VAE) -> image


class DecodeProxy:
    """Stands in for the `first_stage_model` of `vae` (a copy): `decode(z, ...)` runs as `around(decode, z,
    vae)`, where `decode` is the real model's call with those arguments; everything else is the real model's."""

    def __init__(self, real, vae, around: Around):
        self._real = real
        self._vae = vae
        self._around = around

    def __getattr__(self, name):
        if name in ("_real", "_vae", "_around"):  # not set yet (copy, pickle): no recursion into _real
            raise AttributeError(name)
        return getattr(self._real, name)

    def decode(self, z, *args, **kwargs):
        return self._around(functools.partial(self._real.decode, z, *args, **kwargs), z, self._vae)


def wrap_decode(vae, around: Around):
    """A shallow copy of the VAE whose decoder is a DecodeProxy with `around`; the input VAE is left as it was."""
    if getattr(vae, "first_stage_model", None) is None:  # an invalid VAE: let ComfyUI report it as usual
        return vae
    wrapped = copy.copy(vae)
    wrapped.first_stage_model = DecodeProxy(vae.first_stage_model, wrapped, around)
    return wrapped


def decode_need(vae, z) -> int | None:
    """ComfyUI's memory estimate for decoding the latent z with this VAE, if it has one."""
    estimate = getattr(vae, "memory_used_decode", None)
    return int(estimate(z.shape, getattr(vae, "vae_dtype", z.dtype))) if estimate is not None else None


def guard_vae(vae, guard: OOMGuard):
    """A copy of the VAE whose decodes the guard retries after freeing memory."""
    def around(decode, z, guarded):
        memory = guard.memory(getattr(guarded, "patcher", None), getattr(guarded, "device", z.device))
        return guard.decode(decode, memory, decode_need(guarded, z))

    return wrap_decode(vae, around)
