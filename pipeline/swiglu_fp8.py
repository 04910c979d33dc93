"""fp8's feed-forward with w2's input made by one hand-written Triton kernel (NEWBIE_FP8_W2=kernel; opt-in).

fp8's w2 multiplies in fp8 with its bf16 input scaled per row (pipeline/quantized_ops.py, `fp8_linear_rowwise`).
Inside a compiled block Inductor fuses the SwiGLU product, each row's amax, the scaling and the e4m3 cast into one
kernel. On an H100 it took 138.7 us a call (4396 rows of 9216, run89), 10 ms of a step, where reading the two bf16
inputs once and writing the fp8 output is about 66 us at 3 TB/s. Its source (run92) runs one program a row in two
loops, the amax and then the same inputs read again, and at that speed the second read comes from HBM.

This kernel (`_kernel`) gives each program a few rows in turn (`ROWS_PER_PROGRAM`, strided across the grid), so
that the rows in flight (what the second pass reads again) stay about 20 MB, inside L2. It needs w1's and w3's
outputs, which
only the feed-forward as a whole sees, so `attach` gives each NextDiT FeedForward whose w2 takes a row-scaled fp8
input a forward of its own through ComfyUI's object patches (`fused_forward`); every other case (LoRA weight
functions, a streamed weight, fp16, a CPU) runs ComfyUI's forward unchanged.

The launch is a `torch.library.triton_op`, which compiled blocks launch from Inductor's wrapper code. The grid
follows the rows and each program's loop count is a constant (`ROWS_PER_PROGRAM`; Triton's interpreter needs
constant loop counts too), so the caption's dynamic row count stays dynamic.

On a CPU the kernel's arithmetic runs under Triton's interpreter (tests/unit/test_swiglu_fp8.py).

Measured (H100): alone, 112.6 us a call against Inductor's 134.7 (bench/swiglu_kernel.py, run94); in the compiled
fp8 step, called then as a `custom_op`, the GPU's step fell from 93.0 to 90.2 ms but the run took 2.505 against
2.458 s, the CPU now issuing a call as slowly as the GPU ran it (run95); one eager DiT call 0.133 against 0.173 s;
error against fp32 0.02865 against 0.02853 (both with fp32 accumulation, run95). As the `triton_op` (8 rows a
program, 8 warps), in-process: 2.436 s [2.434, 2.436] against 2.466 s a run with cuDNN attention (run96); with
flash-attn-4 2.358 s [2.341, 2.699] against 2.290 s (the GPU busy 82.5 against 84.4 ms a step, run98) and 2.208 s
with the kept CUDA graphs as well; in the server with flash-attn-4 a warm image 2.88 s [2.72, 3.36] against 2.58 s
[2.58, 2.58] (run97). It saves about 2 ms of the GPU's step but gains only where the CPU does not bound the step:
opt-in. Its one-pass form (NEWBIE_FP8_W2=kernel1, `_one_pass_kernel`) is the fastest fp8 step measured: with the
kept CUDA graphs and flash-attn-4, 2.38-2.39 s a warm image in the server, 11.93-11.95 steps/s, 0.53x upstream
(H100, runs 112-113).
"""
from __future__ import annotations

import functools
import logging

import torch

from . import forward_patches, quantized_ops, triton_ops

log = logging.getLogger(__name__)

