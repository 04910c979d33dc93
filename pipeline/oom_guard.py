"""Out-of-memory recovery for sampling and VAE decoding: retry the very call that ran out of memory.

A guarded model carries two ComfyUI wrappers (`comfy.patcher_extension`, present on every supported host):
- `OUTER_SAMPLE` marks the start and end of a sampling run (per-run state, the fault plan below);
- `APPLY_MODEL` wraps one call of the diffusion model: `BaseModel.apply_model(x, t, c_concat, c_crossattn,
  control, transformer_options, **conds)`, i.e. one sampling step's batch (cond and uncond together when
  they fit). When that call raises an out-of-memory error, the wrapper climbs a recovery ladder and calls
  it again with the same inputs. The sampler's state (x, sigmas, the noise generator) lives outside that
  call, so a retry consumes no extra noise and the finished latent is the uninterrupted run's.

The ladder, one rung per retry (ComfyUI's own memory functions do the work):
1. empty the allocator cache (`soft_empty_cache`): the same computation runs again, bit-identical;
2. unload the other models from the device (`free_memory`, keeping this model and the sampling run's
   additional models such as ControlNets): bit-identical;
3. move part of this model's weights to the offload device (`partially_unload`, which both the legacy
   loader and dynamic VRAM implement): the same arithmetic, slower;
4. split the batch (cond/uncond, then latent rows) into halves and concatenate the results: the same
   model on fewer rows, equal up to float rounding. It stays split for the rest of that sampling run.
   NewBie's positive and negative prompts usually differ in token count, and ComfyUI batches cond with
   uncond only when their shapes match, so for one image each step is two one-row calls and this rung
   applies only to latent batches (or prompts of equal length).
On the CPU rungs 1-3 have nothing to free; they still count as attempts so the ladder is the same everywhere.
Rungs 1-3 are written against both hosts' APIs but were exercised on the CPU only (bench/oom_recovery.py is
the GPU check). There is no "degrade" mode (smaller image, fewer steps): every recovery keeps the job as asked.
Only out-of-memory errors are caught (`comfy.model_management.is_oom`, or `OOM_EXCEPTION` where a host has
no `is_oom`). If the ladder is exhausted the call raises `OOMUnrecoverable` (an out-of-memory error, so
ComfyUI unloads its models and keeps serving) saying how much the step needs, what is free, what to try.

A guarded VAE is a shallow copy of the VAE whose `first_stage_model` is a `GuardedDecoder`: its `decode`
retries after rungs 1-2, *before* ComfyUI's `VAE.decode` sees the error. Without it, ComfyUI's own fallback
(tiled decoding) takes over at the first OOM and gives a slightly different image. When the retries are
used up the error goes on to `VAE.decode`, whose tiled fallback then runs as it would without the guard.

Test hook: `NEWBIE_FAULT_PLAN=/path/plan.json` makes guarded calls raise a genuine `torch.OutOfMemoryError`
before the real model runs, so the recovery path is exercised exactly as a real OOM would exercise it.
The file is re-read at the start of each sampling run and of each prompt's VAE decoding (an absent file
means no faults), so tests may rewrite it between prompts. Keys:
    model_calls: [int]   model calls to fail, counted from 0 in each sampling run
    steps: [int]         sampling steps to fail (index into the schedule; -1 is the last step)
    times: int           how many attempts of each chosen call fail (default 1)
    unrecoverable: bool  the chosen calls fail on every attempt
    vae_decode: bool     VAE decoding fails too: the first `vae_times` decode attempts of the prompt
    vae_times: int       default: `times`
    pause_at_call: int   no injected error: before that model call's first attempt, write the file
    pause_signal: str    `pause_signal` and wait (up to 120 s) for `pause_ack` to appear, so a second process
    pause_ack: str       can take GPU memory at that exact point and the call meets a *real* CUDA OOM
                         (bench/oom_recovery.py --grab-at-call)
"""
from __future__ import annotations

import copy
import functools
import gc
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import compat
from .errors import NewBieError

log = logging.getLogger(__name__)

FAULT_PLAN_ENV = "NEWBIE_FAULT_PLAN"
WRAPPER_KEY = "newbie_oom_guard"
DEFAULT_MAX_RETRIES = 6
MEMORY_RUNGS = ("empty_cache", "free_models", "offload_weights")


