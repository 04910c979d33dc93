"""The seed article's three memory claims, measured (the article NewBie's low-VRAM claims came from):

1. "bf16 with flash-attn costs 1.2 GB more than fp16": attention at NewBie's shapes (1024²: 4096 image tokens +
   caption tokens, 24 heads of 96, CFG batch 2) through each SDPA kernel (flash, memory-efficient, math) in fp16
   and bf16; peak extra memory and time per call. flash-attn itself is not installed on the device (no wheel
   carried), so PyTorch's own flash kernel stands in for it.
2. "Euler a saves 0.7 GB over DPM++ 2M": measured with bench/run.py --sampler (server peak memory), not here.
3. "XML parsing pushes tokens from 77 to 220 and that is what breaks 16 GB": token counts of an XML prompt, the
   same prompt in official form (system prompt + XML) and flattened to tags, with the pack's tokenizers (the
   tiny sentencepiece models: counts are indicative, not Gemma's real vocabulary), and the peak memory and time
   of encoding 77, 220 and 512 tokens with the full-size Gemma-3-4B (random weights).

    python3 bench/seed_claims.py --out $OUT [--models /tmp/models]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def attention_memory(torch, F):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    tokens = 4096 + 256
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(2, 24, tokens, 96, device="cuda", dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("mem_efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(5):
                        F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    ms = (time.perf_counter() - t) / 5 * 1000
                peak = torch.cuda.max_memory_allocated() - base
                out.append({"dtype": str(dtype).split(".")[-1], "kernel": name, "extra_peak_mib": round(peak / 2**20, 1),
                            "ms_per_call": round(ms, 3)})
            except RuntimeError as e:
                out.append({"dtype": str(dtype).split(".")[-1], "kernel": name, "error": str(e)[:200]})
        del q, k, v
        torch.cuda.empty_cache()
    return out


def token_counts(parts):
    from pipeline import xml_prompt
    import sentencepiece as spm

    xml = ("<character_1><n>$character_1$</n><gender>1girl</gender><appearance>blue_hair, long_twintails, teal_eyes"
           "</appearance><clothing>white_shirt, black_skirt</clothing><expression>smile</expression><position>"
           "center_left</position></character_1>\n<general_tags><count>1girl</count><style>anime_style, digital_art"
           "</style><background>night_sky</background><quality>high_quality, masterpiece</quality></general_tags>")
    parsed = xml_prompt.parse_prompt(xml)
    texts = {"xml": xml, "official_gemma (system prompt + xml)": xml_prompt.encoder_texts(parsed, "official")[0],
             "flattened_tags": xml_prompt.flatten_tags(parsed)}
    res = {}
    for enc, tok in (("gemma", parts.gemma_tokenizer), ("jina", parts.jina_tokenizer)):
        sp = spm.SentencePieceProcessor(model_proto=tok.numpy().tobytes())
        res[enc] = {k: len(sp.encode(v)) for k, v in texts.items()}
    return res


def encode_memory(torch, clip, lengths=(77, 220, 512)):
    import comfy.model_management as mm

    out = []
    tok = clip.tokenize("x")
    for n in lengths:
        # Token ids of the requested length (the ids themselves do not change the cost).
        tokens = {"gemma": [[(2, 1.0)] + [(5, 1.0)] * (n - 1)], "jina": tok["jina"]}
        mm.load_models_gpu([clip.patcher])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        clip.encode_from_tokens_scheduled(tokens)
        torch.cuda.synchronize()
        out.append({"gemma_tokens": n, "extra_peak_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
                    "seconds": round(time.perf_counter() - t, 3)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args()
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import torch
    import torch.nn.functional as F
    import folder_paths  # noqa: F401  (ComfyUI's model folders, needed by the CLIP loader)
    from devkit import tiny_models
    from pipeline import loader

    result = {"attention": attention_memory(torch, F)}
    print(json.dumps(result["attention"]), flush=True)
    paths = tiny_models.write_single_files(args.models, tiny_models.FULL, device="cuda")
    sd_g = loader.checkpoint.load_state_dict(paths["gemma"], "gemma")
    sd_j = loader.checkpoint.load_state_dict(paths["jina"], "jina")
    parts = loader.NewBieParts({}, sd_g, sd_j, {}, sd_g.pop("spiece_model"), sd_j.pop("spiece_model"),
                               {"gemma": paths["gemma"], "jina": paths["jina"]})
    result["token_counts_tiny_tokenizers"] = token_counts(parts)
    print(json.dumps(result["token_counts_tiny_tokenizers"]), flush=True)
    clip, *_ = loader.build_clip(parts, "bf16")
    result["gemma_encode"] = encode_memory(torch, clip)
    print(json.dumps(result["gemma_encode"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_claims.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
