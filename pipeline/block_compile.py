"""Regional compilation of NewBie's DiT: each transformer block compiled on its own (loader `compile`).

Upstream's TorchCompileModel compiles the whole DiT as one program: about 2 minutes before the first 1024² image
(shared measurements). Next-DiT is 40 blocks of three kinds (2 context refiners without AdaLN, 2 noise refiners
and 36 main layers with it), and the blocks of one kind run the same code on the same shapes. Compiling each block
on its own lets Dynamo reuse one compiled graph for every block it fits (parameters are graph inputs, not
constants), so the compile cost is that of a few blocks, whatever the depth. Inside a block Inductor fuses the
elementwise work between the matrix multiplies (RMSNorm + modulation, tanh gate + residual, SwiGLU, the fp16
path's casts; the q/k RMSNorm + RoPE too, see rope_fusion.py). Inductor's on-disk caches (FX graph and
autotuning caches, on by default) keep the generated kernels, so a restarted server skips most of the
compilation; Dynamo still traces the few blocks again.

The compiled blocks are swapped in by ComfyUI's own helper (`comfy_api.torch_helpers.set_torch_compile_wrapper`,
an APPLY_MODEL wrapper), only for the duration of a model call, so loading, LoRA patching, offloading and the
OOM Guard see the plain modules. A sampling-run wrapper logs how many graphs each run compiled, so a user sees
the first run pay and the next ones not.

A compiled model is held by ComfyUI's non-dynamic ModelPatcher (the loader picks it, as upstream's
TorchCompileModel does with `clone(disable_dynamic=True)`): under dynamic VRAM every Linear fetches its weight
through comfy-aimdo on each call, which Dynamo cannot trace, so each block fell apart into many small graphs and
ran about 3x slower than eager (measured on an H200: 14.0 s against 4.8 s a warm image; bench/results/NOTES.md).
With the plain patcher a resident block's weights are ordinary parameters and the block is one graph.

`auto` (the loader's default) compiles where it pays and can run: a CUDA device with Triton, and room on the GPU
for the DiT's weights plus a call's activations. On a CPU it stays eager (Inductor's C++ backend would need a
compiler and gains little). Where the weights cannot stay resident it stays eager too: the non-dynamic patcher
then streams the layers beyond its room through ComfyUI's lowvram casts, and dynamic VRAM (which compiled blocks
cannot use) streams faster. Measured on an H200 with the GPU held to a budget (bench/results/run17-results.json):
at 8 and 12 GiB the resident compiled DiT ran 7.5 it/s against upstream's 4.9 and 5.4; at 4 GiB the streamed
compiled DiT ran 2.4 it/s against upstream's 3.3 under dynamic VRAM; eager under dynamic VRAM it ran 3.8 it/s
against upstream's 3.9 (run20).
"""
from __future__ import annotations

import functools
import logging

from . import env_switch

log = logging.getLogger(__name__)

BLOCK_LISTS = ("context_refiner", "noise_refiner", "layers")
WRAPPER_KEY = "newbie_block_compile"
MODES = ("auto", "off", "blocks")


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# What a 1024x1024 CFG call needs beside the weights (measured peak 0.8 GiB above them, bench/profile_dit.py).
ACTIVATION_ROOM = 1024 ** 3


def weights_fit(weight_bytes: int | None, room_bytes: int | None) -> bool | None:
    """Whether `weight_bytes` of DiT weights plus a 1024x1024 call's activations fit in `room_bytes` on the GPU;
    None where either is unknown (a CPU, or a user's VRAM budget)."""
    if weight_bytes is None or room_bytes is None:
        return None
    return weight_bytes + ACTIVATION_ROOM <= room_bytes


# What compiling quantized blocks did on an H200 (torch 2.11, bench/results/run18-results.json, run19-profile.json):
# Dynamo failed in the first sampling step on ComfyUI's quantized layers, which rebuild the activation as a
# QuantizedTensor each call ("vr must not be None for symbol s31"), and the job failed. The pack's layers for fp8
# and for int8 on Hopper+ (pipeline/quantized_ops.py; the loader's `quantized_ops_for`) use plain tensor ops, which
# Dynamo traces: compiled fp8 blocks ran a call in 0.102 s against 0.140 s eager, and the server sampled 8.45 it/s
# against the compiled bf16 DiT's 7.59 (run22). Those compile under `auto` like 16-bit weights; ComfyUI's own
# quantized layers (int8 before Hopper, which quantizes its activations) stay eager.
QUANTIZED_EAGER = "quantized weights run eager: Dynamo failed on ComfyUI's quantized layers (torch 2.11, H200)"


