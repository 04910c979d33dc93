"""The Triton kernel of pipeline/qkv_rope.py, in a module of its own, imported only where the kernel runs."""
import triton.language as tl
from triton import jit


@jit
def qkv_norm_rope_kernel(qkv_ptr, freqs_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, seq, freqs_stride_b,
                              freqs_stride_n, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                              QK_BLOCK: tl.constexpr, PAIRS_BLOCK: tl.constexpr, V_BLOCK: tl.constexpr):
    """Program `row` (= b * seq + n) takes token n of sample b: its q and k heads (the first (H + HKV) D values of
    its row of (H + 2 HKV) D) loaded as one [QK_BLOCK, 2 PAIRS_BLOCK] block, contiguous along each head,
    RMS-normalised (q's weights for the first H, k's for the rest) and rounded to the output's dtype, split into
    each pair's first and second values, rotated by the token's frequencies, joined again and stored the same way
    into q and k; its v heads copied."""
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
