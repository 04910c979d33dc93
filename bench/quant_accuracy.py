"""Accuracy of the quantized DiT (pipeline/quantize.py): one DiT call at 1024x1024 (4096 image tokens, CFG batch
of 2) on the full-size random model against fp32, for the pack's fp8 and int8, upstream's plain fp8 cast
(`UNETLoader weight_dtype fp8_e4m3fn`, loaded by upstream's own loader) and the pack's fp8 file read by upstream's
loader (the format check), and fp8 with its switches (fp32 accumulation, the SwiGLU kernel); with the call times
and the DiT's bytes. Writes OUT/quant_accuracy.json.

    python3 bench/quant_accuracy.py --models /tmp/models --out $OUT
    python3 bench/quant_accuracy.py --tiny --out /tmp/out    # the CPU check: tiny model, 8x8 latent
With --tiny, upstream's loader cannot build the tiny model (its head dim is not 96), so the plain cast is applied
to the weights (what that loader stores) and the upstream rows other than the cast are left out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--fp8-only", action="store_true",
                    help="fp32's reference and the pack's fp8 rows only (its opt-in switches among them)")
    args = ap.parse_args()
    sys.path[:0] = [os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI")), str(REPO)]
    import torch

    from devkit import stress, tiny_models
    tiny_models._comfy_cpu_safe()  # lets --tiny run on a machine without CUDA
    import comfy.model_management as mm
    import comfy.sd
    from devkit.dit_calls import dit_call, dit_inputs
    from pipeline import checkpoint, loader, quantize

    spec = tiny_models.TINY if args.tiny else tiny_models.FULL
    dev = mm.get_torch_device()
    dit_path = args.models / tiny_models.SINGLE_FILE_NAMES["dit"].format(name=spec.name)
    if not dit_path.exists():  # a fresh machine: write the weights as bench/run.py does
        tiny_models.write_single_files(args.models, spec, device="cuda" if torch.cuda.is_available() else "cpu")
    sd = checkpoint.strip_prefix(checkpoint.load_state_dict(dit_path, "DiT"), ("model.diffusion_model.",))
    parts = loader.NewBieParts(sd, {}, {}, {}, None, None, {"dit": str(dit_path)})
    cfg = loader.detect.nextdit_config(sd)
    inputs = dit_inputs(cfg, dev, latent_hw=(8, 8) if args.tiny else (128, 128), tokens=12 if args.tiny else 96)
    fp8_file = args.out / f"{spec.name}-fp8.safetensors"
    args.out.mkdir(parents=True, exist_ok=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def measure(label, make):
        t = time.perf_counter()
        patcher = make()
        load_s = time.perf_counter() - t
        mm.load_models_gpu([patcher])
        sync()
        t = time.perf_counter()
        out = dit_call(patcher, cfg, inputs)
        sync()
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(3):
            dit_call(patcher, cfg, inputs)
        sync()
        row = {"load_s": round(load_s, 2), "first_call_s": round(first, 4),
               "call_s": round((time.perf_counter() - t) / 3, 4),
               "dit_bytes": quantize.stored_bytes(patcher.model.diffusion_model.state_dict())}
        mm.unload_all_models()
        del patcher
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return out.cpu(), row

    def pack(precision, dit=None):
        return lambda: loader.build_model(loader.NewBieParts(dit or sd, {}, {}, {}, None, None,
                                                              {"dit": str(dit_path)}), precision)[0]

    results = {}
    ref, results["fp32"] = measure("fp32", pack("fp32"))
    outs = {}
    for precision in ("fp8",) if args.fp8_only else ("bf16", "fp8", "int8"):
        outs[f"pack_{precision}"], results[f"pack_{precision}"] = measure(precision, pack(precision))
    # fp8's switches (read when the model is built): partial sums promoted to fp32 (the default before run94-95, whose
    # rows had fast accumulation as `pack_fp8_fastaccum`), and w2's input from the pack's SwiGLU kernel (a GPU's; on
    # a CPU the row is the default fp8 again)
    for label, env in (("pack_fp8_fp32accum", {"NEWBIE_FP8_ACCUM": "fp32"}),
                       ("pack_fp8_w2kernel", {"NEWBIE_FP8_W2": "kernel"})):
        os.environ.update(env)
        try:
            outs[label], results[label] = measure(label, pack("fp8"))
        finally:
            for k in env:
                os.environ.pop(k)
    if args.tiny and not args.fp8_only:
        cast = {k: v.to(torch.float8_e4m3fn).to(v.dtype) if v.is_floating_point() else v for k, v in sd.items()}
        outs["upstream_fp8_cast"], results["upstream_fp8_cast"] = measure("cast", pack("fp32", cast))
    elif not args.fp8_only:
        outs["upstream_fp8_cast"], results["upstream_fp8_cast"] = measure("upstream", lambda: comfy.sd.load_diffusion_model(
            str(dit_path), model_options={"dtype": torch.float8_e4m3fn}))
        quantize.save(quantize.quantize_state_dict(sd, "fp8"), fp8_file)
        outs["upstream_reads_pack_fp8_file"], results["upstream_reads_pack_fp8_file"] = measure(
            "upstream file", lambda: comfy.sd.load_diffusion_model(str(fp8_file)))
        fp8_file.unlink()
    for label, out in outs.items():
        results[label]["rel_error_vs_fp32"] = stress.relative_error(out, ref)
        print(json.dumps({label: results[label]}), flush=True)
    results["device"] = str(dev) + (f" {torch.cuda.get_device_name()}" if dev.type == "cuda" else "")
    results["fp8_compute"] = bool(mm.supports_fp8_compute(dev))
    (args.out / "quant_accuracy.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
