"""The scaled-dot-product attention NewBie's DiT runs: FlashAttention-4 where it is installed and pays (Hopper),
otherwise PyTorch SDPA with cuDNN's attention tried first.

Upstream ComfyUI (comfy/ops.py) puts FlashAttention-2 first, and PyTorch's own order differs between versions
(2.11 picked cuDNN on an H200). On Hopper cuDNN's fused attention is faster at NewBie's shapes (24 heads of 96 over
~4.3k tokens): 35 against 47 ms of attention a CFG step, the same error against fp32 (bench/attention_backends.py,
run30), where attention is about a third of a step's GPU time. The order is a priority list, not a restriction:
where cuDNN declines an input (a mask it cannot take, an old GPU, a CPU tensor) PyTorch takes the next backend,
so the result is the same attention up to rounding.

FlashAttention-4 (pipeline/flash_attn4.py, the optional `flash-attn-4` package) runs the unmasked 16-bit calls
where it is chosen; any other call goes to SDPA in the order below. It is chosen by default on Hopper only, where it
was measured faster in the sampled DiT (run42, run43); elsewhere `NEWBIE_SDPA=fa4` tries it.

In compiled blocks the order is not set inside the graph: a `sdpa_kernel` context there is a switch of global
state that AOTAutograd's on-disk cache refuses (its counter said "4 bypass" for the blocks on an H200, run47), so
every server start traced them through AOTAutograd again, about 6 s of a first image with the caches filled
(run45). `around_call` sets the order around the whole DiT call instead, where the compiled blocks are traced,
and tags torch.compile's cache keys with the choice, so a cached graph of one attention is never loaded for
another.

`NEWBIE_SDPA` chooses, read at each call (a compiled block bakes the choice in when it is traced): `auto`
(FlashAttention-4 on compute capability 9.x when it is installed, else cuDNN first on 9.0 and newer), `fa4`
(FlashAttention-4 on any CUDA GPU it runs on), `cudnn`, `flash` (PyTorch's FlashAttention-2 first), or `torch`
(PyTorch's own order, untouched).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

from . import env_switch, fa4_replay, flash_attn4

MODES = ("auto", "fa4", "cudnn", "flash", "torch")


def mode() -> str:
    value = env_switch.value("NEWBIE_SDPA", "auto")
    return value if value in MODES else "auto"


def _priority_supported() -> bool:
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        return False
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


_HAS_PRIORITY = _priority_supported()


def _major(index) -> int:
    """The GPU's compute capability major version (9: Hopper)."""
    return torch.cuda.get_device_capability(index)[0]


def _fused_order(first: str) -> list[str]:
    """The fused backends in the pack's priority order with `first` ("cudnn" or "flash") first."""
    return [first] + [name for name in ("cudnn", "flash", "efficient") if name != first]


def _order(first: str):
    from torch.nn.attention import SDPBackend as B

    backends = {"cudnn": B.CUDNN_ATTENTION, "flash": B.FLASH_ATTENTION, "efficient": B.EFFICIENT_ATTENTION}
    return [backends[name] for name in _fused_order(first)] + [B.MATH]


def sdpa_first(device: torch.device) -> str | None:
    """The SDPA backend put first for tensors on `device` ("cudnn" or "flash"), None for PyTorch's own order."""
    m = mode()
    if m == "torch" or device.type != "cuda" or not _HAS_PRIORITY:
        return None
    if m in ("auto", "fa4"):
        return "cudnn" if _major(device.index) >= 9 else None
    return m


def first_backend(device: torch.device) -> str | None:
    """What runs attention on `device`: "fa4" (FlashAttention-4), else `sdpa_first`'s choice."""
    m = mode()
    if (m in ("auto", "fa4") and device.type == "cuda" and (m == "fa4" or _major(device.index) == 9)
            and flash_attn4.installed()):  # imported only where it would be used
        return "fa4"
    return sdpa_first(device)


