"""How far the quantized precisions move a result, against fp32 (CPU or GPU): one DiT call, and Gemma's
conditioning, for the pack's fp8 and int8 and for a plain fp8 cast (what upstream's fp8 weight options do).
tests/unit/test_quantize.py and test_te_quantize.py bound these figures; bench/quant_cpu_errors.py prints them."""
from __future__ import annotations

import dataclasses

import torch

from . import stress
from .dit_calls import dit_call

PROMPT = "1girl, red_eyes, cherry_blossoms, looking_at_viewer, outdoors"


def plain_fp8_cast(sd: dict) -> dict:
    """What upstream's `UNETLoader weight_dtype fp8_e4m3fn` (and `--fp8_e4m3fn-text-enc`) does to weights: every
    floating tensor stored as fp8 without a scale, cast back to the compute dtype per op. Upstream's own model
    detection cannot build the tiny model (its head dim is not 96), so the cast is applied to the weights here;
    bench/quant_accuracy.py runs upstream's loader itself on the full-size model."""
    return {k: v.to(torch.float8_e4m3fn).to(v.dtype) if v.is_floating_point() else v for k, v in sd.items()}


def build_dit(sd: dict, precision: str, path="tiny"):
    """(ModelPatcher, unet config) of a DiT state dict through the pack's loader."""
    from pipeline import loader

    parts = loader.NewBieParts(sd, {}, {}, {}, None, None, {"dit": str(path)})
    patcher, cfg, _, _ = loader.build_model(parts, precision)
    return patcher, cfg


def dit_errors(sd: dict, check=lambda patcher: None) -> dict:
    """Relative error of one DiT call against the fp32 model: fp8, int8 and a plain fp8 cast. `check` sees each
    quantized model (tests assert its weights are ComfyUI's QuantizedTensor)."""
    ref, cfg = build_dit(sd, "fp32")
    o_ref = dit_call(ref, cfg)
    out = {"plain_fp8_cast": stress.relative_error(dit_call(build_dit(plain_fp8_cast(sd), "fp32")[0], cfg), o_ref)}
    for precision in ("fp8", "int8"):
        patcher, _ = build_dit(sd, precision)
        check(patcher)
        out[precision] = stress.relative_error(dit_call(patcher, cfg), o_ref)
    return out


def clip(parts, te_precision, gemma=None):
    """The pack's CLIP for `parts` (with `gemma` in place of its Gemma, if given)."""
    from pipeline import loader

    if gemma is not None:
        parts = dataclasses.replace(parts, gemma=gemma)
    return loader.build_clip(parts, te_precision)[0]


def conditioning(clip_) -> torch.Tensor:
    return clip_.encode_from_tokens(clip_.tokenize(PROMPT)).float()


def gemma_errors(parts) -> dict:
    """Relative error of the conditioning against the fp32 encoder, per precision and for a plain fp8 cast."""
    ref = conditioning(clip(parts, "fp32"))
    out = {p: stress.relative_error(conditioning(clip(parts, p)), ref) for p in ("fp8", "int8")}
    out["plain fp8"] = stress.relative_error(conditioning(clip(parts, "fp16", plain_fp8_cast(parts.gemma))), ref)
    return out