class OOMUnrecoverable(torch.OutOfMemoryError, NewBieError):
    """The recovery ladder is exhausted. An out-of-memory error, so ComfyUI's own OOM handling still runs."""


class FaultPlanError(NewBieError):
    """The NEWBIE_FAULT_PLAN file cannot be read."""


# -- helpers ----------------------------------------------------------------------------------------------

def _model_management():
    """ComfyUI's model management when running inside ComfyUI (already imported there); None elsewhere.
    Never imported from here: importing it outside a host would initialise devices as a side effect."""
    return sys.modules.get("comfy.model_management")


def is_oom(error: BaseException) -> bool:
    mm = _model_management()
    check = getattr(mm, "is_oom", None)
    if check is not None:
        return bool(check(error))
    return isinstance(error, getattr(mm, "OOM_EXCEPTION", torch.OutOfMemoryError))


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


_ALLOC = re.compile(r"Tried to allocate ([0-9.]+) ?([KMGT]i?B)", re.IGNORECASE)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def requested_bytes(message: str) -> int | None:
    """The allocation a CUDA OOM message says failed ("Tried to allocate 2.50 GiB"), if it says."""
    m = _ALLOC.search(message or "")
    return int(float(m.group(1)) * _UNITS[m.group(2)[0].upper()]) if m else None