def resolve(mode: str, device, weight_bytes: int | None = None, room_bytes: int | None = None,
            quantized: bool = False, traceable: bool = False) -> tuple[str, str]:
    """(mode, why): 'auto' -> 'blocks' on a CUDA device with Triton where `weight_bytes` of DiT weights plus a call's
    activations fit in `room_bytes` (either None: not checked), else 'off'; other modes as given. Quantized weights
    (ComfyUI's QuantizedTensor, pipeline/quantize.py) run eager unless their layers are `traceable` (the pack's
    plain-op layers), which are treated as 16-bit ones."""
    if mode not in MODES:
        raise ValueError(f"compile={mode!r}: expected one of {list(MODES)}")
    if quantized and not traceable and mode != "off":
        return "off", ("auto: " if mode == "auto" else "'blocks' not applied: ") + QUANTIZED_EAGER
    if mode != "auto":
        return mode, "as chosen"
    if getattr(device, "type", str(device)) != "cuda":
        return "off", "auto: eager on a CPU"
    if not _triton_available():
        return "off", "auto: Triton is not installed"
    if weights_fit(weight_bytes, room_bytes) is False:
        return "off", (f"auto: the DiT's {weight_bytes / 2**30:.1f} GiB of weights cannot stay on the GPU (room for "
                       f"{room_bytes / 2**30:.1f} GiB beside a 1024² VAE decode), and streamed weights run faster "
                       "eager under dynamic VRAM")
    return "blocks", "auto: CUDA with Triton, weights resident" + (", quantized layers as plain ops" if quantized
                                                                  else "")


def block_keys(diffusion_model) -> list[str]:
    """The BaseModel attribute paths of every transformer block, as set_torch_compile_wrapper takes them."""
    return [f"diffusion_model.{name}.{i}" for name in BLOCK_LISTS
            for i in range(len(getattr(diffusion_model, name, None) or ()))]


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# torch.compile's own phase timers (torch._dynamo.utils.compilation_time_metrics: name -> seconds per event) that
# say where a first image's compile time goes: all of Dynamo's work, its tracing, the backend (Inductor), and the
# part of that spent loading code from Inductor's on-disk cache.
COMPILE_PHASES = (("torch.compile", "_compile.compile_inner"), ("tracing", "bytecode_tracing"),
                  ("Inductor", "OutputGraph.call_user_compiler"), ("cache loads", "PyCodeCache.load_by_key_path"))


def compile_phase_seconds() -> dict[str, float]:
    """Seconds spent so far in this process in each of COMPILE_PHASES (those this PyTorch times)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:
        return {}
    return {label: float(sum(metrics[key])) for label, key in COMPILE_PHASES if key in metrics}


def describe_compile_time(before: dict[str, float], after: dict[str, float]) -> str:
    """'; 9.3 s in torch.compile (tracing 1.6 s, Inductor 7.1 s, cache loads 6.6 s)' for one run, or ''."""
    spent = {k: after[k] - before.get(k, 0.0) for k in after}
    total = spent.pop(COMPILE_PHASES[0][0], None)
    if total is None:
        return ""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in spent.items())
    return f"; {total:.1f} s in torch.compile" + (f" ({parts})" if parts else "")


# torch.compile's own counters of its on-disk caches: (label, counter group, key prefix). With both caches warm a
# first image still spent 6.0 s in Inductor and 0.1 s loading cached code (run45, H200): these say whether the
# graphs were found in the cache (hit), compiled anew (miss) or could not be cached (bypass).
CACHE_COUNTERS = (("FX graph cache", "inductor", "fxgraph_cache"), ("AOTAutograd cache", "aot_autograd",
                                                                    "autograd_cache"))
CACHE_OUTCOMES = ("hit", "miss", "bypass")


def cache_counts() -> dict[str, int]:
    """'{label} {outcome}' -> how often so far in this process, for CACHE_COUNTERS."""
    from torch._dynamo.utils import counters

    return {f"{label} {outcome}": int(counters[group][f"{prefix}_{outcome}"])
            for label, group, prefix in CACHE_COUNTERS for outcome in CACHE_OUTCOMES}


def describe_cache_use(before: dict[str, int], after: dict[str, int]) -> str:
    """'; FX graph cache 4 hit 0 miss 0 bypass, AOTAutograd cache ...' for one run."""
    parts = []
    for label, _, _ in CACHE_COUNTERS:
        counts = " ".join(f"{after[f'{label} {o}'] - before.get(f'{label} {o}', 0)} {o}" for o in CACHE_OUTCOMES)
        parts.append(f"{label} {counts}")
    return "; " + ", ".join(parts)


def _log_compiles(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one sampling run; logs the graphs it compiled, where their compile time went and how
    the compile caches served them."""
    before, phases, caches = compiled_graph_count(), compile_phase_seconds(), cache_counts()
    try:
        return executor(*args, **kwargs)
    finally:
        new = compiled_graph_count() - before
        log.info("NewBie block compile: %d graph%s compiled in this sampling run (%d in this process)%s",
                 new, "" if new == 1 else "s", before + new,
                 describe_compile_time(phases, compile_phase_seconds()) + describe_cache_use(caches, cache_counts())
                 if new else "")