OP_NAME = "newbie_lowvram::swiglu_rowwise_e4m3"
# Rows each program quantizes, its loop count (a compile-time constant of Triton's), so the grid is the rows / 5:
# 880 programs at NewBie's 4396 rows, about 7 an SM of an H100, the launch bench/swiglu_kernel.py measured fastest
# in run96 (its "8 an SM", 5 rows a program, block 2048, 4 warps: 105.0 us a call against Inductor's 133.8 in the
# same call; 8 rows a program with 8 warps, the launch before, 117.3 us; run94 had found 8 warps best at 112.6). A
# fixed grid would need a loop count that depends on the rows, which Dynamo would then specialise on.
ROWS_PER_PROGRAM = 5
BLOCK = 2048
NUM_WARPS = 4
# The one-pass kernel's launch (NEWBIE_FP8_W2=kernel1): one row a program, so that as many rows are in flight as the
# registers allow; 8 warps hold NewBie's 9216 columns as 36 fp32 values a thread. bench/swiglu_kernel.py on an H100
# (run110): 75.2 us a call with 4 or 8 warps, 79.4 with 16; 2 rows a program 77.8-81.2, 4 rows 79.6-84.2; the
# two-pass kernel's launch above 105.8 and Inductor's kernel 134.3 in the same call.
OP_NAME_ONE_PASS = "newbie_lowvram::swiglu_rowwise_e4m3_one_pass"
ONE_PASS_ROWS_PER_PROGRAM = 1
ONE_PASS_NUM_WARPS = 8


@functools.cache
def _kernel():
    """The Triton kernel, built at first use (Triton is imported only where the kernel runs)."""
    import triton.language as tl
    from triton import jit

    @jit
    def swiglu_rowwise_kernel(g_ptr, u_ptr, out_ptr, scale_ptr, rows, COLS: tl.constexpr, ITERS: tl.constexpr,
                              BLOCK: tl.constexpr, MIN_AMAX: tl.constexpr, QMAX: tl.constexpr):
        """ITERS rows a program, strided by the grid (pid, pid + programs, ...; rows past the last masked):
        h = silu(g) * u in fp32; the row's scale max(amax(|h|), MIN_AMAX) / QMAX; out = h / scale, clamped to
        +-QMAX, in out's dtype."""
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


@functools.cache
def _one_pass_kernel():
    """The kernel in one pass (`launch` with block None): each row read once and held in registers while its amax
    is found, as two blocks whose sizes are powers of two (Triton's) that together cover the row (9216 = 8192 +
    1024: nothing masked; at 8 warps 36 fp32 values a thread). The feed-forwards use it under NEWBIE_FP8_W2=kernel1
    (`swiglu_rowwise_e4m3_one_pass`). On an H100 (run110-113): 75.2 us a call against the two-pass kernel's 105.8;
    in the compiled fp8 step with the kept CUDA graphs 83.8 against 86.6 ms a step in-process, and in the server
    2.38-2.39 against 2.45-2.47 s a warm image, 11.93-11.95 steps/s."""
    import triton.language as tl
    from triton import jit

    @jit
    def swiglu_rowwise_one_pass_kernel(g_ptr, u_ptr, out_ptr, scale_ptr, rows, COLS: tl.constexpr,
                                       ITERS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                       MIN_AMAX: tl.constexpr, QMAX: tl.constexpr):
        """As swiglu_rowwise_kernel, the row held as h_a (its first BLOCK_A columns) and h_b (the rest, in a block
        of BLOCK_B; none where BLOCK_B is 0)."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        for i in range(0, ITERS):
            row = pid + i * programs
            live = row < rows
            base = row.to(tl.int64) * COLS
            offs_a = tl.arange(0, BLOCK_A)
            mask_a = (offs_a < COLS) & live
            g = tl.load(g_ptr + base + offs_a, mask=mask_a, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + base + offs_a, mask=mask_a, other=0.0).to(tl.float32)
            h_a = g * tl.sigmoid(g) * u
            amax = tl.max(tl.abs(h_a), axis=0)
            if BLOCK_B > 0:
                offs_b = BLOCK_A + tl.arange(0, BLOCK_B)
                mask_b = (offs_b < COLS) & live
                g = tl.load(g_ptr + base + offs_b, mask=mask_b, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + base + offs_b, mask=mask_b, other=0.0).to(tl.float32)
                h_b = g * tl.sigmoid(g) * u
                amax = tl.maximum(amax, tl.max(tl.abs(h_b), axis=0))
            scale = tl.maximum(amax, MIN_AMAX) / QMAX
            tl.store(scale_ptr + row, scale, mask=live)
            q = tl.minimum(tl.maximum(h_a / scale, -QMAX), QMAX)
            tl.store(out_ptr + base + offs_a, q.to(out_ptr.dtype.element_ty), mask=mask_a)
            if BLOCK_B > 0:
                q = tl.minimum(tl.maximum(h_b / scale, -QMAX), QMAX)
                tl.store(out_ptr + base + offs_b, q.to(out_ptr.dtype.element_ty), mask=mask_b)

    return swiglu_rowwise_one_pass_kernel


def one_pass_blocks(cols: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B) of the one-pass kernel for rows of `cols`: the largest power of two not above cols, and
    the smallest power of two covering the rest (0 where nothing is left)."""
    block_a = 1 << (cols.bit_length() - 1)
    rest = cols - block_a
    return block_a, (1 << (rest - 1).bit_length()) if rest else 0


