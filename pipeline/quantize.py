"""fp8 and int8 DiT weights in ComfyUI's own quantized format, made from the 16-bit checkpoint at load time.

The pack writes no tensor subclass and no matmul of its own. A quantized layer is what ComfyUI's quantized
checkpoints hold (QUANTIZATION.md): `<layer>.weight` in the storage dtype, `<layer>.weight_scale`, and a
`<layer>.comfy_quant` entry naming the format. ComfyUI's mixed-precision operations (comfy/ops.py,
`mixed_precision_ops`, picked by `pick_operations` when the model config has a `quant_config`) load those into
its `QuantizedTensor` (comfy/quant_ops.py, comfy_kitchen's layouts). So dynamic VRAM, LoRA patches (dequantise,
patch, requantise) and every other node keep working, fp8 matmuls run where the GPU has them
(`supports_fp8_compute`), and elsewhere the weight is dequantised to the compute dtype per layer.

Formats
- fp8: `float8_e4m3fn` (TensorCoreFP8E4M3Layout), one scale per tensor, scale = amax / 448, computed by the
  layout's own `quantize(..., scale="recalculate")`. The fp8 layout takes only a per-tensor scale.
- int8: `int8_tensorwise` (TensorWiseINT8Layout: comfy_kitchen's int8_linear quantizes the activations per row
  and multiplies with torch._int_mm). The layout also takes one scale per output channel (`per_channel=True`,
  scale = row amax / 127), which is used here: it bounds each row's error by that row's own amax rather than
  the whole matrix's. On Hopper and newer GPUs the int8 layers multiply in the compute dtype instead
  (pipeline/quantized_ops.py: the int8 matmul measured 4.4x slower than bf16 there).

What stays 16-bit (loaded in the compute dtype), and why
- Embedders (x_embedder, t_embedder, cap_embedder, clip_text_pooled_proj, time_text_embed) and final_layer:
  under 1% of the weights, and every token passes through them (an error there is not averaged out by
  attention); the final layer writes the velocity itself.
- Norms and the pad tokens: vectors, not Linear weights; ComfyUI quantizes only Linear layers anyway.
- The blocks' adaLN modulation (`adaLN_modulation.1`, 1024 -> 4*dim, about 10% of the weights): it produces
  the scales and gates of every block, so its error scales the whole branch. Measured on the CPU (full-width
  one-block model, one DiT call vs fp32): quantizing it too raises the fp8 error from 0.0048 to 0.0053 and the
  int8 error from 0.0025 to 0.0028, for 0.36 GB less at full size; kept 16-bit.
Everything else in the blocks is quantized: attention.qkv, attention.out, feed_forward.w1/w2/w3
(about 90% of the DiT's weights).

Measured on the CPU (one DiT call, fp32 compute, vs the fp32 model; bench/quant_cpu_errors.py prints them,
tests/unit/test_quantize.py checks them):
  full-width one-block model (dim 2304): pack fp8 0.0048, pack int8 0.0025, upstream's plain fp8 cast 0.025
  tiny model (dim 96):                   pack fp8 0.0063, pack int8 0.0024, upstream's plain fp8 cast 0.024
Upstream's `UNETLoader weight_dtype fp8_e4m3fn` stores every weight (embedders and norms included) as fp8
without a scale: NewBie's weights (std about 1/sqrt(fan_in), 0.02 at dim 2304) fall largely into e4m3's
subnormal range, which a per-tensor scale avoids.
"""
from __future__ import annotations

import json
import logging

import torch

from . import compat
from .errors import ModelFileError

log = logging.getLogger(__name__)

# The loader's precision name -> ComfyUI's format name (comfy.quant_ops.QUANT_ALGOS).
FORMATS = {"fp8": "float8_e4m3fn", "int8": "int8_tensorwise"}
DESCRIPTION = {"fp8": "scaled fp8 e4m3, one scale per tensor", "int8": "int8, one scale per output channel"}

_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
_QUANTIZED = (".attention.qkv", ".attention.out", ".feed_forward.w1", ".feed_forward.w2", ".feed_forward.w3")
QUANT_KEY = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"