@torch.compiler.assume_constant_result
def _first_backend_constant(device: torch.device) -> str | None:
    """first_backend as a compiled block traces it: evaluated once and baked in, so Dynamo neither guards on the
    environment nor traces the capability check (a tuple comparison there broke the trace on an H200)."""
    return first_backend(device)


@torch.compiler.assume_constant_result
def _sdpa_first_constant(device: torch.device) -> str | None:
    return sdpa_first(device)


def sdpa(q, k, v, attn_mask=None, kv_repeat: int = 1, grouped_sdpa: bool = False):
    """F.scaled_dot_product_attention(q, k, v, attn_mask) ([B, H, N, D]) by the backend `first_backend` chose.
    Grouped key/value heads come in one of two forms: `kv_repeat` > 1, k's and v's heads each that many side-by-side
    copies of one (ComfyUI's grouped-query attention, pipeline/kv_repeat.py); or k and v with fewer heads than q,
    each group's head once (pipeline/qkv_rope.py's forward). FlashAttention-4 takes one of each; so does PyTorch
    SDPA with `grouped_sdpa` (its `enable_gqa`) where its backend takes grouped heads (`takes_grouped`); otherwise
    SDPA gets copies."""
    repeat = kv_repeat if k.shape[1] == q.shape[1] else 1  # k and v that came grouped hold no copies to take away
    first = _first_backend_constant(q.device)
    if first == "fa4":
        if attn_mask is None and flash_attn4.takes(q, k, v):
            return flash_attn4.attention(q, *one_of_each(k, v, repeat))
        first = _sdpa_first_constant(q.device)
    grouped = {}
    kv_heads = k.shape[1] // max(repeat, 1)
    if kv_heads < q.shape[1]:
        if (grouped_sdpa and attn_mask is None and _takes_grouped_constant(
                first, q.device, q.dtype, q.shape[1], kv_heads, q.shape[3])):
            k, v = one_of_each(k, v, repeat)
            grouped = {"enable_gqa": True}
        elif k.shape[1] < q.shape[1]:  # the copies SDPA then needs, side by side as ComfyUI makes them
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if first is None or torch.compiler.is_compiling():  # compiled: the order is set by around_call
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **grouped)
    with _priority(first):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **grouped)


# The fused backends PyTorch SDPA may choose, by the name `sdpa_first` gives each, with their capability checks
# (torch.backends.cuda, PyTorch 2.3 and newer; the math backend takes anything)
_CHECKS = {"cudnn": "can_use_cudnn_attention", "flash": "can_use_flash_attention",
           "efficient": "can_use_efficient_attention"}


def grouped_keeps_the_backend(order, takes) -> bool:
    """Whether grouped heads leave PyTorch SDPA on the backend it runs with copies: `takes(name, grouped)` says
    whether a backend runs the call. `order`: the backend names in the priority set (`sdpa_first`), or None for
    PyTorch's own order, which this does not know: then every backend that runs the copies must run the grouped
    call."""
    names = list(_CHECKS) if order is None else list(order)
    chosen = [n for n in names if takes(n, False)]
    if not chosen:
        return False  # the math backend runs the copies; grouped, it would too, but nothing fused is won
    if order is not None:
        return takes(chosen[0], True)
    return all(takes(n, True) for n in chosen)


# Tokens of the calls `takes_grouped` asks about: not the call's own (a compiled block may trace them as a symbol,
# which a constant result cannot take); the backends' token limits are the same with grouped heads as without
PROBE_TOKENS = 1024


