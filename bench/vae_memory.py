"""What the FLUX VAE's decode really needs on the GPU, against the estimate ComfyUI plans with.

ComfyUI frees `VAE.memory_used_decode(shape, dtype)` bytes before a decode (unloading model weights to make room).
For the FLUX VAE that estimate is 2178 * latent_h * latent_w * 64 * dtype_size: 4.6 GB at 1024x1024 in bf16. This
script decodes one latent at several sizes, in the VAE's own dtypes, and records the peak allocation above the
weights (torch.cuda.max_memory_allocated), so pipeline/vae_memory.py's estimate is a measured one.

    python3 bench/vae_memory.py --models /tmp/models --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--sizes", default="512,768,1024,1536,2048")
    args = ap.parse_args()
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import torch
    import comfy.model_management as mm
    from devkit import tiny_models
    from pipeline import loader

    parts = tiny_models.vae_parts(args.models)
    results = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        vae = loader.build_vae(parts)  # the pack's VAE (its decode estimate is pipeline/vae_memory.py's)
        stock = __import__("comfy.sd", fromlist=["VAE"]).VAE(sd=parts.vae)
        vae.first_stage_model.to(dtype)
        vae.vae_dtype = dtype
        mm.load_models_gpu([vae.patcher], force_full_load=True)
        for size in (int(s) for s in args.sizes.split(",")):
            latent = torch.randn(1, 16, size // 8, size // 8, device="cuda", dtype=dtype)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                vae.first_stage_model.decode(latent)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            r = {"dtype": str(dtype).split(".")[-1], "size": size, "peak_above_weights_gib": round(peak / 2**30, 3),
                 "comfy_estimate_gib": round(stock.memory_used_decode(latent.shape, dtype) / 2**30, 3),
                 "pack_estimate_gib": round(vae.memory_used_decode(latent.shape, dtype) / 2**30, 3),
                 "bytes_per_latent_pixel_per_dtype_byte": round(peak / (latent.shape[2] * latent.shape[3])
                                                                / mm.dtype_size(dtype), 1)}
            print(f"[vae] {json.dumps(r)}", flush=True)
            results.append(r)
            del latent
        mm.unload_all_models()
        del vae, stock
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_memory.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
