"""The CPU error figures quoted for the quantized precisions (README, pipeline/quantize.py, pipeline/te_quantize.py):
one DiT call and Gemma's conditioning against fp32, for the pack's fp8 and int8 and a plain fp8 cast, on the tiny
model and on full-width models (devkit/quant_errors.py, which tests/unit/test_quantize.py and test_te_quantize.py
bound).

    COMFYUI_PATH=~/comfy/ComfyUI python bench/quant_cpu_errors.py      # a few minutes on a CPU
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    sys.path[:0] = [os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI")), str(REPO)]
    import torch

    from devkit import quant_errors, stress, tiny_models
    from devkit.dit_calls import dit_call
    from pipeline import loader, quantize

    tiny, full = tiny_models.TINY, tiny_models.FULL
    shapes = lambda spec, part: tiny_models._meta_state_shapes(spec)[part]  # noqa: E731
    one_block = dataclasses.replace(tiny, dit=dataclasses.replace(full.dit, n_layers=1, n_refiner_layers=1))
    print("DiT, tiny:", json.dumps(quant_errors.dit_errors(tiny_models.random_state_dict(shapes(tiny, "dit"), 0,
                                                                                    torch.bfloat16))), flush=True)
    print("DiT, full width, one block of each kind:",
          json.dumps(quant_errors.dit_errors(tiny_models.random_state_dict(shapes(one_block, "dit"), 0, torch.bfloat16))),
          flush=True)
    # The choice to keep adaLN modulation 16-bit (pipeline/quantize.py): the same call with it quantized too.
    sd = tiny_models.random_state_dict(shapes(one_block, "dit"), 0, torch.bfloat16)
    ref, cfg = quant_errors.build_dit(sd, "fp32")
    with_adaln = quantize.layers_to_quantize(sd) + sorted(k[:-len(".weight")] for k in sd
                                                          if k.endswith("adaLN_modulation.1.weight"))
    print("DiT, full width, adaLN modulation quantized too:", json.dumps({
        p: stress.relative_error(dit_call(quant_errors.build_dit(quantize.quantize_state_dict(sd, p, with_adaln), p)[0],
                                          cfg), dit_call(ref, cfg)) for p in ("fp8", "int8")}), flush=True)
    sds = tiny_models.build_state_dicts(tiny)
    gemma, jina = dict(sds["gemma"]), dict(sds["jina"])
    parts = loader.NewBieParts(sds["dit"], gemma, jina, sds["vae"], gemma.pop("spiece_model"),
                               jina.pop("spiece_model"), {"dit": "tiny"})
    print("Gemma, tiny:", json.dumps(quant_errors.gemma_errors(parts)), flush=True)
    g = dataclasses.replace(full.gemma, vocab_size=tiny.gemma.vocab_size, num_hidden_layers=3,
                            tokenizer_vocab=tiny.gemma.tokenizer_vocab)
    wide = tiny_models.random_state_dict(shapes(dataclasses.replace(tiny, gemma=g), "gemma"), 1, torch.bfloat16)
    print("Gemma, full width, 3 layers:", json.dumps(quant_errors.gemma_errors(dataclasses.replace(parts, gemma=wide))),
          flush=True)


if __name__ == "__main__":
    main()
