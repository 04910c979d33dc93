"""Which SDPA backend runs NewBie's attention fastest, at the shapes one sampling step makes.

NewBie's joint attention at 1024x1024: 24 heads of 96 over 4096 image tokens plus the caption (36 layers), the
noise refiner over the 4096 image tokens alone (2 layers); K/V repeated from 8 heads to 24 as ComfyUI's Next-DiT
does. For each backend PyTorch offers (flash, cuDNN, memory-efficient), FlashAttention-4 through the pack's own
route (pipeline/flash_attn4.py) where flash-attn-4 imports, and each dtype: the median time of one call (CUDA
events, 30 calls after 5 warm-up calls), the time a step spends in attention (38 calls a DiT call, two DiT calls a
CFG step), the largest difference from fp32 math attention and, for FlashAttention-4, the seconds its first call
took (the kernel's compilation). `-bhnd` and `-gqa` rows time cuDNN and FlashAttention-2 on q, k, v with the heads
outermost in memory and on NewBie's 8 key/value heads once each (`layout_and_groups`). Writes
OUT/attention_backends.json.

    python3 bench/attention_backends.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_backend(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def padded_head(backend, to: int, prepared: bool):
    """`backend` on q, k, v zero-padded from head size 96 to `to` (the scale kept at 1/sqrt(96); the zeros add
    nothing to q.k, and the output's extra columns are dropped): a kernel tuned for 128 may outrun the one for 96
    despite a third more work. With `prepared` the padding is made before the timed call (as a compiled block
    could write it in the kernel that makes q, k and v), else it is timed with the call."""
    def pad(q, k, v):
        return tuple(F.pad(t, (0, to - t.shape[-1])) for t in (q, k, v))

    def run(q, k, v):
        d = 96
        if not prepared:
            q, k, v = pad(q, k, v)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)[..., :d]
    if prepared:
        run.prepare = pad
    return run


REP = 3  # ComfyUI's copies of each of NewBie's 8 key/value heads


def layout_and_groups(backend, heads_outer: bool, grouped: bool):
    """`backend` on q, k, v given another form before the timed call: `heads_outer`, [B, H, N, D] contiguous (as a
    kernel could write them) instead of views of [B, N, H, D] memory; `grouped`, k and v with NewBie's 8 key/value
    heads once each (enable_gqa, as pipeline/sdpa.py gives them where the backend takes them) instead of ComfyUI's
    24 copies."""
    def prepare(q, k, v):
        if grouped:
            k, v = k[:, ::REP], v[:, ::REP]
        if heads_outer:
            return tuple(t.contiguous() for t in (q, k, v))
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, **({"enable_gqa": True} if grouped else {}))
    run.prepare = prepare
    return run


def runners() -> dict:
    found = {name: sdpa_backend(b) for name, b in BACKENDS.items()}
    found.update({"cudnn-pad128": padded_head(SDPBackend.CUDNN_ATTENTION, 128, False),
                  "cudnn-pad128-prepared": padded_head(SDPBackend.CUDNN_ATTENTION, 128, True),
                  "flash-pad128-prepared": padded_head(SDPBackend.FLASH_ATTENTION, 128, True)})
    for name in ("cudnn", "flash"):
        found.update({f"{name}-bhnd": layout_and_groups(BACKENDS[name], True, False),
                      f"{name}-gqa": layout_and_groups(BACKENDS[name], False, True),
                      f"{name}-gqa-bhnd": layout_and_groups(BACKENDS[name], True, True)})
    sys.path.insert(0, str(REPO))
    from pipeline import flash_attn4

    if flash_attn4.installed():
        found["fa4"] = flash_attn4.attention
        print("flash-attn-4", flash_attn4.version(), flush=True)
    else:
        print("flash-attn-4 does not import here", flush=True)
    return found


def time_call(fn, calls: int = 30, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--backends", default="", help="comma-separated subset of flash,cudnn,efficient,fa4,"
                    "cudnn-pad128,cudnn-pad128-prepared,flash-pad128-prepared, and cudnn or flash with -bhnd, -gqa "
                    "or -gqa-bhnd (layout_and_groups) (default all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    backends = runners()
    if args.backends:
        backends = {k: v for k, v in backends.items() if k in args.backends.split(",")}
    shapes = {"joint": 4096 + 259, "image": 4096}
    per_step = {"joint": 36 * 2, "image": 2 * 2}
    for dtype in (torch.bfloat16, torch.float16):
        step_ms = {}
        for shape, n in shapes.items():
            for batch in (1, 2):
                # [B, H, N, D] views of [B, N, H, D] memory, as ComfyUI's Next-DiT hands them to attention, with
                # k and v as its copies of 8 heads (so that one head of each gives the same attention)
                q = torch.randn(batch, n, 24, 96, device="cuda", dtype=dtype).transpose(1, 2)
                k, v = (torch.randn(batch, n, 8, 96, device="cuda", dtype=dtype).repeat_interleave(REP, dim=2)
                        .transpose(1, 2) for _ in range(2))
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                for name, run in backends.items():
                    row = {"dtype": str(dtype).split(".")[-1], "shape": shape, "batch": batch, "backend": name}
                    try:
                        inputs = run.prepare(q, k, v) if hasattr(run, "prepare") else (q, k, v)
                        t0 = time.perf_counter()
                        out = run(*inputs)
                        torch.cuda.synchronize()
                        first_s = time.perf_counter() - t0
                        ms = time_call(lambda: run(*inputs))
                        row.update(ms=round(ms, 4), max_err=float((out.float() - ref).abs().max()),
                                   first_call_s=round(first_s, 2))
                        if batch == 1:
                            step_ms.setdefault(name, 0.0)
                            step_ms[name] += ms * per_step[shape]
                    except Exception as e:  # noqa: BLE001 - a backend that cannot run this input is a result
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    print(row, flush=True)
                    results.append(row)
        print(str(dtype), "attention ms per CFG step (two batch-1 calls):",
              {k: round(v, 2) for k, v in step_ms.items()}, flush=True)
        results.append({"dtype": str(dtype).split(".")[-1], "step_ms": step_ms})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_backends.json").write_text(json.dumps(
        {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