def _launch(g, u, out, scale, rows_per_program: int, block: int | None, num_warps: int, wrap=None) -> None:
    """Launch the two-pass kernel (`block` columns at a time), or, where `block` is None, the one-pass kernel;
    through `wrap` (torch.library.wrap_triton inside the ops) where given."""
    from triton import cdiv, next_power_of_2

    rows, cols = g.shape
    if block is None:
        kernel = _one_pass_kernel()
        block_a, block_b = one_pass_blocks(cols)
        sizes = {"BLOCK_A": block_a, "BLOCK_B": block_b}
    else:
        kernel = _kernel()
        sizes = {"BLOCK": min(block, next_power_of_2(cols))}
    if wrap is not None:
        kernel = wrap(kernel)
    kernel[(cdiv(rows, rows_per_program),)](g, u, out, scale, rows, COLS=cols, ITERS=rows_per_program, **sizes,
                                            MIN_AMAX=quantized_ops._MIN_ROW_AMAX, QMAX=quantized_ops._E4M3_MAX,
                                            num_warps=num_warps)


def _outputs(g: torch.Tensor, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's outputs for input rows g: the scaled values in out_dtype, the row scales (rows, 1) in float32."""
    return (torch.empty(g.shape, dtype=out_dtype, device=g.device),
            torch.empty((g.shape[0], 1), dtype=torch.float32, device=g.device))


def launch(g: torch.Tensor, u: torch.Tensor, rows_per_program: int, block: int, num_warps: int,
           out_dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(g) * u scaled per row and cast to out_dtype, the row scales (rows, 1) in float32) for 2-D contiguous
    g and u of one shape, each program quantizing `rows_per_program` rows, `block` columns at a time (None: the
    one-pass kernel): the kernel as bench/swiglu_kernel.py and the tests run it (the pack calls
    `swiglu_rowwise_e4m3`)."""
    if u.shape != g.shape or not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError(f"swiglu_rowwise: g {tuple(g.shape)} and u {tuple(u.shape)} must be contiguous and alike")
    out, scale = _outputs(g, out_dtype)
    if g.shape[0]:
        _launch(g, u, out, scale, rows_per_program, block, num_warps)
    return out, scale


def _op_body(g, u, rows_per_program: int, block: int | None, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What each op runs: the kernel chosen by `block` on contiguous g and u, launched through wrap_triton."""
    g, u = g.contiguous(), u.contiguous()
    out, scale = _outputs(g, torch.float8_e4m3fn)
    _launch(g, u, out, scale, rows_per_program, block, num_warps, wrap=torch.library.wrap_triton)
    return out, scale


@triton_ops.register(OP_NAME)
def swiglu_rowwise_e4m3(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(g) * u for 2-D bf16 g and u on a GPU, quantized to e4m3 with one scale per row: (the fp8 values, the
    scales (rows, 1) in float32), as `quantized_ops.rowwise_e4m3(silu(g) * u)` but with the product kept in fp32.

    A `triton_op`: compiled blocks launch the kernel from Inductor's own wrapper code, with its buffers. As a
    `custom_op` its Python dispatch, allocations and Triton's launcher took about 150 us of CPU a call (run95),
    which the CPU-bound compiled fp8 step could not afford: 2.505 against 2.458 s a run, though the GPU's step fell
    from 93.0 to 90.2 ms."""
    return _op_body(g, u, ROWS_PER_PROGRAM, BLOCK, NUM_WARPS)


@triton_ops.register(OP_NAME_ONE_PASS)
def swiglu_rowwise_e4m3_one_pass(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`swiglu_rowwise_e4m3` by the one-pass kernel (NEWBIE_FP8_W2=kernel1): the same bytes (the interpreter test
    and the GPU test hold the two kernels to each other)."""
    return _op_body(g, u, ONE_PASS_ROWS_PER_PROGRAM, None, ONE_PASS_NUM_WARPS)


def _kernel_runs_on(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype == torch.bfloat16


def _fused(ff, x: torch.Tensor, op) -> torch.Tensor:
    g, u = ff.w1(x), ff.w3(x)
    w2 = ff.w2
    if _kernel_runs_on(g) and w2.takes_rowwise_fp8(g):
        x8, scale = op(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]))
        return w2.forward_rowwise_fp8(x8, scale).reshape(*g.shape[:-1], -1)
    return w2(ff._forward_silu_gating(g, u))


def fused_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """A NextDiT FeedForward's forward (ComfyUI: `w2(silu(w1(x)) * w3(x))`) whose w2 input, where w2 takes a
    row-scaled fp8 input (`takes_rowwise_fp8`), comes from `swiglu_rowwise_e4m3`; ComfyUI's computation
    otherwise. Bound to each feed-forward as a method: one function for all of them, so that Dynamo's guard on it
    holds across blocks (a callable object per feed-forward made each block recompile, run94)."""
    return _fused(ff, x, swiglu_rowwise_e4m3)


def fused_forward_one_pass(ff, x: torch.Tensor) -> torch.Tensor:
    """`fused_forward` with the one-pass kernel (NEWBIE_FP8_W2=kernel1)."""
    return _fused(ff, x, swiglu_rowwise_e4m3_one_pass)


def _feed_forwards(diffusion_model: torch.nn.Module):
    """(name, module) of every feed-forward whose w2 can take a row-scaled fp8 input (the pack's fp8 layers)."""
    for name, module in diffusion_model.named_modules():
        if (type(module).__name__ == "FeedForward" and hasattr(module, "_forward_silu_gating")
                and all(hasattr(module, w) for w in ("w1", "w3"))
                and hasattr(getattr(module, "w2", None), "takes_rowwise_fp8")):
            yield name, module


def usable(device) -> bool:
    """Whether the kernel can run for a model on `device`: a CUDA device with Triton, and a PyTorch with
    `triton_op`."""
    return triton_ops.runs_on(device, swiglu_rowwise_e4m3)


def attach(patcher) -> int:
    """Give each eligible FeedForward of the patcher's DiT `fused_forward` as its forward (ComfyUI's object patches,
    undone when ComfyUI unpatches the model). Returns how many."""
    forward = fused_forward_one_pass if quantized_ops.w2_kernel_one_pass() else fused_forward
    n = forward_patches.patch_forwards(patcher, _feed_forwards(patcher.model.diffusion_model), forward)
    if n:
        log.info("NewBie fp8: %d feed-forwards make w2's input with the pack's SwiGLU kernel (%s)", n, switch_words())
    return n


def switch_words() -> str:
    """The switch that chose the kernel, as the log and the loader's report name it."""
    return "NEWBIE_FP8_W2=kernel1, in one pass" if quantized_ops.w2_kernel_one_pass() else "NEWBIE_FP8_W2=kernel"


def attached(patcher) -> bool:
    """Whether `attach` gave the patcher's feed-forwards the kernel's forward."""
    return any(k.startswith("diffusion_model.") and k.endswith("feed_forward.forward") for k in patcher.object_patches)