def _first_line(text: str, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line[:limit]


# -- fault plan (test hook) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaultPlan:
    path: str
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
    def load(cls) -> "FaultPlan | None":
        """The plan named by $NEWBIE_FAULT_PLAN, or None (unset, or the file is absent)."""
        path = os.environ.get(FAULT_PLAN_ENV)
        if not path or not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise FaultPlanError(f"{FAULT_PLAN_ENV}={path}: cannot read the fault plan ({e}); expected a JSON "
                                 f"object with keys {', '.join(cls.KEYS)}, or no file for no faults") from e
        if not isinstance(data, dict) or set(data) - set(cls.KEYS):
            unknown = sorted(set(data) - set(cls.KEYS)) if isinstance(data, dict) else type(data).__name__
            raise FaultPlanError(f"{FAULT_PLAN_ENV}={path}: unknown keys {unknown}; expected a JSON object with "
                                 f"keys {', '.join(cls.KEYS)}")
        times = int(data.get("times", 1))
        return cls(path=path, model_calls=frozenset(int(i) for i in data.get("model_calls", [])),
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

    def model_fault(self, site: "CallSite", attempt: int, need: int | None) -> None:
        if self.pause_at_call == site.index and attempt == 0 and self.pause_signal and self.pause_ack:
            self._pause()
        if self.targets_model_call(site.index, site.step, site.n_steps) and (self.unrecoverable or
                                                                            attempt < self.times):
            raise self._error(f"{site}, attempt {attempt + 1}", need)

    def _pause(self) -> None:
        import time

        with open(self.pause_signal, "w", encoding="utf-8") as f:
            f.write("paused")
        deadline = time.monotonic() + 120
        while not os.path.exists(self.pause_ack) and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("NewBie OOM guard: fault plan pause at model call %s ended (%s)", self.pause_at_call,
                 "acknowledged" if os.path.exists(self.pause_ack) else "timed out")

    def vae_fault(self, attempt_in_prompt: int, need: int | None) -> None:
        if self.vae_decode and (self.unrecoverable or attempt_in_prompt < self.vae_times):
            raise self._error(f"VAE decode attempt {attempt_in_prompt + 1} of this prompt", need)

    def _error(self, where: str, need: int | None) -> torch.OutOfMemoryError:
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {fmt_bytes(need or (1 << 30))}. "
                                      f"(Injected by the {FAULT_PLAN_ENV} test hook ({self.path}) at {where}.)")


# -- one model call, splittable along the batch -----------------------------------------------------------

class SplitImpossible(Exception):
    """This call's inputs cannot be cut along the batch (the reason is the message)."""


@dataclass
class ModelCall:
    """The arguments of one `BaseModel.apply_model` call. Rows of the batch are independent samples (cond and
    uncond, latent batch), so a slice of rows is a smaller call with the same per-row result."""
    x: torch.Tensor
    t: Any
    c_concat: Any = None
    c_crossattn: Any = None
    control: Any = None
    transformer_options: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    def _rows_per_chunk(self) -> int:
        chunks = len(self.transformer_options.get("cond_or_uncond") or ())
        return self.batch // chunks if chunks and self.batch % chunks == 0 else 1

    def check_splittable(self) -> None:
        if self.batch < 2:
            raise SplitImpossible("the batch has a single row")
        if self.control is not None:
            raise SplitImpossible("a ControlNet's outputs are batched with the call and are not cut here")
        for name, value in self._tensor_args():
            if value.ndim and value.shape[0] not in (1, self.batch):
                raise SplitImpossible(f"input {name!r} has {value.shape[0]} rows, the batch has {self.batch}")

    def _tensor_args(self):
        named = [("x", self.x), ("t", self.t), ("c_concat", self.c_concat), ("c_crossattn", self.c_crossattn)]
        named += list(self.kwargs.items())
        for name, value in named:
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if torch.is_tensor(item):
                    yield name, item

    def split_sizes(self, below: int | None = None) -> list[int]:
        """Rows per piece for successive splits (about halving each time), keeping every piece inside one
        cond/uncond chunk or made of whole chunks, so `cond_or_uncond` stays true for each piece."""
        b, rpc = self.batch, self._rows_per_chunk()
        current = min(below or b, b)
        sizes = []
        for s in range(b - 1, 0, -1):
            if b % s == 0 and (s % rpc == 0 or rpc % s == 0) and s <= current / 2:
                sizes.append(s)
                current = s
        return sizes

    def rows(self, start: int, stop: int) -> "ModelCall":
        b = self.batch

        def cut(value):
            if torch.is_tensor(value):
                return value[start:stop] if value.ndim and value.shape[0] == b else value
            if isinstance(value, list):
                return [cut(v) for v in value]
            if isinstance(value, tuple):
                return tuple(cut(v) for v in value)
            return value

        rpc = self._rows_per_chunk()
        chunks = range(start // rpc, -(-stop // rpc))
        opts = dict(self.transformer_options)
        for key in ("cond_or_uncond", "uuids"):
            if isinstance(opts.get(key), list) and len(opts[key]) * rpc == b:
                opts[key] = [opts[key][i] for i in chunks]
        return ModelCall(cut(self.x), cut(self.t), cut(self.c_concat), cut(self.c_crossattn), self.control, opts,
                         {k: cut(v) for k, v in self.kwargs.items()})

    def piece_size(self, limit: int | None) -> int:
        """The largest piece this call can be cut into with at most `limit` rows (the whole batch if none)."""
        if not limit or limit >= self.batch:
            return self.batch
        try:
            self.check_splittable()
        except SplitImpossible:
            return self.batch
        return max((s for s in self.split_sizes() if s <= limit), default=1)

    def run(self, fn: Callable[["ModelCall"], torch.Tensor], rows_per_piece: int | None = None) -> torch.Tensor:
        size = self.piece_size(rows_per_piece)
        if size >= self.batch:
            return fn(self)
        return torch.cat([fn(self.rows(a, a + size)) for a in range(0, self.batch, size)])


# -- the ladder ---------------------------------------------------------------------------------------------

@dataclass
class Rung:
    name: str                   # one of MEMORY_RUNGS, or "split"
    apply: Callable[[], str]    # does it; returns what it did, for the log and the report


@dataclass
class Recovered:
    value: Any
    retries: int
    actions: list


class LadderExhausted(Exception):
    def __init__(self, actions: list, last_error: str):
        super().__init__(last_error)
        self.actions = actions
        self.last_error = last_error


def call_with_recovery(attempt: Callable[[int], Any], rungs: Callable[[], Sequence[Rung]], max_retries: int,
                       where: object = "call") -> Recovered:
    """Calls attempt(0); after each out-of-memory error applies the next rung and calls attempt(k) again, at
    most `max_retries` times. Errors other than out-of-memory go straight through. The rung runs after the
    `except` block has ended, so the failed attempt's tensors (held by the traceback) can be freed."""
    ladder: Sequence[Rung] | None = None
    actions: list[str] = []
    retry = 0
    while True:
        failure = None
        try:
            value = attempt(retry)
        except Exception as e:  # noqa: BLE001 - filtered by is_oom; everything else re-raised as is
            if not is_oom(e):
                raise
            failure = str(e)
        if failure is None:
            return Recovered(value, retry, actions)
        if ladder is None:
            ladder = list(rungs())
        if retry >= max_retries or retry >= len(ladder):
            raise LadderExhausted(actions, failure)
        log.warning("NewBie OOM guard: %s ran out of memory (attempt %d): %s", where, retry + 1, _first_line(failure))
        done = ladder[retry].apply()
        actions.append(done)
        log.warning("NewBie OOM guard: %s: %s; retrying", where, done)
        retry += 1


# -- ComfyUI's memory functions -----------------------------------------------------------------------------

class ComfyMemory:
    """Rungs 1-3 through comfy.model_management and the ModelPatcher, feature-checked on the host.
    `in_use`: other ModelPatchers the running job needs (a sampling run's ControlNets and the like), which
    rung 2 must not unload."""

    def __init__(self, patcher, device, in_use: Sequence = ()):
        self.patcher = patcher
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mm = _model_management()
        self.in_use = [p for p in (patcher, *in_use) if p is not None]
        patches_models = getattr(patcher, "model_patches_models", None)
        if patches_models is not None:
            self.in_use += list(patches_models())

    def _keep(self, loaded) -> bool:
        model = loaded.model  # a weak reference on some hosts: None once the patcher is gone
        if model is None:
            return False
        return any(model is p or getattr(model, "model", None) is getattr(p, "model", False) for p in self.in_use)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def free_bytes(self) -> int | None:
        get = getattr(self.mm, "get_free_memory", None)
        return int(get(self.device)) if get else None

    def total_bytes(self) -> int | None:
        get = getattr(self.mm, "get_total_memory", None)
        return int(get(self.device)) if get else None

    def empty_cache(self) -> str:
        before = self.free_bytes()
        gc.collect()
        if self.on_cpu:
            return "collected garbage (no allocator cache to empty on the CPU)"
        if self.mm is not None:
            self.mm.soft_empty_cache()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"emptied the allocator cache ({_gain(before, self.free_bytes())})"

    def free_other_models(self) -> str:
        if self.on_cpu or self.mm is None:
            return "unloaded no other models (they live in CPU memory)"
        keep = [lm for lm in getattr(self.mm, "current_loaded_models", []) if self._keep(lm)]
        before = self.free_bytes()
        unloaded = self.mm.free_memory(1e32, self.device, keep_loaded=keep) or []
        self.mm.soft_empty_cache()
        return f"unloaded {len(unloaded)} other model(s) from {self.device} ({_gain(before, self.free_bytes())})"

    def offload_weights(self, amount: int | None) -> str:
        patcher = self.patcher
        if self.on_cpu or patcher is None or patcher.load_device.type == "cpu":
            return "offloaded no weights (the model runs on the CPU)"
        loaded = compat.loaded_size(patcher)
        if not loaded or not compat.can_partially_unload(patcher):
            return "offloaded no weights (none of this model's weights are on the device)"
        amount = min(loaded, max(int(amount or 0), loaded // 4))
        freed = patcher.partially_unload(patcher.offload_device, amount)
        self.mm.soft_empty_cache()
        return (f"moved {fmt_bytes(freed)} of this model's weights to {patcher.offload_device} "
                f"({fmt_bytes(patcher.loaded_size())} stay on {self.device}; they stream in per layer)")


def _gain(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "free memory unknown"
    return f"{fmt_bytes(max(0, after - before))} more free, {fmt_bytes(after)} free now"


# -- the guard of one model (and its VAE) -------------------------------------------------------------------

@dataclass
class _Run:
    plan: FaultPlan | None
    guider: Any = None                  # the CFGGuider running this sampling (holds its extra models)
    calls: int = 0
    rows_per_piece: int | None = None   # set by a batch split; kept for the rest of the run
    recoveries: int = 0


@dataclass
class RecoveryEvent:
    where: str
    retries: int
    actions: list
    changed_computation: bool


class OOMGuard:
    """The wrappers of one guarded model and its recovery record (shared by the model's later clones)."""

    def __init__(self, max_retries: int = DEFAULT_MAX_RETRIES, allow_batch_split: bool = True,
                 node_id: str | None = None, memory: Callable[..., ComfyMemory] = ComfyMemory):
        self.max_retries = max(0, int(max_retries))
        self.allow_batch_split = bool(allow_batch_split)
        self.node_id = node_id
        self.memory = memory
        self.events: list[RecoveryEvent] = []
        self._run: _Run | None = None
        self._vae_scope: str | None = None
        self._vae_attempts = 0
        self._vae_plan: FaultPlan | None = None

    @property
    def recoveries(self) -> int:
        return len(self.events)

    # -- sampling ------------------------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper: one sampling run (a KSampler, a SamplerCustom...)."""
        self._run = _Run(FaultPlan.load(), guider=getattr(executor, "class_obj", None))
        try:
            return executor(*args, **kwargs)
        finally:
            run, self._run = self._run, None
            if run is not None and run.recoveries:
                log.warning("NewBie OOM guard: sampling finished after %d recovery(ies) in this run, %d in all for "
                            "this guarded model", run.recoveries, self.recoveries)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        """APPLY_MODEL wrapper: one call of the diffusion model, retried on out-of-memory."""
        if self._run is None:  # a sampler that bypassed CFGGuider.outer_sample
            self._run = _Run(FaultPlan.load())
        run = self._run
        index = run.calls
        run.calls += 1
        call = ModelCall(x, t, c_concat, c_crossattn, control,
                         transformer_options if transformer_options is not None else {}, kwargs)
        where = CallSite(index, call.transformer_options)
        base_model = getattr(executor, "class_obj", None)
        patcher = getattr(base_model, "current_patcher", None)
        # Built on the first failure only: nothing here should cost anything on the normal path.
        memory = functools.cache(lambda: self.memory(patcher, x.device,
                                                     list(getattr(run.guider, "loaded_models", None) or ())))

        def forward(piece: ModelCall):
            return executor(piece.x, piece.t, piece.c_concat, piece.c_crossattn, piece.control,
                            piece.transformer_options, **piece.kwargs)

        def attempt(retry: int):
            if run.plan is not None:
                run.plan.model_fault(where, retry, need_bytes(base_model, call, run))
            return call.run(forward, run.rows_per_piece)

        no_split = []

        def rungs():
            ladder = [Rung("empty_cache", memory().empty_cache), Rung("free_models", memory().free_other_models),
                      Rung("offload_weights", lambda: memory().offload_weights(need_bytes(base_model, call, run)))]
            if self.allow_batch_split:
                try:
                    call.check_splittable()
                    sizes = call.split_sizes(run.rows_per_piece)
                    if not sizes:
                        raise SplitImpossible("the batch is already split as far as it goes")
                    ladder += [Rung("split", _splitter(run, call.batch, size)) for size in sizes]
                except SplitImpossible as why:
                    no_split.append(f"no batch split possible: {why}")
            return ladder

        split_before = run.rows_per_piece
        try:
            done = call_with_recovery(attempt, rungs, self.max_retries, where)
        except LadderExhausted as e:
            raise OOMUnrecoverable(self._unrecoverable_message(where, e, memory(), need_bytes(base_model, call, run),
                                                               call, no_split)) from None
        if done.retries:
            run.recoveries += 1
            self._record(RecoveryEvent(str(where), done.retries, done.actions, run.rows_per_piece != split_before))
        return done.value

    # -- VAE -----------------------------------------------------------------------------------------------
    def _vae_plan_for_prompt(self) -> FaultPlan | None:
        """The fault plan, re-read (and VAE decode attempts counted from 0) once per prompt."""
        scope = _prompt_scope() or "outside a prompt"
        if scope != self._vae_scope:
            self._vae_scope = scope
            self._vae_attempts = 0
            self._vae_plan = FaultPlan.load()
        return self._vae_plan

    def decode(self, decode: Callable[[], Any], memory: ComfyMemory, need: int | None) -> Any:
        plan = self._vae_plan_for_prompt()

        def attempt(retry: int):
            n = self._vae_attempts
            self._vae_attempts += 1
            if plan is not None:
                plan.vae_fault(n, need)
            return decode()

        def rungs():
            return [Rung("empty_cache", memory.empty_cache), Rung("free_models", memory.free_other_models)]

        try:
            done = call_with_recovery(attempt, rungs, self.max_retries, "VAE decode")
        except LadderExhausted as e:
            log.warning("NewBie OOM guard: VAE decode still out of memory after %d retry(ies); handing the error "
                        "back to ComfyUI's VAE.decode, which falls back to tiled decoding for a whole-image decode "
                        "(tiles can differ slightly at their seams)", len(e.actions))
            raise OOMUnrecoverable(self._unrecoverable_message("VAE decode", e, memory, need, None)) from None
        if done.retries:
            self._record(RecoveryEvent("VAE decode", done.retries, done.actions, False))
        return done.value

    # -- reporting -----------------------------------------------------------------------------------------
    def _record(self, event: RecoveryEvent) -> None:
        self.events.append(event)
        result = ("the batch now runs split, so the result may differ by float rounding" if event.changed_computation
                  else "same computation, same result")
        text = (f"NewBie OOM guard: recovered {event.where} on retry {event.retries} after: "
                f"{'; '.join(event.actions)} ({result}). Recovery #{self.recoveries} for this guarded model.")
        log.warning(text)
        _node_text(self.node_id, f"OOM Guard: {self.recoveries} recovery(ies); last: {event.where}, "
                                 f"{event.retries} retry(ies): {event.actions[-1]}")

    def _unrecoverable_message(self, where, e: LadderExhausted, memory: ComfyMemory, need, call,
                               notes: Sequence[str] = ()) -> str:
        asked = requested_bytes(e.last_error)
        free, total = memory.free_bytes(), memory.total_bytes()
        if need and call is not None:
            basis = f"ComfyUI's estimate for a batch of shape {list(call.x.shape)}"
        elif need:
            basis = "ComfyUI's estimate for this decode"
        else:
            basis = "the failed allocation alone"
        need = max(need or 0, asked or 0) or None
        done = "; ".join([*e.actions, *notes]) if e.actions else "no retries allowed: max_retries is 0"
        hints = ["a smaller resolution or batch size", "lower precision (NewBie Loader precision fp16, or an fp8 "
                 "checkpoint)", "closing other programs that use the GPU",
                 "starting ComfyUI with --lowvram or a larger --reserve-vram budget for other apps"]
        if not self.allow_batch_split and call is not None:
            hints.insert(0, "allow_batch_split on the OOM Guard")
        if self.max_retries < len(MEMORY_RUNGS) + 1:
            hints.insert(0, "a larger max_retries on the OOM Guard")
        return (f"Out of memory at {where}, and the NewBie OOM Guard could not make it fit after "
                f"{len(e.actions)} retry(ies) ({done}). It needs about {fmt_bytes(need)} ({basis}); "
                f"{fmt_bytes(free)} is free on {memory.device}"
                + (f" of {fmt_bytes(total)}" if total else "") + f". Try {', '.join(hints)}. "
                f"Last error: {_first_line(e.last_error)}")

    def describe(self, vae_guarded: bool, device) -> str:
        rungs = ["empty the allocator cache", "unload other models", "offload part of this model's weights"]
        if self.allow_batch_split:
            rungs.append("split the batch (cond/uncond, then rows) in halves")
        lines = [f"OOM guard: up to {self.max_retries} retries per model call, one rung each: "
                 + " -> ".join(f"{i + 1}. {r}" for i, r in enumerate(rungs)) + "."]
        if device is not None and torch.device(device).type == "cpu":
            lines.append("Device: CPU, where the memory rungs have nothing to free (retries and splitting still run).")
        lines.append("VAE: guarded (a full decode is retried before ComfyUI's tiled fallback)." if vae_guarded
                     else "VAE: not guarded (ComfyUI's VAEDecode falls back to tiled decoding on OOM).")
        # The report is made when the node runs, before any sampling: recoveries happen later, so they are
        # logged and shown on this node as they happen rather than counted here (the count would always be 0).
        lines.append("Recoveries during sampling are logged and shown on this node as they happen.")
        return "\n".join(lines)


def _splitter(run: _Run, batch: int, size: int) -> Callable[[], str]:
    def apply() -> str:
        run.rows_per_piece = size
        return f"split the batch of {batch} into {batch // size} pieces of {size}"
    return apply


def need_bytes(base_model, call: ModelCall, run: _Run | None = None) -> int | None:
    """ComfyUI's memory estimate for this call (for the pieces, once split)."""
    estimate = getattr(base_model, "memory_required", None)
    if estimate is None:
        return None
    rows = min(call.batch, run.rows_per_piece or call.batch) if run else call.batch
    return int(estimate([rows] + list(call.x.shape[1:])))


class CallSite:
    """Which model call this is, as "step 3/28 (model call 5)". The step is looked up only when needed (a
    fault plan, a failure): reading the sigma off the GPU would add a device sync to every call."""

    def __init__(self, index: int, transformer_options: dict):
        self.index = index
        self._options = transformer_options
        self._step = None

    def _lookup(self) -> tuple[int | None, int | None]:
        if self._step is None:
            self._step = step_of(self._options)
        return self._step

    @property
    def step(self) -> int | None:
        return self._lookup()[0]

    @property
    def n_steps(self) -> int | None:
        return self._lookup()[1]

    def __str__(self) -> str:
        step, n_steps = self._lookup()
        if step is None:
            return f"model call {self.index}"
        return f"step {step + 1}/{n_steps} (model call {self.index})"


def step_of(transformer_options: dict) -> tuple[int | None, int | None]:
    """(index of the current sigma in the run's schedule, number of steps), or (None, n) between steps."""
    schedule = transformer_options.get("sample_sigmas")
    sigma = transformer_options.get("sigmas")
    if schedule is None or sigma is None or not torch.is_tensor(schedule):
        return None, None
    n_steps = max(0, int(schedule.shape[0]) - 1)
    s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
    diffs = (schedule[:-1].float().cpu() - s).abs()
    if diffs.numel() == 0:
        return None, n_steps
    i = int(diffs.argmin())
    return (i if float(diffs[i]) <= 1e-5 * max(1.0, abs(s)) else None), n_steps


def _prompt_scope():
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return getattr(ctx, "prompt_id", None)


def _node_text(node_id: str | None, text: str) -> None:
    """Show text on the guard node in ComfyUI's front end, where the host can."""
    if not node_id or "server" not in sys.modules:
        return
    instance = getattr(getattr(sys.modules["server"], "PromptServer", None), "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is not None:
        send(text, node_id)


# -- attaching the guard --------------------------------------------------------------------------------------

def guard_model(model, max_retries: int = DEFAULT_MAX_RETRIES, allow_batch_split: bool = True,
                node_id: str | None = None) -> tuple[Any, OOMGuard]:
    """A clone of the ModelPatcher with the guard's wrappers attached (the input model is left as it was).
    A guard already on the model is replaced, not nested: two ladders would retry each other's retries."""
    from comfy.patcher_extension import WrappersMP

    guard = OOMGuard(max_retries, allow_batch_split, node_id)
    guarded = model.clone()
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        guarded.remove_wrappers_with_key(kind, WRAPPER_KEY)
    guarded.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, guard.outer_sample)
    guarded.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, guard.apply_model)
    return guarded, guard


class GuardedDecoder:
    """Stands in for a VAE's `first_stage_model` on a guarded copy of that VAE: `decode` is retried after
    freeing memory; every other attribute is the real model's (its ModelPatcher still holds the real one)."""

    def __init__(self, real, vae, guard: OOMGuard):
        self._real = real
        self._vae = vae
        self._guard = guard

    def __getattr__(self, name):
        if name in ("_real", "_vae", "_guard"):  # not set yet (copy, pickle): no recursion into _real
            raise AttributeError(name)
        return getattr(self._real, name)

    def decode(self, z, *args, **kwargs):
        vae = self._vae
        memory = self._guard.memory(getattr(vae, "patcher", None), getattr(vae, "device", z.device))
        need = None
        estimate = getattr(vae, "memory_used_decode", None)
        if estimate is not None:
            need = int(estimate(z.shape, getattr(vae, "vae_dtype", z.dtype)))
        return self._guard.decode(lambda: self._real.decode(z, *args, **kwargs), memory, need)


def guard_vae(vae, guard: OOMGuard):
    """A shallow copy of the VAE whose decoder retries out-of-memory errors; the input VAE is left as it was."""
    if getattr(vae, "first_stage_model", None) is None:  # an invalid VAE: let ComfyUI report it as usual
        return vae
    guarded = copy.copy(vae)
    guarded.first_stage_model = GuardedDecoder(vae.first_stage_model, guarded, guard)
    return guarded
