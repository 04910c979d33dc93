"""fp8 and int8 Gemma-3-4B in ComfyUI's own quantized text-encoder format, made from the 16-bit file at load time.

Gemma-3-4B is 7.8 GB in 16 bits; with its decoder layers' matrices at 1 byte per weight it is about 4.5 GB
(3.2 GB of quantized matrices plus the 1.3 GB embedding table), so the text-encoder stage fits an 8 GB card.
Jina CLIP v2 (1.1 GB in 16 bits) stays 16-bit: it is small next to Gemma, and quantizing it would save little.

The weights are quantized exactly as the DiT's are (pipeline/quantize.py: the same formats, ComfyUI's layout
classes, the same per-layer `comfy_quant` entries). They are run the way ComfyUI runs a quantized text-encoder
file: comfy.sd passes `quantization_metadata` in the text encoder's model_options and comfy.sd1_clip.SDClipModel
then builds its transformer with `comfy.ops.mixed_precision_ops(..., full_precision_mm=True)`. The pack passes
it to Gemma only (as upstream's newbie.te(llama_quantization_metadata=...) does). With full_precision_mm every
quantized layer is dequantised to the compute dtype when it runs (weight-only quantization: no fp8 matmul, so
Gemma's unbounded activations are never cast to fp8). The 16-bit parts and the compute are in what
text_encoder_precision 'auto' picks (ComfyUI's text-encoder dtype).

What is quantized: in every decoder layer (`model.layers.N.`), the attention's q/k/v/o projections and the
MLP's gate/up/down projections: 3.2 of Gemma's 3.9 billion weights.
What stays 16-bit, and why
- The embedding table (`model.embed_tokens`): a lookup, not a matmul; each token reads one row, so its error is
  not averaged over a matrix product, and ComfyUI's mixed-precision operations quantize only Linear layers.
- The norms (input/post-attention/pre- and post-feedforward, q/k norms, the final norm): vectors that scale
  every channel of every token; tiny, and not Linear weights.

Measured on the CPU (relative error of the conditioning NewBie uses, Gemma's hidden_states[-2], for one prompt,
against the 32-bit encoder; tests/unit/test_te_quantize.py). The 16-bit encoder is within 1e-6 of it here (same
bf16 weights, the CPU computes in fp32), so the figures against 16 bits are the same:
  full-width Gemma, 3 decoder layers (width 2560): pack fp8 0.136, pack int8 0.048, plain fp8 cast 0.259
  tiny Gemma (width 64):                           pack fp8 0.122, pack int8 0.032, plain fp8 cast 0.155
The plain fp8 cast is upstream's --fp8_e4m3fn-text-enc: every weight, the embedding and norms included, stored
as fp8 without a scale; at width 2560 the weights (std 1/sqrt(2560) = 0.02) fall largely into e4m3's subnormal
range, which a per-tensor scale avoids. The errors are far larger than one weight's (about 3% RMS for fp8, 1%
for int8): with random weights the layers amplify them. Real Gemma weights have not been measured; the GPU
figures are still to come (docs/BENCHMARKS.md).
"""
from __future__ import annotations

from . import compat, quantize

_LAYERS = ("model.layers.",)
_QUANTIZED = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj",
              ".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj")
OPTION = "text_encoder_precision"


def gemma_layers(sd: dict) -> list[str]:
    """Gemma's Linear layers that get quantized (see the module docstring for those kept 16-bit)."""
    return quantize.layers_to_quantize(sd, _LAYERS, _QUANTIZED)


def quantized_gemma(sd: dict, precision: str) -> dict:
    """A copy of Gemma's 16-bit state dict with its decoder layers' matrices in `precision` and ComfyUI's
    per-layer entries; a host without the format or without quantized text encoders fails naming the fix."""
    compat.require_text_encoder_quantization(precision)
    compat.quant_layout(quantize.FORMATS[precision], precision, OPTION)
    return quantize.quantize_state_dict(sd, precision, gemma_layers(sd))


def model_options(sd: dict) -> dict:
    """What Gemma's model_options get for a quantized state dict: ComfyUI's `quantization_metadata`, found as
    comfy.sd finds it for a quantized text-encoder file."""
    import comfy.utils

    quant = comfy.utils.detect_layer_quantization(sd, "")
    return {} if quant is None else {"quantization_metadata": quant}


def from_file(sd: dict, metadata: dict | None, path, expected: str, part: str) -> dict:
    """A text encoder as read from `path`. A quantized Gemma file (read and checked by quantize.from_file) is used
    as it is; a quantized Jina fails naming the file (the pack keeps Jina 16-bit: 1.1 GB, little to save)."""
    from .errors import ModelFileError

    sd = quantize.from_file(sd, metadata, path, expected)
    stored = quantize.precision_of(sd)
    if stored is not None and part != "gemma":
        raise ModelFileError(path, f"this {part} text encoder is quantized ({stored})",
                             f"its 16-bit file; the pack quantizes only Gemma ({OPTION} fp8 or int8)")
    if stored is not None and stored not in quantize.FORMATS:
        raise ModelFileError(path, f"its layers are quantized as {stored}",
                             f"a Gemma file in {' or '.join(quantize.FORMATS)} (or the 16-bit file)")
    return sd


def gemma_for(sd: dict, precision: str | None, path) -> dict:
    """Gemma's state dict for `precision` (the loader's text_encoder_precision): quantized now from 16 bits
    (fp8/int8), a quantized file as it is ('auto' or its own precision), or the 16-bit one untouched."""
    from .errors import ModelFileError

    stored = quantize.precision_of(sd)
    if stored is None:
        return quantized_gemma(sd, precision) if precision in quantize.FORMATS else sd
    if precision not in (None, "auto", stored):
        raise ModelFileError(path, f"this Gemma is already quantized ({stored})",
                             f"{OPTION} '{stored}' or 'auto' for this file, or the 16-bit file for '{precision}'")
    compat.require_text_encoder_quantization(stored)
    compat.quant_layout(quantize.FORMATS[stored], stored, OPTION)
    return sd