def layers_to_quantize(sd: dict, blocks: tuple = _BLOCKS, kinds: tuple = _QUANTIZED) -> list[str]:
    """The Linear layers that get quantized: those under `blocks` whose names end in one of `kinds` (default: the
    DiT's; see the module docstring for those kept 16-bit; pipeline/te_quantize.py passes Gemma's)."""
    return sorted(k[:-len(".weight")] for k, v in sd.items()
                  if k.startswith(blocks) and k.endswith(".weight") and v.ndim == 2
                  and k[:-len(".weight")].endswith(kinds))


def quantize_weight(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, weight_scale) through ComfyUI's own layout class for the format."""
    layout = compat.quant_layout(FORMATS[precision], precision)
    w = weight.float()
    if precision == "int8":
        qdata, params = layout.quantize(w, is_weight=True, per_channel=True)
    else:
        qdata, params = layout.quantize(w, scale="recalculate")
    return qdata, params.scale.float()


def quantize_state_dict(sd: dict, precision: str, layers: list[str] | None = None) -> dict:
    """A copy of the 16-bit DiT state dict with `layers` (default: `layers_to_quantize`) in `precision`, plus
    the per-layer `comfy_quant` entries ComfyUI's mixed-precision operations read."""
    fmt = FORMATS[precision]
    out = dict(sd)
    layers = layers_to_quantize(sd) if layers is None else layers
    for layer in layers:
        out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = quantize_weight(sd[f"{layer}.weight"], precision)
    return with_quant_entries(out, {layer: layer_config(layer, precision) for layer in layers})


# Inputs an fp8 matmul cannot take as they are. With fp8 compute ComfyUI quantizes each layer's input with the
# checkpoint's `input_scale`, or with scale 1 where there is none (as here: activations are not calibrated), so an
# input beyond e4m3's 448 cannot be represented. The blocks' other Linears take RMS-normalised, modulated inputs
# (attention.out the attention's convex mix of v); feed_forward.w2 takes the SwiGLU product silu(w1 x) * (w3 x),
# which has no such bound (it is what overflows fp16, pipeline/precision.py). So w2 keeps its fp8 weight but
# multiplies in the compute dtype (ComfyUI's `full_precision_matrix_mult`): a third of the FFN's matmul work.
# That is what the saved file says, and what ComfyUI's own loader does with it; the pack's fp8 layers multiply it in
# fp8 all the same, with a scale for each row of its input (pipeline/quantized_ops.py, `fp8_linear_rowwise`).
_FULL_PRECISION_MM = (".feed_forward.w2",)


def layer_config(layer: str, precision: str) -> dict:
    """The `comfy_quant` entry of one quantized layer."""
    conf = {"format": FORMATS[precision]}
    if precision == "fp8" and layer.endswith(_FULL_PRECISION_MM):
        conf["full_precision_matrix_mult"] = True
    return conf


def with_quant_entries(sd: dict, layers: dict) -> dict:
    """`sd` with ComfyUI's per-layer `comfy_quant` entries for `layers` ({name: {"format": ...}}), encoded by
    ComfyUI's own reader of `_quantization_metadata` (comfy.utils.convert_old_quants)."""
    import comfy.utils

    sd, _ = comfy.utils.convert_old_quants(sd, "", metadata={METADATA_KEY: json.dumps({"layers": layers})})
    return sd


def layer_formats(sd: dict) -> dict:
    """{layer: its comfy_quant config} of a state dict carrying ComfyUI's per-layer entries."""
    return {k[:-len(QUANT_KEY)]: json.loads(bytes(v.tolist()).decode("utf-8"))
            for k, v in sd.items() if k.endswith(QUANT_KEY)}


def precision_of(sd: dict) -> str | None:
    """'fp8' or 'int8' for a DiT quantized in one of the pack's formats, None for a 16/32-bit one."""
    formats = {conf.get("format") for conf in layer_formats(sd).values()}
    if not formats:
        return None
    names = [p for p, f in FORMATS.items() if {f} == formats]
    return names[0] if names else "+".join(sorted(str(f) for f in formats))


def file_metadata(sd: dict) -> dict:
    """The safetensors metadata of a quantized DiT: `_quantization_metadata` as QUANTIZATION.md describes it."""
    return {METADATA_KEY: json.dumps({"format_version": "1.0", "layers": layer_formats(sd)})}