@functools.cache
def takes_grouped(first: str | None, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                  head_dim: int) -> bool:
    """Whether PyTorch SDPA, with `first` put first (`sdpa_first`), runs a call with `kv_heads` grouped key/value
    heads (enable_gqa) on the backend it would run with `heads` copies of them: asked of PyTorch's own capability
    checks once a kind of call, on empty tensors (batch 1, PROBE_TOKENS tokens). False where this PyTorch cannot
    say (no grouped SDPAParams, no checks): the copies are the safe side, since a backend that declines grouped
    heads leaves the call to a slower one (FlashAttention-2 took 47 against cuDNN's 35 ms a step on an H200)."""
    backends = getattr(torch.backends, "cuda", None)
    params_cls = getattr(backends, "SDPAParams", None)
    if device.type != "cuda" or params_cls is None:
        return False
    q = torch.empty(1, heads, PROBE_TOKENS, head_dim, device=device, dtype=dtype)
    kv = {grouped: torch.empty(1, kv_heads if grouped else heads, PROBE_TOKENS, head_dim, device=device, dtype=dtype)
          for grouped in (False, True)}
    try:
        params = {grouped: params_cls(q, t, t, None, 0.0, False, grouped) for grouped, t in kv.items()}
    except TypeError:  # a PyTorch whose SDPAParams has no enable_gqa
        return False

    def takes(name: str, grouped: bool) -> bool:
        check = getattr(backends, _CHECKS[name], None)
        return bool(check is not None and check(params[grouped]))

    return grouped_keeps_the_backend(None if first is None else _fused_order(first), takes)


@torch.compiler.assume_constant_result
def _takes_grouped_constant(first, device, dtype, heads, kv_heads, head_dim) -> bool:
    """takes_grouped as a compiled block traces it: evaluated once and baked in."""
    return takes_grouped(first, device, dtype, heads, kv_heads, head_dim)


def one_of_each(k, v, kv_repeat: int):
    """k and v ([B, H, N, D]) with one head of each `kv_repeat` side-by-side copies (all of them for 1)."""
    if kv_repeat <= 1:
        return k, v
    k, v = k[:, ::kv_repeat], v[:, ::kv_repeat]
    if torch.compiler.is_compiling():
        # a buffer of their own in FlashAttention's layout ([B, N, H, D], which cuDNN takes too), computed by
        # Inductor in the kernel before (the q/k norm and RoPE) instead of the copies the slices would view
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    return k, v


def _priority(first: str | None):
    """The SDPA backend order with `first` first, as a context (none for PyTorch's own order)."""
    if first is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_order(first), set_priority=True)


CACHE_TAG = "newbie-attention-{}"


def _cache_tag(first: str | None):
    """torch.compile's cache-key tag (a user's own kept) with the attention choice, as a context; none where this
    PyTorch has no such tag."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return contextlib.nullcontext()
    tag = CACHE_TAG.format(first or "torch")
    return config.patch(cache_key_tag=f"{config.cache_key_tag}|{tag}" if config.cache_key_tag else tag)


def around_call(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the DiT call inside its attention's SDPA order and cache-key tag (module docstring),
    so compiled blocks are traced with the order outside their graphs."""
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, torch.Tensor):
        return executor(*args, **kwargs)
    with _priority(sdpa_first(x.device)), _cache_tag(first_backend(x.device)):
        return executor(*args, **kwargs)


def describe(device: torch.device, kv_repeat: int = 1, grouped_sdpa: bool = False) -> str:
    """The loader report's line (`kv_repeat`, `grouped_sdpa`: pipeline/kv_repeat.py's options for the model)."""
    first = first_backend(device)
    grouped = (f"; ComfyUI's {kv_repeat} copies of each key/value head go to flash-attn-4 as one"
               f"{', and to PyTorch SDPA so where its backend takes grouped heads' if grouped_sdpa else ''}"
               if kv_repeat > 1 else "")
    if first == "fa4":
        direct = ("; from a shape's third call its kernel is launched directly" if fa4_replay.enabled()
                  else "")
        return (f"attention: FlashAttention-4 (flash-attn-4 {flash_attn4.version() or '?'}; its kernels compile "
                f"at the first sampling run and are kept in its on-disk cache{direct}; NEWBIE_SDPA=cudnn for "
                f"PyTorch SDPA{grouped})")
    order = {"cudnn": "cuDNN first", "flash": "FlashAttention-2 first", None: "PyTorch's own order"}[first]
    return f"attention: PyTorch SDPA ({order}{grouped})"
