"""The Triton kernel of pipeline/qkv_rope.py, in a module of its own: Triton resolves the helper a kernel calls
among the module's globals, and this module is imported only where the kernel runs."""
import triton.language as tl
from triton import jit


@jit
def _norm_rope(src, w_ptr, dst, f00, f01, f10, f11, eps, HEADS: tl.constexpr, HEADS_BLOCK: tl.constexpr,
               D: tl.constexpr, PAIRS_BLOCK: tl.constexpr):
    """One token's HEADS heads of D values at `src`: each RMS-normalised (weights at w_ptr), rounded to the
    output's dtype, rotated by the pair-wise frequencies f.., stored at `dst`."""
    h = tl.arange(0, HEADS_BLOCK)[:, None]
    p = tl.arange(0, PAIRS_BLOCK)[None, :]
    live_p = p < D // 2
    live = (h < HEADS) & live_p
    even = h * D + 2 * p
    x0 = tl.load(src + even, mask=live, other=0.0).to(tl.float32)
    x1 = tl.load(src + even + 1, mask=live, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)[:, None]
    w0 = tl.load(w_ptr + 2 * p, mask=live_p, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + 2 * p + 1, mask=live_p, other=0.0).to(tl.float32)
    n0 = (x0 * rstd * w0).to(dst.dtype.element_ty).to(f00.dtype)
    n1 = (x1 * rstd * w1).to(dst.dtype.element_ty).to(f00.dtype)
    tl.store(dst + even, (f00 * n0 + f01 * n1).to(dst.dtype.element_ty), mask=live)
    tl.store(dst + even + 1, (f10 * n0 + f11 * n1).to(dst.dtype.element_ty), mask=live)

@jit
def qkv_norm_rope_kernel(qkv_ptr, freqs_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, seq, freqs_stride_b,
                         freqs_stride_n, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         H_BLOCK: tl.constexpr, HKV_BLOCK: tl.constexpr, PAIRS_BLOCK: tl.constexpr,
                         V_BLOCK: tl.constexpr):
    """Program `row` (= b * seq + n) takes token n of sample b: q's H heads and k's HKV heads normalised and
    rotated, v's copied, from its row of (H + 2 HKV) * D projected values."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    n = row - b * seq
    src = qkv_ptr + row * ((H + 2 * HKV) * D)
    p = tl.arange(0, PAIRS_BLOCK)[None, :]
    live_p = p < D // 2
    f = freqs_ptr + b * freqs_stride_b + n * freqs_stride_n + 4 * p  # [.., pair, rotation row, column]
    f00 = tl.load(f, mask=live_p, other=0.0)
    f01 = tl.load(f + 1, mask=live_p, other=0.0)
    f10 = tl.load(f + 2, mask=live_p, other=0.0)
    f11 = tl.load(f + 3, mask=live_p, other=0.0)
    _norm_rope(src, qw_ptr, q_ptr + row * (H * D), f00, f01, f10, f11, eps, H, H_BLOCK, D, PAIRS_BLOCK)
    _norm_rope(src + H * D, kw_ptr, k_ptr + row * (HKV * D), f00, f01, f10, f11, eps, HKV, HKV_BLOCK, D,
               PAIRS_BLOCK)
    c = tl.arange(0, V_BLOCK)
    live_c = c < HKV * D
    v = tl.load(src + (H + HKV) * D + c, mask=live_c, other=0.0)
    tl.store(v_ptr + row * (HKV * D) + c, v, mask=live_c)


@jit
def qkv_norm_rope_head_kernel(qkv_ptr, freqs_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, seq, freqs_stride_b,
                              freqs_stride_n, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                              PAIRS_BLOCK: tl.constexpr):
    """The same as qkv_norm_rope_kernel, one program a head: program (row, j) takes head j of the token's
    H + 2 HKV (q's, then k's, normalised and rotated; then v's, copied)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    src = qkv_ptr + row * ((H + 2 * HKV) * D) + j * D
    p = tl.arange(0, PAIRS_BLOCK)
    live = p < D // 2
    if j < H + HKV:
        if j < H:
            w_ptr = qw_ptr
            dst = q_ptr + row * (H * D) + j * D
        else:
            w_ptr = kw_ptr
            dst = k_ptr + row * (HKV * D) + (j - H) * D
        b = row // seq
        f = freqs_ptr + b * freqs_stride_b + (row - b * seq) * freqs_stride_n + 4 * p
        f00 = tl.load(f, mask=live, other=0.0)
        f01 = tl.load(f + 1, mask=live, other=0.0)
        f10 = tl.load(f + 2, mask=live, other=0.0)
        f11 = tl.load(f + 3, mask=live, other=0.0)
        x0 = tl.load(src + 2 * p, mask=live, other=0.0).to(tl.float32)
        x1 = tl.load(src + 2 * p + 1, mask=live, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x0 * x0 + x1 * x1, axis=0) / D + eps)
        w0 = tl.load(w_ptr + 2 * p, mask=live, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + 2 * p + 1, mask=live, other=0.0).to(tl.float32)
        n0 = (x0 * rstd * w0).to(dst.dtype.element_ty).to(f00.dtype)
        n1 = (x1 * rstd * w1).to(dst.dtype.element_ty).to(f00.dtype)
        tl.store(dst + 2 * p, (f00 * n0 + f01 * n1).to(dst.dtype.element_ty), mask=live)
        tl.store(dst + 2 * p + 1, (f10 * n0 + f11 * n1).to(dst.dtype.element_ty), mask=live)
    else:
        c = tl.arange(0, 2 * PAIRS_BLOCK)
        dst = v_ptr + row * (HKV * D) + (j - H - HKV) * D
        tl.store(dst + c, tl.load(src + c, mask=c < D, other=0.0), mask=c < D)


