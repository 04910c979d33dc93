"""Fault injection for the OOM Guard's tests: genuine `torch.OutOfMemoryError`s raised where the model itself
would raise them, so the guard's recovery runs exactly as a real out-of-memory error would make it run.

Wrappers of their own, which exist only where a test puts devkit's fault node (devkit/fault_nodes, loaded
into a test server on request, see harness.ComfyServer(extra_nodes=...)) into its graph: the product has no
hook for them. They sit *inside* the guard, where a real error would come from:
- on the model, the innermost APPLY_MODEL wrapper: ComfyUI runs wrappers in the order their keys were added,
  the first outermost, so on the model the fault node comes after the OOM Guard;
- on the VAE, the decoder itself: on the VAE the fault node comes before the OOM Guard, which then wraps it.
graphs.with_faults places it so.

A plan is a JSON object; keys:
    model_calls: [int]   model calls to fail, counted from 0 in each sampling run
    steps: [int]         sampling steps to fail (index into the schedule; -1 is the last step)
    times: int           how many attempts of each chosen call fail (default 1)
    unrecoverable: bool  the chosen calls fail on every attempt
    vae_decode: bool     VAE decoding fails too: the first `vae_times` decode attempts of each prompt
    vae_times: int       default: `times`
    pause_at_call: int   no injected error: before that model call's first attempt, write the file
    pause_signal: str    `pause_signal` and wait (up to 120 s) for `pause_ack` to appear, so a second process
    pause_ack: str       can take GPU memory at that exact point and the call meets a *real* CUDA OOM
                         (bench/oom_recovery.py --grab-at-call)

Attempts of one call, seen from inside the guard: the guard retries a call with the very same input tensor
and cuts a split call into views of it, while ComfyUI builds every new call's input with `torch.cat`. So an
invocation whose input shares memory with the previous invocation's is another attempt at the same call (the
previous input is held until then, so a new call's input can never reuse its memory).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from pipeline.oom.attach import with_wrappers
from pipeline.oom.calls import CallSite, ModelCall
from pipeline.oom.report import fmt_bytes
from pipeline.oom.vae import decode_need, wrap_decode

log = logging.getLogger(__name__)

WRAPPER_KEY = "newbie_devkit_faults"


class FaultPlanError(ValueError):
    """A fault plan that cannot be read."""


@dataclass(frozen=True)
class FaultPlan:
    model_calls: frozenset = frozenset()
    steps: tuple = ()
    times: int = 1
    unrecoverable: bool = False
    vae_decode: bool = False
    vae_times: int = 1
    pause_at_call: int | None = None
    pause_signal: str | None = None
    pause_ack: str | None = None

    KEYS = ("model_calls", "steps", "times", "unrecoverable", "vae_decode", "vae_times", "pause_at_call",
            "pause_signal", "pause_ack")

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise FaultPlanError(f"cannot read the fault plan ({e}); expected a JSON object with keys "
                                 f"{', '.join(cls.KEYS)}") from e
        if not isinstance(data, dict) or set(data) - set(cls.KEYS):
            unknown = sorted(set(data) - set(cls.KEYS)) if isinstance(data, dict) else type(data).__name__
            raise FaultPlanError(f"fault plan: unknown keys {unknown}; expected a JSON object with keys "
                                 f"{', '.join(cls.KEYS)}")
        times = int(data.get("times", 1))
        return cls(model_calls=frozenset(int(i) for i in data.get("model_calls", [])),
                   steps=tuple(int(i) for i in data.get("steps", [])), times=times,
                   unrecoverable=bool(data.get("unrecoverable", False)),
                   vae_decode=bool(data.get("vae_decode", False)), vae_times=int(data.get("vae_times", times)),
                   pause_at_call=data.get("pause_at_call"), pause_signal=data.get("pause_signal"),
                   pause_ack=data.get("pause_ack"))

    def targets_model_call(self, call_index: int, step: int | None, n_steps: int | None) -> bool:
        if call_index in self.model_calls:
            return True
        if step is None or not n_steps:
            return False
        return any(s % n_steps == step for s in self.steps)

    def model_fault(self, site: CallSite, attempt: int, need: int | None) -> None:
        if self.pause_at_call == site.index and attempt == 0 and self.pause_signal and self.pause_ack:
            self._pause()
        if self.targets_model_call(site.index, site.step, site.n_steps) and (self.unrecoverable or
                                                                            attempt < self.times):
            raise self._error(f"{site}, attempt {attempt + 1}", need)

    def vae_fault(self, attempt_in_prompt: int, need: int | None) -> None:
        if self.vae_decode and (self.unrecoverable or attempt_in_prompt < self.vae_times):
            raise self._error(f"VAE decode attempt {attempt_in_prompt + 1} of this prompt", need)

    def _pause(self) -> None:
        with open(self.pause_signal, "w", encoding="utf-8") as f:
            f.write("paused")
        deadline = time.monotonic() + 120
        while not os.path.exists(self.pause_ack) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Worded like the guard's own lines, so bench/oom_recovery.py collects it with them.
        log.info("NewBie OOM guard: fault plan pause at model call %s ended (%s)", self.pause_at_call,
                 "acknowledged" if os.path.exists(self.pause_ack) else "timed out")

    def _error(self, where: str, need: int | None) -> torch.OutOfMemoryError:
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {fmt_bytes(need or (1 << 30))}. "
                                      f"(Injected by devkit's fault plan at {where}.)")


class ModelFaults:
    """The fault wrappers of one model: OUTER_SAMPLE starts the count of model calls again, APPLY_MODEL raises
    where the plan says, before the real model runs."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan
        self._new_run()

    def _new_run(self) -> None:
        self._calls = 0        # model calls so far in this sampling run
        self._site = None      # the current call
        self._attempt = 0      # its attempts so far
        self._last_x = None    # the latest attempt's input

    def outer_sample(self, executor, *args, **kwargs):
        self._new_run()
        try:
            return executor(*args, **kwargs)
        finally:
            self._new_run()

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        if self._last_x is not None and _same_memory(x, self._last_x):
            self._attempt += 1
        else:
            self._site = CallSite(self._calls, transformer_options if transformer_options is not None else {})
            self._calls += 1
            self._attempt = 0
        self._last_x = x
        need = ModelCall(x, t).need_bytes(getattr(executor, "class_obj", None))
        self.plan.model_fault(self._site, self._attempt, need)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


class VAEFaults:
    """The fault proxy's state on one VAE: decode attempts counted from 0 in each prompt."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan
        self._scope = None
        self._attempts = 0

    def around(self, decode, z, vae):
        scope = _prompt_scope() or "outside a prompt"
        if scope != self._scope:
            self._scope, self._attempts = scope, 0
        attempt = self._attempts
        self._attempts += 1
        self.plan.vae_fault(attempt, decode_need(vae, z))
        return decode()


def inject_model_faults(model, plan: FaultPlan):
    """A clone of the ModelPatcher whose innermost model wrappers raise the plan's faults (apply it after the
    OOM Guard); applied again, it replaces its earlier wrappers."""
    faults = ModelFaults(plan)
    return with_wrappers(model, WRAPPER_KEY, faults.outer_sample, faults.apply_model)


def inject_vae_faults(vae, plan: FaultPlan):
    """A copy of the VAE whose decoder raises the plan's VAE faults (apply it before the OOM Guard)."""
    return wrap_decode(vae, VAEFaults(plan).around)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _prompt_scope():
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return getattr(ctx, "prompt_id", None)