def inductor_options(backend: str) -> dict | None:
    """Inductor options from the environment, for comparisons on a GPU: NEWBIE_CPP_WRAPPER=1 generates each
    compiled block's launcher in C++ instead of Python (Inductor's `cpp_wrapper`). A resident step issues its
    kernels from Python at about the pace the GPU runs them (run31/32, bench/results/NOTES.md), so a cheaper
    launcher may close the GPU's gaps; it costs a C++ compiler and compile time at the first image. Off by
    default until measured.

    Inductor's `triton.multi_kernel` (persistent row reductions, which read a row once) was tried for fp8's SwiGLU
    kernel that finds each row's amax and did not pay: the persistent kernel took 141.7 against 138.7 us a call,
    the image 2.499 against 2.518 s in-process, and a graph with multi-kernels failed to load from the FX graph
    cache (torch 2.11: triton's JITFunction without its hash lock, H100, run89), so there is no switch for it."""
    if backend == "inductor" and env_switch.switch("NEWBIE_CPP_WRAPPER", False):
        return {"cpp_wrapper": True}
    return None


# The attributes ComfyUI's cast layers read in their forward (comfy.ops.CastWeightBiasOp) that its loader sets on
# the instance when it offloads a layer and sets back when it loads it again. Until then they are class attributes,
# and Dynamo guards on where an attribute lives as well as its value: the first image after a VAE decode had
# partly unloaded a resident DiT recompiled 3 of its 4 block graphs (6.6 s; the fp8 DiT at 6 GiB, run46), for
# `comfy_cast_weights` back at its old value but now in the layer's __dict__.
CAST_STATE = ("comfy_cast_weights", "weight_function", "bias_function")


def own_cast_state(diffusion_model) -> int:
    """Give each cast layer its own copy of CAST_STATE, at the values it has, so that ComfyUI's offloading and
    reloading change values only, never where they live; returns how many layers."""
    n = 0
    for module in diffusion_model.modules():
        if not hasattr(module, CAST_STATE[0]):
            continue
        for name in CAST_STATE:
            if name not in vars(module):
                value = getattr(module, name)
                setattr(module, name, list(value) if isinstance(value, list) else value)
        n += 1
    return n


# Dynamo keeps at most `recompile_limit` (8 by default) compiled versions of one code object, and every transformer
# block of every Next-DiT in the process shares one forward: 3 block kinds a model, times each precision's layer
# classes (guarded by type). A server that has run a bf16 and a fp8 NewBie holds 6; a third precision's blocks would
# run eagerly (and before guard_skip's fallback, failed the job under its stance). The pack asks for room for more.
RECOMPILE_LIMIT = 64


def make_room_for_versions() -> int | None:
    """Raise Dynamo's per-code-object limit of compiled versions to RECOMPILE_LIMIT where it is lower (never lower
    it: a user's or another node's higher value stays); returns the limit now, or None where this PyTorch has none."""
    import torch._dynamo

    config = torch._dynamo.config
    name = next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(config, n)), None)
    if name is None:
        return None
    if getattr(config, name) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)
    return getattr(config, name)


def apply(patcher, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each transformer block of the patcher's DiT (on first use); returns how many blocks.
    Applying it again replaces the earlier compile wrapper (ComfyUI's helper removes it by key)."""
    import comfy.patcher_extension
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from . import block_stream, cuda_graphs, guard_skip, rope_fusion

    keys = block_keys(patcher.model.diffusion_model)
    if not keys:
        raise ValueError("block compile: this model has no transformer blocks where NewBie's Next-DiT has them")
    rope_fusion.enable()
    block_stream.detach(patcher)  # compiled blocks take their weights where ComfyUI's cast puts them
    own_cast_state(patcher.model.diffusion_model)
    make_room_for_versions()
    set_torch_compile_wrapper(patcher, backend=backend, mode=mode, keys=keys, options=inductor_options(backend))
    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _log_compiles)
    guard_skip.attach(patcher)
    cuda_graphs.attach(patcher)  # again, so that it stays the innermost DIFFUSION_MODEL wrapper
    return len(keys)
