"""Where a full-size DiT call spends its time, per precision path, and what regional compilation gives.

One DiT call = what a sampler makes per step at 1024x1024 with CFG (batch of 2, 4096 image tokens, 96 caption
tokens), full-size random weights built on the GPU, everything resident (no offloading in the way). For each
variant: mean time of 5 calls after 2 warm-up calls, and a torch.profiler table of one call (top CUDA kernels by
self time). Variants `*+compile` apply the loader's `compile: blocks` (pipeline/block_compile.py: each transformer
block compiled on its own, one graph shared by the blocks of a kind); their first call includes compilation.
Writes OUT/profile_dit.json.

    python3 bench/profile_dit.py --variants fp32,fp16_pack,fp16_plain,bf16,bf16+compile

A variant is PATH[+compile[:MODE]]: PATH one of fp16_pack, fp16_plain, bf16, fp32, fp8, int8 (the loader's
quantized DiT, pipeline/quantize.py), fp8_dequant (the fp8 DiT as a GPU without fp8 matmuls runs it: every layer
dequantised, pipeline/quantized_ops.py); MODE a torch.compile mode
(e.g. reduce-overhead for CUDA graphs). The first variant is the accuracy
reference. Compiled variants also report Dynamo's graph-break reasons and graph count.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")), ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_")),
         ("triton (fused)", ("triton",)))  # first match wins: cuDNN's attention kernels are named sm90_... too


def kernel_kinds(averages) -> dict:
    """CUDA kernel time of one call in ms by kind: GEMM, attention, Inductor's fused Triton kernels, the rest."""
    out = {}
    for e in averages:
        if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, marks in KINDS if any(m in name for m in marks)), "other")
        out[kind] = round(out.get(kind, 0.0) + e.self_device_time_total / 1e3, 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--variants", default="fp16_pack,fp16_plain,bf16")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import torch
    from devkit import dit_calls
    from devkit import tiny_models

    tiny_models._comfy_cpu_safe()  # lets --tiny run on a machine without CUDA
    import comfy.model_management as mm
    from devkit import stress
    from pipeline import block_compile, loader, precision, quantized_ops

    spec = tiny_models.TINY if args.tiny else tiny_models.FULL
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    shapes = tiny_models._meta_state_shapes(spec)["dit"]
    base_sd = tiny_models.random_state_dict(shapes, spec.seed, torch.bfloat16, dev)
    print(f"[profile] DiT weights ready in {time.perf_counter() - t:.1f} s", flush=True)
    h, w = (32, 32) if args.tiny else (128, 128)
    results, ref = {}, None
    for variant in args.variants.split(","):
        variant_base, _, extra = variant.partition("+")
        name = variant_base
        prec, safe = {"fp16_pack": ("fp16", True), "fp16_plain": ("fp16", False), "bf16": ("bf16", True),
                      "fp32": ("fp32", True), "fp8": ("fp8", True), "int8": ("int8", True),
                      "fp8_dequant": ("fp8", True)}[name]
        parts = loader.NewBieParts(dict(base_sd), {}, {}, {}, None, None, {"dit": "random"})
        fp8_matmuls = quantized_ops.fp8_matmuls
        if name == "fp8_dequant":  # what an RTX 30 gets; the pack's own switch, restored after the build
            quantized_ops.fp8_matmuls = lambda device: False
        try:
            patcher, cfg, _, _ = loader.build_model(parts, prec, safe_fp16=safe)
        finally:
            quantized_ops.fp8_matmuls = fp8_matmuls
        mm.load_models_gpu([patcher])
        dm = patcher.model.diffusion_model
        if extra.startswith("compile"):  # the loader's `compile: blocks` (pipeline/block_compile.py); quantized
            block_compile.apply(patcher, mode=extra.partition(":")[2] or None)  # too, which the loader refuses
        inputs = dit_calls.dit_inputs(cfg, dev, (h, w), tokens=96)

        steps = iter(range(10**6))

        def call():  # a new sigma each call, as a sampler makes them (a value, not a shape: no recompile)
            t = 0.9 - 0.8 * (next(steps) % 25) / 25
            return dit_calls.dit_call(patcher, cfg, {**inputs, "t": torch.full_like(inputs["t"], t)})

        r = {}
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        out = call()
        sync()
        r["first_call_s"] = round(time.perf_counter() - t, 3)
        call()
        sync()
        t = time.perf_counter()
        for _ in range(args.calls):
            call()
        sync()
        r["call_s"] = round((time.perf_counter() - t) / args.calls, 4)
        r["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            call()
            sync()
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        table = averages.table(sort_by=key, row_limit=args.top, max_name_column_width=60)
        r["profile"] = table
        r["profile_cpu"] = averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)
        r["kernel_ms_by_kind"] = kernel_kinds(averages) if dev == "cuda" else None
        print(f"[profile] {variant}\n{table}", flush=True)
        out = out.float().cpu()
        if ref is None:
            ref = out
        r["rel_error_vs_first_variant"] = stress.relative_error(out, ref)
        state = precision.state_of(patcher)
        r["recomputations"] = state.recomputed if state else 0
        if extra.startswith("compile"):
            from torch._dynamo.utils import counters
            r["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
            r["unique_graphs"] = block_compile.compiled_graph_count()
        results[variant] = r
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_dit.json").write_text(json.dumps(results, indent=1))  # after each: a timeout keeps it
        print(f"[profile] {variant}: {json.dumps({k: v for k, v in r.items() if not k.startswith('profile')})}", flush=True)
        mm.unload_all_models()
        del patcher, dm
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
