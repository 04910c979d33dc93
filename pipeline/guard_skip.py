"""A compiled DiT's calls met before in the same sampling run skip most of Dynamo's guard evaluation
(PyTorch's `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`; NEWBIE_GUARD_SKIP=0 turns it off).

Why it exists: before each compiled block runs, Dynamo checks its guards: the shape, dtype, device and strides of
every tensor the block reads, its weights among them, and the Python values it read while tracing. The profile of
a resident step with flash-attn-4 (run101, H100) put that check ("TorchDynamo Cache Lookup") at 183 us a block call
for fp8, whose weights are ComfyUI's quantized tensors (each a tensor holding tensors), and 91 us for bf16: 80 block
calls a step, 14.7 ms of the CPU's time a step for fp8, where the CPU issued a DiT call in 41 ms and the GPU ran it in
44 (bench/results/NOTES.md).

What Dynamo still checks under that stance: the guards that tell a block's compiled versions apart (those on the
tensors that are not parameters, its activations, and every guard that once failed and so caused a compile). It no
longer checks the weights or the Python values that never differed. That is safe when nothing of those changes
between the call that compiled (or chose) a version and the calls that reuse it, and so here it is used only:
- for a call whose signature (cuda_graphs.flatten: the shapes, dtypes and strides of its GPU tensors and every other
  argument by value, functions by identity; and the fp16 path's form) this sampling run has met before: its first
  call ran with every guard, so each of its block calls met a compiled version that passes them all;
- in a run where the weights do not change between calls: all on the GPU (not streamed, not offloaded), in
  ComfyUI's non-dynamic patcher (dynamic VRAM fetches them during a call), no ComfyUI hooks (which patch weights
  between steps); where ComfyUI moves or patches them during the run (the OOM Guard offloads part of the DiT and
  calls again, say), the run forgets its known calls and checks where the weights are again (`residency`);
- where no Python of other nodes runs inside the DiT: no `patches` or `patches_replace` in transformer_options and
  no other node's DIFFUSION_MODEL wrapper inside this one;
- where PyTorch has the stance, the compiler is in its default stance, and the call is not itself being compiled.
A run starts anew at each sampling run, so a LoRA, a reload or another prompt begins with full guards.

fp8 and int8 keep part of the check: their weights are ComfyUI's quantized tensors, whose inner data and scale
tensors are plain tensors, and Dynamo counts every guard on a tensor that is not an `nn.Parameter` among the
differentiating ones (43 sources in a fp8 block against 4 in a bf16 one, NOTES). Making those inner tensors
Parameters (the same memory) took the sources to 4 on the CPU but made the GPU's run slower, not faster: with cuDNN
3.102 against 2.516 s a compiled fp8 sampling run, with flash-attn-4 3.103 against 2.778 s, the CPU's time a call
50.9 against 46.7 and 52.7 against 41.2 ms (H100, runs 107 and 109); it was removed.

Measured on an H100 with flash-attn-4, in-process (bench/results run104-106; tests/unit/test_guard_skip.py passed
on the GPU, run106): with pipeline/fa4_replay.py a compiled fp8 sampling run took 2.348 against 2.404 s without
this (run105, within the spread), and both 2.261 against 2.512 s with neither (run106). Alone it ran unevenly
(2.73-3.99 s, run105): most of the CPU's saving came from the direct flash-attn-4 launches.
"""
from __future__ import annotations

import inspect
import logging

import torch

from . import compat, cuda_graphs, env_switch

log = logging.getLogger(__name__)

WRAPPER_KEY = "newbie_guard_skip"
RUN_ATTR = "newbie_known_calls"  # the running sampling run's KnownCalls, on the DiT module
# DIFFUSION_MODEL wrappers that may run inside this one: the pack's own, whose calls change nothing a block reads
# (the graphs run their recordings with every guard, in a stance of their own).
_SAFE_INNER = cuda_graphs._SAFE_INNER | {cuda_graphs.WRAPPER_KEY}


def _stance_supported() -> bool:
    set_stance = getattr(torch.compiler, "set_stance", None)
    try:
        return set_stance is not None and "skip_guard_eval_unsafe" in inspect.signature(set_stance).parameters
    except (TypeError, ValueError):
        return False


SUPPORTED = _stance_supported()


def enabled() -> bool:
    """On unless NEWBIE_GUARD_SKIP=0, where this PyTorch has the stance."""
    return SUPPORTED and env_switch.switch("NEWBIE_GUARD_SKIP", True)


def _default_stance() -> bool:
    """Whether the compiler is in its default stance (another node's force_eager, say, is left alone)."""
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    return getattr(stance, "stance", None) == "default" and not getattr(stance, "skip_guard_eval_unsafe", False)


def _skipping():
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


