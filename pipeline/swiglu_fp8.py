"""fp8's feed-forward with w2's input made by one hand-written Triton kernel (NEWBIE_FP8_W2=kernel; opt-in).

fp8's w2 multiplies in fp8 with its bf16 input scaled per row (pipeline/quantized_ops.py, `fp8_linear_rowwise`).
Inside a compiled block Inductor fuses the SwiGLU product, each row's amax, the scaling and the e4m3 cast into one
kernel. On an H100 it took 138.7 us a call (4396 rows of 9216, run89), 10 ms of a step, where reading the two bf16
inputs once and writing the fp8 output is about 66 us at 3 TB/s. Its source (run92) runs one program a row in two
loops, the amax and then the same inputs read again, and at that speed the second read comes from HBM.

`_swiglu_rowwise_kernel` runs a fixed grid of a few programs an SM instead, each looping over its rows, so that the
rows in flight (what the second pass reads again) stay a few MB, inside L2. It needs w1's and w3's outputs, which
only the feed-forward as a whole sees, so `attach` gives each NextDiT FeedForward whose w2 takes a row-scaled fp8
input a forward of its own through ComfyUI's object patches (`fused_forward`); every other case (LoRA weight
functions, a streamed weight, fp16, a CPU) runs ComfyUI's forward unchanged.

The launch is a `torch.library.custom_op`: compiled blocks call it as one opaque op with a fake implementation,
so the caption's dynamic row count stays dynamic (the kernel's loop count is a compile-time constant of Triton's,
which its interpreter needs, and a Triton kernel traced into the graph would make Dynamo specialise on it).

On a CPU the kernel's arithmetic runs under Triton's interpreter (tests/unit/test_swiglu_fp8.py).
"""
from __future__ import annotations

import functools
import logging
import types

import torch

from . import quantized_ops

log = logging.getLogger(__name__)

OP_NAME = "newbie_lowvram::swiglu_rowwise_e4m3"
# The launch bench/swiglu_kernel.py measured fastest: 112.6 us a call against Inductor's 134.7 (H100, run94).
PROGRAMS_PER_SM = 4
BLOCK = 2048
NUM_WARPS = 8


@functools.cache
def _kernel():
    """The Triton kernel, built at first use (Triton is imported only where the kernel runs)."""
    import triton.language as tl
    from triton import jit

    @jit
    def swiglu_rowwise_kernel(g_ptr, u_ptr, out_ptr, scale_ptr, rows, COLS: tl.constexpr, ITERS: tl.constexpr,
                              BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr, QMAX: tl.constexpr):
        """Rows pid, pid + programs, ...: h = silu(g) * u in fp32; the row's scale max(amax(|h|), MIN_AMAX) / QMAX;
        out = h / scale, clamped to +-QMAX, in out's dtype. ITERS is the rows per program, rounded up."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        for i in range(0, ITERS):
            row = pid + i * programs
            live = row < rows
            base = row.to(tl.int64) * COLS
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, COLS, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = (offs < COLS) & live
                g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(g * tl.sigmoid(g) * u))
            scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / QMAX
            tl.store(scale_ptr + row, scale, mask=live)
            for start in range(0, COLS, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = (offs < COLS) & live
                g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(g * tl.sigmoid(g) * u / scale, -QMAX), QMAX)
                tl.store(out_ptr + base + offs, q.to(out_ptr.dtype.element_ty), mask=mask)

    return swiglu_rowwise_kernel


def launch(g: torch.Tensor, u: torch.Tensor, programs: int, block: int, num_warps: int,
           out_dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(g) * u scaled per row and cast to out_dtype, the row scales (rows, 1) in float32) for 2-D contiguous
    g and u of one shape, on `programs` programs (Triton's grid)."""
    from triton import cdiv, next_power_of_2

    rows, cols = g.shape
    if u.shape != g.shape or not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError(f"swiglu_rowwise: g {tuple(g.shape)} and u {tuple(u.shape)} must be contiguous and alike")
    out = torch.empty(rows, cols, dtype=out_dtype, device=g.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=g.device)
    if rows == 0:
        return out, scale
    programs = max(1, min(programs, rows))
    _kernel()[(programs,)](g, u, out, scale, rows, COLS=cols, ITERS=cdiv(rows, programs),
                           BLOCK=min(block, next_power_of_2(cols)), MIN_AMAX=quantized_ops._MIN_ROW_AMAX,
                           QMAX=quantized_ops._E4M3_MAX, num_warps=num_warps)
    return out, scale


def _programs(device: torch.device) -> int:
    """The grid: PROGRAMS_PER_SM programs on each SM of a GPU (a few, for Triton's interpreter on a CPU)."""
    return _sm_count(device.index or 0) * PROGRAMS_PER_SM if device.type == "cuda" else 3


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@torch.library.custom_op(OP_NAME, mutates_args=())
def swiglu_rowwise_e4m3(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(g) * u for 2-D bf16 g and u on a GPU, quantized to e4m3 with one scale per row: (the fp8 values, the
    scales (rows, 1) in float32), as `quantized_ops.rowwise_e4m3(silu(g) * u)` but with the product kept in fp32."""
    return launch(g.contiguous(), u.contiguous(), _programs(g.device), BLOCK, NUM_WARPS)


@swiglu_rowwise_e4m3.register_fake
def _(g, u):
    return (g.new_empty(g.shape, dtype=torch.float8_e4m3fn),
            g.new_empty((g.shape[0], 1), dtype=torch.float32))


def _kernel_runs_on(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype == torch.bfloat16


def fused_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """A NextDiT FeedForward's forward (ComfyUI: `w2(silu(w1(x)) * w3(x))`) whose w2 input, where w2 takes a
    row-scaled fp8 input (`takes_rowwise_fp8`), comes from `swiglu_rowwise_e4m3`; ComfyUI's computation
    otherwise. Bound to each feed-forward as a method: one function for all of them, so that Dynamo's guard on it
    holds across blocks (a callable object per feed-forward made each block recompile, run94)."""
    g, u = ff.w1(x), ff.w3(x)
    w2 = ff.w2
    if _kernel_runs_on(g) and w2.takes_rowwise_fp8(g):
        x8, scale = swiglu_rowwise_e4m3(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]))
        return w2.forward_rowwise_fp8(x8, scale).reshape(*g.shape[:-1], -1)
    return w2(ff._forward_silu_gating(g, u))


def _feed_forwards(diffusion_model: torch.nn.Module):
    """(name, module) of every feed-forward whose w2 can take a row-scaled fp8 input (the pack's fp8 layers)."""
    for name, module in diffusion_model.named_modules():
        if (type(module).__name__ == "FeedForward" and hasattr(module, "_forward_silu_gating")
                and all(hasattr(module, w) for w in ("w1", "w3"))
                and hasattr(getattr(module, "w2", None), "takes_rowwise_fp8")):
            yield name, module


def usable(device) -> bool:
    """Whether the kernel can run for a model on `device`: a CUDA device with Triton."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attach(patcher) -> int:
    """Give each eligible FeedForward of the patcher's DiT `fused_forward` as its forward (ComfyUI's object patches,
    undone when ComfyUI unpatches the model). Returns how many."""
    n = 0
    for name, module in _feed_forwards(patcher.model.diffusion_model):
        patcher.add_object_patch(f"diffusion_model.{name}.forward", types.MethodType(fused_forward, module))
        n += 1
    if n:
        log.info("NewBie fp8: %d feed-forwards make w2's input with the pack's SwiGLU kernel (NEWBIE_FP8_W2=kernel)",
                 n)
    return n
