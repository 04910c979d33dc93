"""fp16 accuracy of the full-size DiT on the GPU: one DiT call at 1024x1024 (4096 image tokens, CFG batch of 2)
with fp32 as the reference, for the pack's fp16, upstream-style plain fp16 and bf16; on the random weights
and on the stress set (devkit/stress.py). Writes OUT/fp16_accuracy.json.

    python3 bench/fp16_accuracy.py --models /tmp/models --out $OUT
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
    args = ap.parse_args()
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import torch
    import comfy.model_management as mm
    from devkit import stress, tiny_models
    from pipeline import checkpoint, loader, precision

    spec = tiny_models.TINY if args.tiny else tiny_models.FULL
    dit_path = args.models / tiny_models.SINGLE_FILE_NAMES["dit"].format(name=spec.name)
    if not dit_path.exists():  # a fresh machine: write the weights as bench/run.py does
        tiny_models.write_single_files(args.models, spec, device="cuda" if torch.cuda.is_available() else "cpu")
    base_sd = checkpoint.strip_prefix(checkpoint.load_state_dict(dit_path, "DiT"), ("model.diffusion_model.",))
    cfg = None
    results = {}
    for set_name, sd in (("random", base_sd), ("stress", None)):
        if sd is None:
            sd = stress.stress_state_dict(base_sd)
        parts = loader.NewBieParts(sd, {}, {}, {}, None, None, {"dit": str(dit_path)})
        outs = {}
        for label, prec, safe in (("fp32", "fp32", True), ("fp16_pack", "fp16", True),
                                  ("fp16_plain", "fp16", False), ("bf16", "bf16", True)):
            patcher, cfg, _, _ = loader.build_model(parts, prec, safe_fp16=safe)
            mm.load_models_gpu([patcher])
            dev = mm.get_torch_device()
            g = torch.Generator(device="cpu").manual_seed(3)
            x = torch.randn(2, 16, 128, 128, generator=g).to(dev)
            context = torch.randn(2, 96, cfg["cap_feat_dim"], generator=g).to(dev)
            pooled = torch.randn(2, cfg["clip_text_dim"], generator=g).to(dev)
            sigma = torch.tensor([0.7, 0.7], device=dev)
            topts = dict(patcher.model_options.get("transformer_options", {}))
            topts["wrappers"] = patcher.wrappers
            with torch.no_grad():
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = patcher.model.apply_model(x, sigma, c_crossattn=context, num_tokens=96,
                                                clip_text_pooled=pooled, transformer_options=topts)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - t
                t = time.perf_counter()
                for _ in range(3):
                    patcher.model.apply_model(x, sigma, c_crossattn=context, num_tokens=96,
                                              clip_text_pooled=pooled, transformer_options=topts)
                torch.cuda.synchronize()
                steady = (time.perf_counter() - t) / 3
            outs[label] = out.float().cpu()
            results.setdefault(set_name, {})[label] = {
                "first_call_s": round(elapsed, 4), "call_s": round(steady, 4),
                "nonfinite": int((~torch.isfinite(outs[label])).sum()),
                "fp32_recomputations": getattr(precision.state_of(patcher), "recomputed", 0)}
            mm.unload_all_models()
            del patcher
            gc.collect()
            torch.cuda.empty_cache()
        for label in ("fp16_pack", "fp16_plain", "bf16"):
            results[set_name][label]["rel_error_vs_fp32"] = stress.relative_error(outs[label], outs["fp32"])
        print(json.dumps({set_name: results[set_name]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp16_accuracy.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
