"""Does acceleration change the picture? The final latent of a whole sampling run (ComfyUI's own sampler,
fixed seed) for eager and compiled blocks, in bf16 and the pack's fp16, against fp32 eager; and one DiT call the
same way. Issue 11 asks for the accelerated output within 1e-2 (relative) of the eager path. A `+graphs` variant
samples with CUDA graphs (pipeline/cuda_graphs.py; the others without) and is compared bit for bit with the same
variant without them.

    python3 bench/sampling_accuracy.py --out $OUT                  # full size, 1024x1024, 25 steps (GPU)
    python3 bench/sampling_accuracy.py --tiny --out /tmp/acc       # tiny model on a CPU (a smoke test)

Conditioning is random (caption features and Jina pooled vector of the right shapes), as the weights are: the
figures say how far the paths drift apart, not how good a picture is. Writes OUT/sampling_accuracy.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "bf16", "bf16+compile", "bf16+compile+graphs", "fp16", "fp16+compile", "fp16+compile+graphs")


class _GraphLog(logging.Handler):
    """Keeps the last line pipeline/cuda_graphs.py logged (how many calls a run replayed)."""

    last = None

    def emit(self, record):
        self.last = record.getMessage()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import torch

    from devkit import stress, tiny_models

    tiny_models._comfy_cpu_safe()
    import comfy.model_management as mm
    import comfy.sample

    from devkit import dit_calls
    from pipeline import block_compile, loader

    spec = tiny_models.TINY if args.tiny else tiny_models.FULL
    dev = mm.get_torch_device()
    shapes = tiny_models._meta_state_shapes(spec)["dit"]
    base_sd = tiny_models.random_state_dict(shapes, spec.seed, torch.bfloat16, "cuda" if dev.type == "cuda" else "cpu")
    hw = (8, 8) if args.tiny else (128, 128)
    tokens = 12 if args.tiny else 96
    results, ref = {}, {}
    graph_log = _GraphLog()
    logging.getLogger("pipeline.cuda_graphs").addHandler(graph_log)
    logging.getLogger("pipeline.cuda_graphs").setLevel(logging.INFO)
    for variant in args.variants.split(","):
        prec, *extras = variant.split("+")
        # CUDA graphs (pipeline/cuda_graphs.py) only in the variants that name them: the others are the references
        os.environ["NEWBIE_CUDA_GRAPHS"] = "1" if "graphs" in extras else "0"
        parts = loader.NewBieParts(dict(base_sd), {}, {}, {}, None, None, {"dit": "random"})
        patcher, cfg, _, _ = loader.build_model(parts, prec, dynamic=False)
        if "compile" in extras:
            block_compile.apply(patcher)
        g = torch.Generator().manual_seed(5)
        # a positive and a negative caption of different lengths, as real prompts are (batched into one call by
        # pipeline/cfg_batch.py)
        cond = [[torch.randn(1, tokens, cfg["cap_feat_dim"], generator=g),
                 {"pooled_output": torch.randn(1, cfg["clip_text_dim"], generator=g)}]]
        uncond = [[torch.randn(1, max(tokens // 3, 4), cfg["cap_feat_dim"], generator=g),
                   {"pooled_output": torch.randn(1, cfg["clip_text_dim"], generator=g)}]]
        latent = torch.zeros(1, 16, *hw)
        noise = comfy.sample.prepare_noise(latent, 42)
        t = time.perf_counter()
        out = comfy.sample.sample(patcher, noise, args.steps, 5.0, "euler_ancestral", "simple", cond, uncond,
                                  latent, seed=42, disable_pbar=True).float().cpu()
        r = {"sampling_s": round(time.perf_counter() - t, 2),
             "finite": bool(torch.isfinite(out).all())}
        if "graphs" in extras:
            r["graphs"] = graph_log.last
        one_call = dit_calls.dit_call(patcher, cfg, dit_calls.dit_inputs(cfg, dev, hw, tokens)).cpu()
        if not ref:
            ref = {"latent": out, "call": one_call}
        r["latent_rel_error_vs_" + args.variants.split(",")[0]] = stress.relative_error(out, ref["latent"])
        r["call_rel_error_vs_" + args.variants.split(",")[0]] = stress.relative_error(one_call, ref["call"])
        eager = results.get(prec, {}).get("_latent")
        if extras and eager is not None:
            r["latent_rel_error_vs_eager"] = stress.relative_error(out, eager)
            r["call_rel_error_vs_eager"] = stress.relative_error(one_call, results[prec]["_call"])
        without = results.get("+".join([prec] + [e for e in extras if e != "graphs"]), {}).get("_latent")
        if "graphs" in extras and without is not None:
            r["latent_bit_equal_without_graphs"] = bool(torch.equal(out, without))
            r["latent_rel_error_vs_without_graphs"] = stress.relative_error(out, without)
        results[variant] = {**r, "_latent": out, "_call": one_call}
        print(f"[accuracy] {variant}: {json.dumps(r)}", flush=True)
        mm.unload_all_models()
        del patcher
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    clean = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling_accuracy.json").write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
