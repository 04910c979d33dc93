"""The Triton kernels of pipeline/group_norm.py, in a module of their own, imported only where they run."""
import triton.language as tl
from triton import jit


@jit
def group_moments_kernel(x_ptr, partial_ptr, group_size, rows, splits, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Program (row, split) takes TILES * BLOCK values of group `row` (the row's `group_size` values are
    contiguous) from `split * TILES * BLOCK` on, tile by tile, and stores their count, mean and sum of squared
    deviations (Chan's parallel combination of each tile's two-pass moments, in fp32) at [0 | 1 | 2, row, split] of
    `partial`. (A loop of constant length: Triton's interpreter, which runs the tests, takes no runtime bound.)"""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    start = split * (TILES * BLOCK)
    length = group_size - start
    src = x_ptr + row * group_size + start
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for tile in range(TILES):
        i = tile * BLOCK + tl.arange(0, BLOCK)
        live = i < length
        x = tl.load(src + i, mask=live, other=0.0).to(tl.float32)
        n = tl.sum(live.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(n, 1.0)
        d = tl.where(live, x - tile_mean, 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = count + n
        delta = tile_mean - mean
        share = n / tl.maximum(total, 1.0)
        mean = mean + delta * share
        m2 = m2 + tile_m2 + delta * delta * count * share
        count = total
    out = partial_ptr + row * splits + split
    tl.store(out, count)
    tl.store(out + rows * splits, mean)
    tl.store(out + 2 * rows * splits, m2)


@jit
def group_stats_kernel(partial_ptr, stats_ptr, rows, splits, eps, SPLITS_BLOCK: tl.constexpr):
    """Program `row` combines its splits' moments into the group's mean and 1 / sqrt(variance + eps) (the biased
    variance, as GroupNorm takes it), stored at [0 | 1, row] of `stats`."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_BLOCK)
    live = s < splits
    base = partial_ptr + row * splits + s
    count = tl.load(base, mask=live, other=0.0)
    means = tl.load(base + rows * splits, mask=live, other=0.0)
    m2s = tl.load(base + 2 * rows * splits, mask=live, other=0.0)
    total = tl.sum(count, axis=0)
    mean = tl.sum(count * means, axis=0) / total
    d = tl.where(live, means - mean, 0.0)
    m2 = tl.sum(m2s, axis=0) + tl.sum(count * d * d, axis=0)
    tl.store(stats_ptr + row, mean)
    tl.store(stats_ptr + rows + row, tl.math.rsqrt(m2 / total + eps))


@jit
def group_apply_kernel(x_ptr, out_ptr, stats_ptr, w_ptr, b_ptr, channels, channels_per_group, rows, plane,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (sample * channels + channel, block) normalises `BLOCK` values of one channel's `plane` values as
    PyTorch's GroupNorm does: a = rstd * weight, s = bias - mean * a, out = x * a + s, in fp32, rounded once."""
    sc = tl.program_id(0).to(tl.int64)
    b = sc // channels
    c = sc - b * channels
    row = b * (channels // channels_per_group) + c // channels_per_group
    a = tl.load(stats_ptr + rows + row)
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + c).to(tl.float32)
    s = -tl.load(stats_ptr + row) * a
    if HAS_BIAS:
        s = s + tl.load(b_ptr + c).to(tl.float32)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < plane
    x = tl.load(x_ptr + sc * plane + i, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + sc * plane + i, (x * a + s).to(out_ptr.dtype.element_ty), mask=live)
