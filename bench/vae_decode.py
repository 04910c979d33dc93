"""How long the FLUX VAE's decode of one 1024x1024 latent takes, and where its GPU time goes.

In the server the pack's decode + SaveImage takes 0.33-0.45 s against upstream `--gpu-only`'s 0.29-0.31 s (runs
127-129), which weighs on the warm image's ratio. This times, in-process on full-size random weights, the decoder
alone (`first_stage_model.decode`) and ComfyUI's whole `VAE.decode` (which also copies the image to the CPU as
fp32) in bf16, in these forms of the same weights:
- `nchw`: as ComfyUI runs it;
- `channels_last`: the decoder's 4-D weights in channels-last memory, so that cuDNN's convolutions run NHWC and
  their outputs stay so;
- `benchmark`: `torch.backends.cudnn.benchmark` on (cuDNN times its algorithms at each new shape);
- `pack`: the GroupNorms by the pack's kernels (pipeline/group_norm.py, as the pack's loader gives its VAE), with the
  largest difference from the `nchw` image.
Medians of --runs warm decodes (CUDA events), and a profile's top kernels of one `nchw` decode.

    python3 bench/vae_decode.py --models /tmp/models --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn, runs: int) -> list[float]:
    import torch

    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(round(time.perf_counter() - t0, 4))
    return out


def top_kernels(run) -> str:
    """The profiler's table of the 25 kernels that took the most GPU time in one `run()` (printed too)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    print(table, flush=True)
    return table


def accuracy(vae, latent, results: dict, out: Path) -> None:
    """--accuracy: the decoder's output in bf16, with PyTorch's GroupNorms and with the pack's, against the same
    decode in fp32: the largest and the mean difference, relative to the fp32 output's largest value, and the share
    of 8-bit levels that differ."""
    import torch

    from pipeline import group_norm

    decoder = vae.first_stage_model
    with torch.inference_mode():
        decoder.float()
        ref = decoder.decode(latent.float()).float()
        decoder.to(torch.bfloat16)
        forms = {"pytorch": lambda: decoder.decode(latent)}

        def pack():
            with group_norm.FastGroupNorm():
                return decoder.decode(latent)
        forms["pack"] = pack
        scale = float(ref.abs().max())
        levels_ref = ((ref.clamp(-1, 1) + 1) * 127.5).round()
        for name, run in forms.items():
            got = run().float()
            levels = ((got.clamp(-1, 1) + 1) * 127.5).round()
            results[f"bf16_{name}_vs_fp32"] = r = {
                "max_rel": float((got - ref).abs().max()) / scale, "mean_rel": float((got - ref).abs().mean()) / scale,
                "levels_max": float((levels - levels_ref).abs().max()),
                "levels_unequal": float((levels != levels_ref).float().mean())}
            print(f"bf16 {name} against fp32:", json.dumps(r), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_decode_accuracy.json").write_text(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--accuracy", action="store_true", help="only the bf16 decodes against fp32 (`accuracy`)")
    args = ap.parse_args()
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import torch
    import comfy.model_management as mm
    from devkit import tiny_models
    from pipeline import loader

    parts = tiny_models.vae_parts(args.models)
    os.environ["NEWBIE_VAE_GROUP_NORM"] = "0"  # ComfyUI's VAE as it comes; the pack's GroupNorms are attached below
    vae = loader.build_vae(parts)
    mm.load_models_gpu([vae.patcher], force_full_load=True)
    dtype = vae.vae_dtype
    torch.manual_seed(0)
    latent = torch.randn(1, 16, 128, 128, device="cuda", dtype=dtype)
    cpu_latent = latent.float().cpu()
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "dtype": str(dtype),
               "allocator": torch.cuda.get_allocator_backend(), "forms": {}}
    decoder = vae.first_stage_model

    def measure(form):
        with torch.inference_mode():
            alone = timed(lambda: decoder.decode(latent), args.runs)
            whole = timed(lambda: vae.decode(cpu_latent), args.runs)
        r = {"decoder_s": statistics.median(alone), "decoder_runs_s": alone,
             "vae_decode_s": statistics.median(whole), "vae_decode_runs_s": whole}
        results["forms"][form] = r
        print(form, json.dumps(r), flush=True)

    if args.accuracy:
        accuracy(vae, latent, results, args.out)
        return
    measure("nchw")
    with torch.inference_mode():
        ref = decoder.decode(latent).float()
        image_ref = (vae.decode(cpu_latent) * 255).round()  # the 8-bit levels SaveImage writes
    results["nchw_max_abs"] = float(ref.abs().max())
    results["nchw_top_cuda"] = top_kernels(lambda: decoder.decode(latent))

    for p in decoder.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    measure("channels_last")
    with torch.inference_mode():
        results["channels_last_max_diff"] = float((decoder.decode(latent).float() - ref).abs().max())
    results["channels_last_top_cuda"] = top_kernels(lambda: decoder.decode(latent))
    for p in decoder.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous()
    torch.backends.cudnn.benchmark = True
    measure("benchmark")
    torch.backends.cudnn.benchmark = False
    from pipeline import group_norm

    group_norm.attach(vae)
    mm.unload_all_models()
    mm.load_models_gpu([vae.patcher], force_full_load=True)  # ComfyUI applies the object patches at its load
    measure("pack")
    with torch.inference_mode():
        results["pack_max_diff"] = float((decoder.decode(latent).float() - ref).abs().max())
        levels = ((vae.decode(cpu_latent) * 255).round() - image_ref).abs()
    results["pack_image_levels_max_diff"] = float(levels.max())
    results["pack_image_levels_share_unequal"] = float((levels > 0).float().mean())
    results["pack_top_cuda"] = top_kernels(lambda: decoder.decode(latent))
    print("max diff against nchw: channels_last", results["channels_last_max_diff"], "pack",
          results["pack_max_diff"], "of the output's largest value", results["nchw_max_abs"], "; the 8-bit image:",
          results["pack_image_levels_max_diff"], "levels at most,", results["pack_image_levels_share_unequal"],
          "of the values unequal", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