def save(sd: dict, path) -> None:
    """Write a quantized DiT as ComfyUI's quantized safetensors checkpoint: the tensors without the per-layer
    entries, and `_quantization_metadata` in the file's metadata (what comfy.sd.load_diffusion_model reads, so
    upstream's UNETLoader loads the file too)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in sd.items() if not k.endswith(QUANT_KEY)}
    save_file(tensors, str(path), metadata=file_metadata(sd))


def from_file(sd: dict, metadata: dict | None, path, expected: str) -> dict:
    """A state dict read from `path` with its quantization turned into per-layer entries and checked: ComfyUI's
    `_quantization_metadata`, or its older `scaled_fp8` layout (converted by ComfyUI's own reader,
    comfy.utils.convert_old_quants). Every quantized layer must have its weight in the storage dtype and a finite
    positive scale; anything else fails naming the file (a damaged file would otherwise load as silent garbage)."""
    import comfy.utils

    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None and "scaled_fp8" not in sd:
        return sd
    if raw is None:
        sd, _ = comfy.utils.convert_old_quants(dict(sd), "", metadata={})
        layers = layer_formats(sd)
        sd = {k: v for k, v in sd.items() if not k.endswith(QUANT_KEY)}  # written again below, once checked
    else:
        try:
            layers = json.loads(raw)["layers"]
            if not isinstance(layers, dict):
                raise ValueError("'layers' is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(path, f"its {METADATA_KEY} is not valid ({e})", expected) from None
    known = {f: p for p, f in FORMATS.items()}
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in known:
            raise ModelFileError(path, f"layer {layer} has quantization format {fmt!r}; the pack loads "
                                       f"{', '.join(FORMATS.values())}", expected)
        weight, scale = sd.get(f"{layer}.weight"), sd.get(f"{layer}.weight_scale")
        storage = compat.quant_storage_dtype(fmt, known[fmt])
        if weight is None or scale is None:
            raise ModelFileError(path, f"quantized layer {layer} has no {'weight' if weight is None else 'weight_scale'}",
                                 expected)
        if weight.dtype != storage:
            raise ModelFileError(path, f"quantized layer {layer} stores {weight.dtype}, its format {fmt} needs "
                                       f"{storage}", expected)
        if scale.numel() not in (1, weight.shape[0]) or not bool(torch.isfinite(scale).all()) or \
                not bool((scale > 0).all()):
            raise ModelFileError(path, f"quantized layer {layer} has a damaged weight_scale "
                                       f"(shape {tuple(scale.shape)}, finite and positive expected)", expected)
    return with_quant_entries(sd, layers)


def stored_bytes(sd: dict) -> int:
    """Bytes of a DiT state dict's tensors as they are stored (quantized weights at 1 byte per value)."""
    return sum(v.numel() * v.element_size() for k, v in sd.items() if not k.endswith(QUANT_KEY))


def write_quantized_file(sd: dict, precision: str, path, source) -> str:
    """Quantize a 16-bit DiT state dict once and write it to `path` (never over an existing file); a report."""
    from pathlib import Path

    path, expected = Path(path), "a new file name for the quantized DiT (an existing file is never overwritten)"
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(path, "does not end in .safetensors", expected)
    if path.exists():
        raise ModelFileError(path, "already exists", expected)
    stored = precision_of(sd)
    if stored is not None:
        raise ModelFileError(source, f"this DiT is already quantized ({stored})", "the 16-bit DiT to quantize")
    quantized = quantize_state_dict(sd, precision)
    tmp = path.with_name(path.name + ".partial")
    save(quantized, tmp)
    tmp.replace(path)  # a crash leaves a .partial file behind, never a half-written model under the real name
    return (f"wrote {path.name}: {precision} ({DESCRIPTION[precision]}) in {len(layer_formats(quantized))} Linear "
            f"layers, {stored_bytes(quantized) / 1e9:.2f} GB (from {stored_bytes(sd) / 1e9:.2f} GB). Pick it in "
            f"NewBie Loader with precision {precision}; ComfyUI's Load Diffusion Model reads it too.")