class KnownCalls:
    """One sampling run's DiT call signatures: `call` runs a call with every guard the first time its signature
    appears, with the differentiating guards only after. `why_not` says why the run or the last call did not skip."""

    def __init__(self, patcher):
        self.device_type = getattr(patcher.load_device, "type", "cuda")  # where the weights must all be
        self.model = patcher.model
        self.seen: set = set()
        self.skipped = 0
        self.refused: str | None = self._run_refusal(patcher)
        self.residency = None
        self.not_resident = False

    @staticmethod
    def _run_refusal(patcher) -> str | None:
        if compat.is_dynamic(patcher):
            return "dynamic VRAM fetches the weights during each call"
        if getattr(patcher, "hook_patches", None):
            return "ComfyUI hooks patch the weights between steps"
        return None

    def call(self, executor, args: tuple, kwargs: dict):
        key = self._key(executor, args, kwargs)
        if key is None:
            return executor(*args, **kwargs)
        if key in self.seen:
            try:
                with _skipping():
                    out = executor(*args, **kwargs)
            except RuntimeError as e:
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
                # A block with no compiled version that passes (it reached Dynamo's recompile limit and ran
                # eagerly at the call that checked every guard): this call again, and the run, with every guard.
                self.refused = "a compiled block reached Dynamo's recompile limit"
                log.warning("NewBie compiled blocks: %s; this sampling run checks every guard from here on",
                            self.refused)
                return executor(*args, **kwargs)
            self.skipped += 1
            return out
        out = executor(*args, **kwargs)
        self.seen.add(key)  # only once a call with every guard has finished
        return out

    def _key(self, executor, args: tuple, kwargs: dict):
        """The call's signature, or None (`why_not` says why) where it must run with every guard."""
        state = residency(self.model)
        if state != self.residency:  # the run's first call, or ComfyUI has moved or patched weights since
            self.residency = state
            self.seen.clear()
            self.not_resident = cuda_graphs.weight_addresses(executor.class_obj, self.device_type) is None
        if self.refused is not None or self.not_resident:
            return None
        if torch.compiler.is_compiling() or not _default_stance():
            return None
        self.refused = cuda_graphs.foreign_code(executor, kwargs.get("transformer_options") or {}, _SAFE_INNER)
        if self.refused is not None:
            return None
        fp16 = getattr(executor.class_obj, "newbie_fp16_state", None)
        try:
            return (getattr(fp16, "mode", None), cuda_graphs.flatten((args, kwargs), [], self.device_type))
        except cuda_graphs.Unsupported as e:
            self.refused = f"{e} in the call's arguments"
            return None

    def why_not(self) -> str | None:
        """Why the run's calls (or the last ones) checked every guard, or None."""
        return self.refused or ("a weight is not on the GPU (streamed or offloaded)" if self.not_resident else None)


def residency(model) -> tuple:
    """What ComfyUI's ModelPatcher keeps of where the model's weights are and which patches they carry: it changes
    when it loads, unloads or partly unloads them (the OOM Guard's offload during a run among them) or patches them.
    A change forgets the run's known calls and checks the weights again."""
    return tuple(getattr(model, name, None) for name in
                 ("model_loaded_weight_memory", "model_lowvram", "lowvram_patch_counter", "current_weight_patches_uuid"))


def _known_call(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the call through the running sampling run's KnownCalls, where there is one."""
    run = getattr(executor.class_obj, RUN_ATTR, None)
    if run is None:
        return executor(*args, **kwargs)
    return run.call(executor, args, kwargs)


def _sampling_run(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a sampling run with its own KnownCalls."""
    patcher = executor.class_obj.model_patcher
    dm = patcher.model.diffusion_model
    if not enabled() or getattr(dm, RUN_ATTR, None) is not None:
        return executor(*args, **kwargs)
    run = KnownCalls(patcher)
    setattr(dm, RUN_ATTR, run)
    try:
        return executor(*args, **kwargs)
    finally:
        delattr(dm, RUN_ATTR)
        log.info("NewBie compiled blocks: %d DiT calls of this run skipped Dynamo's weight guards%s", run.skipped,
                 f" ({run.why_not()})" if run.why_not() else "")


def attach(patcher) -> None:
    """Skip the weight guards of a compiled DiT's known calls in each sampling run (replaces an earlier attach).
    Attach it after the pack's other DIFFUSION_MODEL wrappers but the CUDA graphs'."""
    import comfy.patcher_extension as pe

    patcher.model.diffusion_model.newbie_fp16_state = getattr(patcher.model, "newbie_fp16", None)
    for kind, fn in ((pe.WrappersMP.OUTER_SAMPLE, _sampling_run), (pe.WrappersMP.DIFFUSION_MODEL, _known_call)):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)


def describe() -> str:
    """The loader report's line, for a compiled DiT."""
    if not SUPPORTED:
        return "Dynamo guards: all checked at every block call (this PyTorch cannot skip them)"
    if not enabled():
        return "Dynamo guards: all checked at every block call (NEWBIE_GUARD_SKIP=0)"
    return ("Dynamo guards: the weights' checked at the first call of each kind in a sampling run, not at every block "
            "call (where they stay on the GPU)")
