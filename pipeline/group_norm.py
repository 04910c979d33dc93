"""The FLUX VAE's GroupNorms by the pack's kernels (on by default where they run; NEWBIE_VAE_GROUP_NORM=0 turns
them off).

Why: PyTorch's CUDA GroupNorm computes each group's statistics in one thread block (`RowwiseMomentsCUDAKernel`), so
a batch-1 decode with the VAE's 32 groups keeps 32 of an H100's 132 multiprocessors busy while each block reads
4 M values at full resolution. Profiled on an H100 (bench/vae_decode.py, run130, bf16, 1024²): the 30 GroupNorms
took 50.6 of the decoder's 88.7 ms, 45.7 of them in that statistics kernel; the convolutions 22 ms.

Here the statistics are split over many programs: each takes a chunk of one group, tile by tile, and keeps its
count, mean and sum of squared deviations in fp32 (Chan's parallel combination, as robust as PyTorch's Welford);
a second kernel combines a group's chunks into its mean and 1/sqrt(var + eps); a third normalises as PyTorch's
kernel does (a = rstd * weight, s = bias - mean * a, out = x * a + s in fp32, rounded once). The values are
PyTorch's but for the order of the sums.

Measured (H100): the decoder 43.5 against 89.6 ms in-process, ComfyUI's whole `VAE.decode` 51 against 97 ms
(bench/vae_decode.py, run131; run132 the same); a bf16 decode against an fp32 one within 1.6 % of the largest value,
mean 0.18 %, where PyTorch's GroupNorm gives 1.4 % and 0.19 % (run133). In the server (bf16, resident, medians of 5
warm images, two rounds): the decode node 0.08-0.11 against 0.12-0.15 s, the warm image 3.36 against 3.43 and
3.41 s, 0.741x and 0.734x upstream's best against 0.756x and 0.744x (run131).

How it reaches the VAE: the VAE's `decode` and `encode` (ComfyUI calls its first-stage model's, for whole and tiled
decodes alike) are given, through ComfyUI's object patches on the VAE's patcher, a form that runs the host's own
method under `FastGroupNorm`, a TorchFunctionMode that sends `F.group_norm` calls it can take to `group_norm` and
everything else on unchanged. Whatever weights ComfyUI hands the layer (cast, offloaded, dynamic VRAM) are the
ones normalised with, so this holds on every host the pack supports. Calls it leaves to PyTorch: a CPU or any
non-CUDA tensor, a tensor that is not contiguous (channels-last), a dtype other than fp32/bf16/fp16, a group of
fewer than `MIN_GROUP_VALUES` values (PyTorch's kernel is quick there), anything that needs gradients. Should
the kernels fail on a system (a Triton that cannot compile them, say), the call and every later one go to PyTorch,
with one warning in the log; running out of memory is raised as it is, for ComfyUI's tiled retry of the decode.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import env_switch, triton_ops
from .oom import memory

log = logging.getLogger(__name__)

SWITCH = "NEWBIE_VAE_GROUP_NORM"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Groups smaller than this stay with PyTorch's kernel: one block a group is quick there, and three launches are not
MIN_GROUP_VALUES = 1 << 16
# A statistics program takes MOMENTS_TILES tiles of MOMENTS_BLOCK values of one group: at the decoder's full
# resolution (1024², 4 M values a group) 256 programs a group, 8192 in all
MOMENTS_BLOCK = 2048
MOMENTS_TILES = 8
APPLY_BLOCK = 2048
NUM_WARPS = 4
METHODS = ("decode", "encode")  # the VAE's first-stage methods that ComfyUI calls


def enabled() -> bool:
    """On unless NEWBIE_VAE_GROUP_NORM=0."""
    return env_switch.switch(SWITCH, True)


def usable(device) -> bool:
    """Whether the kernels can run for a VAE on `device`: a CUDA device with Triton (plain Triton kernels, launched
    eagerly: the VAE is not compiled, so no `triton_op` is needed)."""
    return triton_ops.available(device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(group_size: int, block: int, tiles: int) -> tuple[int, int]:
    """(splits, chunk): a group of `group_size` values cut into `splits` chunks of `chunk` = tiles * block values
    (the last one may be shorter)."""
    chunk = block * tiles
    return _cdiv(group_size, chunk), chunk


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) by the kernels, for a contiguous x [B, C, ...] with C divisible by
    `groups` (the tests run them under Triton's interpreter on the CPU)."""
    from triton import next_power_of_2

    from ._group_norm_kernel import group_apply_kernel, group_moments_kernel, group_stats_kernel

    b, c = x.shape[0], x.shape[1]
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    rows = b * groups
    group_size = x.numel() // rows
    splits, _ = split_plan(group_size, MOMENTS_BLOCK, MOMENTS_TILES)
    partial = torch.empty(3, rows, splits, device=x.device, dtype=torch.float32)
    group_moments_kernel[(rows, splits)](x, partial, group_size, rows, splits, BLOCK=MOMENTS_BLOCK,
                                         TILES=MOMENTS_TILES, num_warps=NUM_WARPS)
    stats = torch.empty(2, rows, device=x.device, dtype=torch.float32)
    group_stats_kernel[(rows,)](partial, stats, rows, splits, eps, SPLITS_BLOCK=next_power_of_2(splits))
    plane = x.numel() // (b * c)
    group_apply_kernel[(b * c, _cdiv(plane, APPLY_BLOCK))](
        x, out, stats, weight if weight is not None else x, bias if bias is not None else x, c, c // groups, rows,
        plane, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=APPLY_BLOCK, num_warps=NUM_WARPS)
    return out