@jit
def qkv_norm_rope_rows_kernel(qkv_ptr, freqs_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, seq, freqs_stride_b,
                              freqs_stride_n, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                              QK_BLOCK: tl.constexpr, PAIRS_BLOCK: tl.constexpr, V_BLOCK: tl.constexpr):
    """The same as qkv_norm_rope_kernel, reading and writing whole head rows: the token's q and k heads (the first
    (H + HKV) D values of its row) loaded as one [QK_BLOCK, 2 PAIRS_BLOCK] block, contiguous along each head,
    split into its pairs' first and second values, and joined again to be stored the same way."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    n = row - b * seq
    src = qkv_ptr + row * ((H + 2 * HKV) * D)
    h = tl.arange(0, QK_BLOCK)[:, None]
    d = tl.arange(0, 2 * PAIRS_BLOCK)[None, :]
    live = (h < H + HKV) & (d < D)
    x = tl.load(src + h * D + d, mask=live, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.where(h < H, tl.load(qw_ptr + d, mask=d < D, other=0.0), tl.load(kw_ptr + d, mask=d < D, other=0.0))
    normed = (x * rstd * w.to(tl.float32)).to(q_ptr.dtype.element_ty)
    x0, x1 = tl.split(tl.reshape(normed, [QK_BLOCK, PAIRS_BLOCK, 2]))
    p = tl.arange(0, PAIRS_BLOCK)[:, None] * 4 + tl.arange(0, 4)[None, :]
    f = tl.load(freqs_ptr + b * freqs_stride_b + n * freqs_stride_n + p, mask=p < 2 * D, other=0.0)
    column0, column1 = tl.split(tl.reshape(f, [PAIRS_BLOCK, 2, 2]))  # each [pair, rotation row]
    f00, f10 = tl.split(column0)
    f01, f11 = tl.split(column1)
    x0, x1 = x0.to(f00.dtype), x1.to(f00.dtype)
    out0 = f00[None, :] * x0 + f01[None, :] * x1
    out1 = f10[None, :] * x0 + f11[None, :] * x1
    out = tl.reshape(tl.join(out0, out1), [QK_BLOCK, 2 * PAIRS_BLOCK]).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + row * (H * D) + h * D + d, out, mask=live & (h < H))
    tl.store(k_ptr + row * (HKV * D) + (h - H) * D + d, out, mask=live & (h >= H))
    c = tl.arange(0, V_BLOCK)
    tl.store(v_ptr + row * (HKV * D) + c, tl.load(src + (H + HKV) * D + c, mask=c < HKV * D, other=0.0),
             mask=c < HKV * D)