def _takes_parameter(p, x: torch.Tensor, channels: int) -> bool:
    return p is None or (isinstance(p, torch.Tensor) and type(p) in (torch.Tensor, torch.nn.Parameter)
                         and p.device == x.device and p.dtype in _DTYPES and p.shape == (channels,)
                         and p.is_contiguous())


def fits(x, groups, weight=None, bias=None) -> bool:
    """Whether `group_norm` computes this F.group_norm call as PyTorch would, whatever x's device: a plain
    contiguous fp32/bf16/fp16 tensor [B, C, ...] with C divisible by `groups` into groups of `MIN_GROUP_VALUES` or
    more, nothing that needs gradients, and weight and bias absent or plain contiguous [C] tensors beside x."""
    if not (isinstance(x, torch.Tensor) and type(x) is torch.Tensor and x.dtype in _DTYPES and x.dim() >= 3
            and isinstance(groups, int) and groups > 0 and x.shape[1] % groups == 0 and x.is_contiguous()):
        return False
    if x.numel() // max(x.shape[0] * groups, 1) < MIN_GROUP_VALUES:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return _takes_parameter(weight, x, x.shape[1]) and _takes_parameter(bias, x, x.shape[1])


def takes(x, groups, weight=None, bias=None) -> bool:
    """Whether `FastGroupNorm` sends this call to the kernels: a CUDA tensor that `fits`."""
    return isinstance(x, torch.Tensor) and x.is_cuda and fits(x, groups, weight, bias)


def _group_norm_arguments(input, num_groups, weight=None, bias=None, eps=1e-5):
    return input, num_groups, weight, bias, eps


_failed: list[str] = []  # why the kernels failed in this process, once they have: then PyTorch's GroupNorm runs


def _fast(x, groups, weight, bias, eps):
    """group_norm's result, or None where the kernels failed (now or before) with anything but running out of
    memory."""
    if _failed:
        return None
    try:
        return group_norm(x, groups, weight, bias, eps)
    except Exception as e:  # noqa: BLE001 - any failure of the kernels but memory leaves the work to PyTorch's
        if memory.is_oom(e):  # what the host counts as out of memory
            raise
        _failed.append(f"{type(e).__name__}: {e}")
        log.warning("NewBie: the VAE's GroupNorm kernels failed (%s); PyTorch's GroupNorm runs from now on "
                    "(%s=0 skips them)", _failed[0][:300], SWITCH)
        return None


class FastGroupNorm(TorchFunctionMode):
    """Sends the F.group_norm calls that `group_norm` takes to it; every other call runs as it would."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm:
            x, groups, weight, bias, eps = _group_norm_arguments(*args, **kwargs)
            if takes(x, groups, weight, bias):
                out = _fast(x, groups, weight, bias, eps)
                if out is not None:
                    return out
        return func(*args, **kwargs)


def _under_fast_group_norm(name: str):
    def method(model, *args, **kwargs):
        with FastGroupNorm():
            return getattr(type(model), name)(model, *args, **kwargs)
    method.__name__ = name
    return method


def attach(vae) -> int:
    """Give the VAE's first-stage model `decode` and `encode` that run under `FastGroupNorm` (ComfyUI's object
    patches on the VAE's patcher). Returns how many methods."""
    model = vae.patcher.model
    n = 0
    for name in METHODS:
        if callable(getattr(type(model), name, None)):
            vae.patcher.add_object_patch(name, types.MethodType(_under_fast_group_norm(name), model))
            n += 1
    return n


def attached(vae) -> bool:
    return any(k in vae.patcher.object_patches for k in METHODS)


def describe(vae) -> str:
    """The loader report's line."""
    if attached(vae):
        return f"VAE: GroupNorm statistics split over the GPU by the pack's kernels ({SWITCH}=0 for PyTorch's)"
    why = f"{SWITCH}=0" if not enabled() else "the pack's kernels need a CUDA GPU with Triton"
    return f"VAE: PyTorch's GroupNorm ({why})"
