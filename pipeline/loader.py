"""Build ComfyUI's own MODEL (ModelPatcher), CLIP and VAE objects from NewBie files of any size.

Two layouts are read: ComfyUI's single files (one file per part) and the official repository's
diffusers-style folder (converted to ComfyUI key names by `keymaps`). Dimensions come from the tensors
(`detect`), so a tiny test model and the full 3.5B model go through the same code. The objects returned
are plain ComfyUI objects: KSampler, LoRA loaders, ModelSamplingAuraFlow and every other node accept them.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import (block_compile, block_prefetch, block_stream, cfg_batch, checkpoint, compat, cuda_graphs, detect,
               device_conds, group_norm, guard_skip, host_copies, host_sigmas, kv_repeat, precision as precision_mod,
               prompt_limits, qkv_rope, quantize, quantized_ops, sdpa, swiglu_fp8, te_quantize, vae_memory, vram_budget)
from .errors import ModelFileError

log = logging.getLogger(__name__)

# How the CLIP's own checks name the text: they cannot know which node's input it came from.
TOKENIZER_INPUT = "prompt text (given to NewBie's CLIP)"

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The DiT also takes ComfyUI's quantized formats (pipeline/quantize.py); so does Gemma (pipeline/te_quantize.py).
DIT_PRECISIONS = [*PRECISIONS, *quantize.FORMATS]
TE_PRECISIONS = ["auto", *PRECISIONS, *quantize.FORMATS]

EXPECT = {
    "dit": "a NewBie-image DiT (.safetensors, e.g. NewBie-Image-Exp0.1-bf16.safetensors)",
    "gemma": "the Gemma-3-4B text encoder (.safetensors, e.g. gemma_3_4b_it_bf16.safetensors)",
    "jina": "the Jina CLIP v2 text encoder (.safetensors, e.g. jina_clip_v2_bf16.safetensors)",
    "vae": "the FLUX.1 VAE (.safetensors, e.g. ae.safetensors)",
}


@dataclass
class NewBieParts:
    """The four parts in ComfyUI's key layout, with the tokenizers and where each came from."""
    dit: dict
    gemma: dict
    jina: dict
    vae: dict
    gemma_tokenizer: object
    jina_tokenizer: object
    paths: dict = field(default_factory=dict)


@dataclass
class LoadedNewBie:
    model: object
    clip: object
    vae: object
    report: str


def _expect_kind(sd: dict, path, part: str, signature: str) -> None:
    if signature not in sd:
        raise ModelFileError(path, f"this file holds {checkpoint.identify(sd.keys())}", EXPECT[part])


_SIGNATURE = {"dit": "cap_embedder.1.weight", "gemma": "model.layers.0.self_attn.q_norm.weight",
              "jina": "model.encoder.layers.0.mixer.Wqkv.weight", "vae": "decoder.conv_in.weight"}


def read_single_part(part: str, path) -> tuple[dict, object]:
    """One part in ComfyUI's single-file layout: (state dict, embedded tokenizer or None)."""
    sd = checkpoint.load_state_dict(path, EXPECT[part])
    if part == "dit":
        # A quantized DiT (ComfyUI's formats) gets its per-layer entries, checked, as it is.
        sd = quantize.from_file(sd, checkpoint.read_metadata(path), path, EXPECT[part])
        # full checkpoints carry the DiT under model.diffusion_model.; UNETLoader accepts both
        sd = checkpoint.strip_prefix(sd, ("model.diffusion_model.", "diffusion_model."))
    elif part in ("gemma", "jina"):
        sd = te_quantize.from_file(sd, checkpoint.read_metadata(path), path, EXPECT[part], part)
    _expect_kind(sd, path, part, _SIGNATURE[part])
    if part not in ("gemma", "jina"):
        return sd, None
    if "spiece_model" not in sd:
        raise ModelFileError(path, "has no embedded tokenizer ('spiece_model')",
                             "ComfyUI's single-file text encoder with its tokenizer inside")
    return sd, sd.pop("spiece_model")


def read_single_files(paths: dict) -> NewBieParts:
    """paths: {'dit', 'gemma', 'jina', 'vae'} -> file paths (ComfyUI's single-file layout)."""
    read = {part: read_single_part(part, paths[part]) for part in ("dit", "gemma", "jina", "vae")}
    return NewBieParts(read["dit"][0], read["gemma"][0], read["jina"][0], read["vae"][0], read["gemma"][1],
                       read["jina"][1], dict(paths))


def with_single_files(parts: NewBieParts, overrides: dict) -> NewBieParts:
    """`parts` with some of gemma/jina/vae replaced by single files ({part: path})."""
    for part, path in overrides.items():
        sd, tok = read_single_part(part, path)
        setattr(parts, part, sd)
        if tok is not None:
            setattr(parts, f"{part}_tokenizer", tok)
        parts.paths[part] = path
    return parts


def _folder_file(folder: Path, sub: str, names: tuple, part: str) -> Path:
    for name in names:
        p = folder / sub / name
        if p.exists():
            return p
    raise ModelFileError(folder / sub, f"no {' or '.join(names)} found",
                         f"{EXPECT[part]} in the official folder layout")


def _from_folder_layout(part: str, sd: dict, path, convert) -> dict:
    """One part of the official folder converted to ComfyUI's keys, and checked to be that part."""
    try:
        converted = convert(sd)
    except (KeyError, ValueError) as e:
        raise ModelFileError(path, f"unexpected tensor layout: {e}",
                             f"{EXPECT[part]} in the official folder layout") from None
    _expect_kind(converted, path, part, _SIGNATURE[part])
    return converted


def read_folder(folder: Path) -> NewBieParts:
    """The official repository's folder (model_index.json, transformer/, text_encoder/, clip_model/, vae/).

    Names and places follow the official converter (see pipeline/keymaps.py for the sources): the DiT keeps
    NextDiT's own names, Gemma-3 is in transformers' layout, Jina CLIP v2 in its remote-code layout with LoRA
    adapters (merged here for the configured default task), the VAE in diffusers' layout (ComfyUI converts it).
    """
    import json

    from . import keymaps

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise ModelFileError(folder, "model_index.json is missing", "the official NewBie folder layout")
    weights = ("diffusion_pytorch_model.safetensors", "model.safetensors")
    paths = {
        "dit": _folder_file(folder, "transformer", weights, "dit"),
        "gemma": _folder_file(folder, "text_encoder", weights, "gemma"),
        "jina": _folder_file(folder, "clip_model", weights, "jina"),
        "vae": _folder_file(folder, "vae", weights, "vae"),
    }
    tok_paths = {
        "gemma": _folder_file(folder, "text_encoder", ("tokenizer.model",), "gemma"),
        "jina": _folder_file(folder, "clip_model", ("sentencepiece.bpe.model", "tokenizer.model"), "jina"),
    }
    raw = {part: checkpoint.load_state_dict(p, EXPECT[part]) for part, p in paths.items()}
    jina_config_path = folder / "clip_model" / "config.json"
    try:
        jina_config = json.loads(jina_config_path.read_text()) if jina_config_path.exists() else None
    except ValueError as e:
        raise ModelFileError(jina_config_path, f"is not valid JSON: {e}", "JinaCLIPModel's config.json") from None
    converted = {part: _from_folder_layout(part, raw[part], paths[part], convert) for part, convert in (
        ("dit", keymaps.dit_from_diffusers), ("gemma", keymaps.gemma_from_transformers),
        ("jina", lambda sd: keymaps.jina_from_remote_code(sd, jina_config)))}
    toks = {k: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for k, p in tok_paths.items()}
    return NewBieParts(converted["dit"], converted["gemma"], converted["jina"], raw["vae"], toks["gemma"],
                       toks["jina"], {**paths, "folder": folder})


def read_dit(paths: dict) -> dict:
    """Only the DiT of a loaded model, from where it came: the official folder's transformer/ or a single file."""
    from . import keymaps

    if "folder" in paths:
        sd = checkpoint.load_state_dict(paths["dit"], EXPECT["dit"])
        return _from_folder_layout("dit", sd, paths["dit"], keymaps.dit_from_diffusers)
    return read_single_part("dit", paths["dit"])[0]


def read_text_encoders(paths: dict) -> NewBieParts:
    """Only Gemma and Jina (with their tokenizers), from where they came; the DiT and VAE are left empty."""
    folder = paths.get("folder")
    in_folder = {p for p in ("gemma", "jina") if folder and Path(paths[p]).is_relative_to(Path(folder))}
    if in_folder:
        parts = read_folder(folder)
        parts.dit, parts.vae = {}, {}
    else:
        parts = NewBieParts({}, {}, {}, {}, None, None, {"dit": paths.get("dit")})
    return with_single_files(parts, {p: paths[p] for p in ("gemma", "jina") if p not in in_folder})


def reload_dit_patcher(paths: dict, precision: str, budget: int | None, fp16_state, dynamic: bool = True,
                       disable_dynamic: bool = False):
    """ComfyUI's `cached_patcher_init` factory for the pack's MODEL, as its core loaders register one: the same
    DiT built again from its file, on the kind of patcher the loader chose (`dynamic`). ComfyUI calls it with
    disable_dynamic=True when a dynamic-VRAM model needs a non-dynamic twin (hooked conditioning in the sampler,
    TorchCompileModel), and without it for a multi-GPU deep clone, which puts the fresh DiT in a patcher of the
    original's class; the twin shares the fp16 path's state, and clone() carries over the patches, wrappers and
    options."""
    parts = NewBieParts(read_dit(paths), {}, {}, {}, None, None, dict(paths))
    patcher, *_ = build_model(parts, precision, budget=budget, dynamic=dynamic and not disable_dynamic,
                              fp16_state=fp16_state)
    return patcher


def reload_clip_patcher(paths: dict, te_precision: str | None, disable_dynamic: bool = False):
    """`cached_patcher_init` factory for the pack's CLIP (hook nodes clone it with disable_dynamic=True)."""
    return build_clip(read_text_encoders(paths), te_precision, disable_dynamic=disable_dynamic)[0].patcher


def _dtype_name(dt) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dt, str(dt))


def build_model(parts: NewBieParts, precision: str, safe_fp16: bool = True, budget: int | None = None,
                dynamic: bool = True, fp16_state=None):
    """ComfyUI's Lumina2 model (NextDiT) with NewBie's dimensions, in a ModelPatcher.

    safe_fp16=False gives what upstream does with --fp16-unet (plain fp16 everywhere): only for comparisons.
    budget: at most this many bytes of DiT weights on the GPU (pipeline/vram_budget.py); None for no cap.
    dynamic=False: ComfyUI's non-dynamic ModelPatcher even where dynamic VRAM is on (what compilation needs,
    pipeline/block_compile.py); a budget implies it.
    fp16_state: the fp16 path's state to share (a twin of an existing model); None for a new one.
    """
    import comfy.model_management as mm
    import comfy.supported_models
    import comfy.utils

    unet_config = detect.nextdit_config(parts.dit, parts.paths.get("dit"))
    model_config = comfy.supported_models.Lumina2(unet_config)
    load_device = mm.get_torch_device()
    dit = quantized_dit(parts, precision)
    if precision in quantize.FORMATS:
        # ComfyUI's mixed-precision operations (pick_operations sees quant_config, as for a quantized file read by
        # its own loaders). Compute in bf16 where the device has it, else fp32 -- upstream's Lumina2 dtypes: the
        # pack's fp16 path is an operations class of its own and does not combine with ComfyUI's quantized ones.
        model_config.quant_config = comfy.utils.detect_layer_quantization(dit, "")
        dtype = manual_cast = mm.unet_manual_cast(None, load_device, [torch.bfloat16, torch.float32])
        compat.set_inference_dtype(model_config, dtype, manual_cast, load_device)
        ops = quantized_ops_for(quantize.precision_of(dit), load_device)
        if ops is not None:
            model_config.custom_operations = ops(model_config.quant_config, manual_cast)
        return _finish_model(model_config, dit, load_device, budget, dynamic, None), unet_config, dtype, manual_cast
    # Upstream allows only bf16/fp32 for Lumina2/NewBie; the pack adds fp16 (made overflow-safe separately).
    model_config.supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    dtype = PRECISIONS[precision]
    safe_fp16 = safe_fp16 and precision == "fp16"
    if safe_fp16:
        # fp16 weights and GEMMs, fp32 activations (pipeline/precision.py explains why this cannot overflow).
        manual_cast = torch.float32
        fp16_state = precision_mod.configure_model_config(model_config, fp16_state)
    else:
        fp16_state = None
        # fp16 here is plain fp16 compute, as upstream's --fp16-unet (comparisons only)
        manual_cast = None if precision == "fp16" else mm.unet_manual_cast(dtype, load_device,
                                                                           model_config.supported_inference_dtypes)
    compat.set_inference_dtype(model_config, dtype, manual_cast, load_device)
    return _finish_model(model_config, dit, load_device, budget, dynamic, fp16_state), unet_config, dtype, manual_cast


def quantized_ops_for(fmt: str | None, device):
    """The pack's operations class factory, (quant_config, compute_dtype) -> operations, for a DiT quantized in
    `fmt` on `device` (pipeline/quantized_ops.py), or None for ComfyUI's own mixed-precision operations. The
    pack's layers are plain tensor ops where the weights are resident, which compiled blocks can take."""
    if fmt == "int8" and quantized_ops.int8_matmuls_dequantised(device):
        return quantized_ops.traceable_int8_ops
    if fmt == "fp8":
        fp8_compute = quantized_ops.fp8_matmuls(device)
        return functools.partial(quantized_ops.traceable_fp8_ops, fp8_compute=fp8_compute,
                                 rowwise_w2=quantized_ops.rowwise_w2(), device=device,
                                 fast_accum=quantized_ops.fast_accumulation())
    return None


def _finish_model(model_config, dit: dict, load_device, budget, dynamic: bool, fp16_state):
    """The model built from its config, in the patcher its residency needs, with the weights loaded."""
    import comfy.model_management as mm

    model = model_config.get_model(dit, "")
    if budget:
        patcher_cls = vram_budget.patcher_class()
        model.newbie_vram_budget = budget
    elif not dynamic:
        patcher_cls = vram_budget.resident_patcher_class()
    else:
        patcher_cls = compat.core_patcher_class()
    patcher = patcher_cls(model, load_device=load_device, offload_device=mm.unet_offload_device())
    model.load_model_weights(dict(dit), "", **compat.load_weights_kwargs(model, patcher))  # ComfyUI pops what it loads
    if not compat.is_dynamic(patcher):
        converted = settle_weight_dtypes(model)
        if converted:
            log.info("NewBie DiT: %d weights converted to the model's dtype at load (not at every call)", converted)
    unexpected = set(dit.keys()) - set(model.diffusion_model.state_dict().keys()) - \
        {k for k in dit if k.endswith(quantize.QUANT_KEY)}
    if unexpected:
        log.info("NewBie DiT: %d tensors not used by the model: %s", len(unexpected), sorted(unexpected)[:5])
    precision_mod.attach(patcher, fp16_state)
    cfg_batch.attach(patcher)
    host_sigmas.attach(patcher)
    device_conds.attach(patcher)
    block_prefetch.attach(patcher)
    if quantized_ops.w2_kernel() and swiglu_fp8.usable(load_device):
        swiglu_fp8.attach(patcher)
    if qkv_rope.enabled() and fp16_state is None and qkv_rope.usable(load_device):  # fp16 scales q and k itself
        qkv_rope.attach(patcher)
    if not compat.is_dynamic(patcher):
        block_stream.attach(patcher)
    cuda_graphs.attach(patcher)  # last: the innermost DIFFUSION_MODEL wrapper
    return patcher


_WIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # fp8 and int8 weights are quantized: left alone


def settle_weight_dtypes(model) -> int:
    """Give every plain floating-point weight of a non-dynamic model the dtype its layer was built for; returns
    how many were converted.

    Where ComfyUI's dynamic VRAM (comfy-aimdo, v0.33) is on, its layers are built without weights and take the
    file's tensors as they are at load, in the file's dtype, keeping the intended one beside them
    (`<name>_comfy_model_dtype`): a dynamic patcher streams and casts them at each call anyway. A non-dynamic
    patcher, which the pack uses for a DiT that stays resident or runs under a budget, keeps them as loaded, so a
    bf16 checkpoint loaded at `precision: fp16` cast every weight to fp16 in every DiT call: run50's profile of the
    fp16 server, 7 more kernels a block (the casts) and 6 % more GPU time a step than with dynamic VRAM off, and
    the fp16 image 1.06x slower. Quantized weights (a QuantizedTensor, or the pack's int8/fp8 tensors) are left
    as they are. Without dynamic VRAM (v0.8, --disable-dynamic-vram) the layers already hold their dtype and
    nothing changes."""
    converted = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            want = getattr(module, f"{name}_comfy_model_dtype", None)
            data = param.data
            if want not in _WIDE_FLOATS or data.dtype not in _WIDE_FLOATS or data.dtype == want \
                    or type(data) is not torch.Tensor:
                continue
            param.data = data.to(want)
            converted += 1
    return converted


def _streaming(patcher) -> str:
    """How a DiT that does not fit is streamed, for the report."""
    if not compat.is_dynamic(patcher):
        if block_stream.attached(patcher) and block_stream.comfy_pins():
            return ("ComfyUI's non-dynamic patcher keeps what fits on the GPU; the layers it leaves in pinned RAM are "
                    "fetched a transformer block ahead, on a side stream")
        return "ComfyUI decides what stays on the GPU"
    ahead = "; each block's weights fetched in one go as it starts" \
        if block_prefetch.available() and block_prefetch.enabled() else ""
    return f"ComfyUI's dynamic VRAM streams the weights that do not fit{ahead}"


def quantized_dit(parts: NewBieParts, precision: str) -> dict:
    """The DiT's state dict for `precision`: quantized now from 16 bits (fp8/int8), or a quantized file as it
    is (no second quantization); a quantized file with another precision picked fails naming the file."""
    stored = quantize.precision_of(parts.dit)
    if stored is None:
        return quantize.quantize_state_dict(parts.dit, precision) if precision in quantize.FORMATS else parts.dit
    if stored != precision:
        raise ModelFileError(parts.paths.get("dit"), f"this DiT is already quantized ({stored})",
                             f"precision '{stored}' in the loader for this file, or the 16-bit file for "
                             f"precision '{precision}'")
    return parts.dit


def _plans_residency(device, budget: int | None) -> bool:
    """Whether the loader plans the DiT's residency itself: on a GPU without a user's budget (which holds the DiT
    in its own non-dynamic patcher either way); a CPU needs no plan."""
    return getattr(device, "type", None) == "cuda" and not budget


def dit_room(device, budget: int | None) -> int | None:
    """Bytes a resident DiT could plan on `device` now: what it could hold (vram_budget.room_for_weights) beside a
    1024x1024 VAE decode (vram_budget.room_beside_decode); None where the loader plans nothing (_plans_residency)."""
    if not _plans_residency(device, budget):
        return None
    return vram_budget.room_beside_decode(vram_budget.room_for_weights(device),
                                          vae_memory.default_decode_bytes(device))


def dit_decode_eviction(device, budget: int | None, weight_bytes: int) -> int | None:
    """Bytes of a resident DiT a 1024x1024 VAE decode will push out every image on `device` (vram_budget.
    decode_eviction, with ComfyUI's reserve); None where the loader plans nothing (_plans_residency)."""
    if not _plans_residency(device, budget):
        return None
    import comfy.model_management as mm

    return vram_budget.decode_eviction(weight_bytes, vram_budget.room_for_weights(device),
                                       vae_memory.default_decode_bytes(device), int(mm.extra_reserved_memory()))


def _resident_line(weight_bytes: int, room: int, evicted: int | None) -> str:
    """The report's line for a DiT that stays resident."""
    gib = vram_budget.GIB
    line = (f"VRAM budget: none; the DiT's {weight_bytes / gib:.2f} GiB of weights stay resident (non-dynamic "
            f"patcher: with a call's activations they fit in the {room / gib:.1f} GiB free")
    if not evicted:
        return line + " beside a 1024² VAE decode)"
    back = ("from host copies kept in RAM after the first decode" if host_copies.enabled()
            else "copied out and back every image")
    return (line + f"; each 1024² VAE decode pushes about {evicted / gib:.1f} GiB or more of them out, loaded back "
            f"by the next image ({back}): slower than with room to spare, faster than streaming them)")


def streamed_share(weight_bytes: int, room: int | None,
                   activations: int = block_compile.ACTIVATION_ROOM) -> float | None:
    """The share of the DiT's weights that will not stay on the GPU beside `activations` (0 where they fit), from
    the room at load time (dit_room, or a user's budget for the weights alone with activations=0); None where the
    room is unknown (a CPU)."""
    if room is None or weight_bytes <= 0:
        return None
    return min(1.0, max(0.0, (weight_bytes + activations - room) / weight_bytes))


def dit_weight_bytes(parts: NewBieParts, precision: str) -> int:
    """Bytes of the DiT's weights once loaded in `precision` (quantized layers at 1 byte per value)."""
    if precision in quantize.FORMATS or quantize.precision_of(parts.dit):
        quantized = set(quantize.layer_formats(parts.dit)) or set(quantize.layers_to_quantize(parts.dit))
        return sum(v.numel() * (1 if k.endswith(".weight") and k[:-len(".weight")] in quantized else 2)
                   for k, v in parts.dit.items() if not k.endswith(quantize.QUANT_KEY))
    return sum(v.numel() for v in parts.dit.values()) * PRECISIONS[precision].itemsize


def _te_classes(gemma_cfg: dict, jina_cfg: dict, gemma_options: dict):
    """Text-encoder classes like ComfyUI's NewBieTEModel, built with the dimensions found in the files.
    gemma_options: model_options for Gemma only (a quantized Gemma's `quantization_metadata`)."""
    import comfy.sd1_clip
    import comfy.text_encoders.jina_clip_2 as jina
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.newbie as newbie

    class GemmaTE(comfy.sd1_clip.SDClipModel):
        # Same settings as comfy.text_encoders.lumina2.Gemma3_4BModel: features = hidden_states[-2].
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(gemma_cfg),
                             dtype=dtype, special_tokens={"start": 2, "pad": 0}, layer_norm_hidden_state=False,
                             model_class=llama.Gemma3_4B, enable_attention_masks=True,
                             return_attention_masks=True, model_options={**model_options, **gemma_options})

    class JinaTE(comfy.sd1_clip.SDClipModel):
        # Same settings as comfy.text_encoders.jina_clip_2.JinaClip2TextModel.
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(jina_cfg),
                             model_class=jina.XLMRobertaModel, special_tokens={"start": 0, "end": 2, "pad": 1},
                             enable_attention_masks=True, return_attention_masks=True, model_options=model_options)

    class NewBieTE(newbie.NewBieTEModel):
        # Upstream's NewBieTEModel, with encoders sized from the files (its encode/load logic is reused).
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.gemma = GemmaTE(device=device, dtype=dtype, model_options=model_options)
            self.jina = JinaTE(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    class NewBieTokenizer(newbie.NewBieTokenizer):
        # Upstream's tokenizer, bounded: text the encoders cannot take is refused before it is tokenized in full
        # or encoded, also when it comes through CLIPTextEncode or any other node holding this CLIP.
        def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
            prompt_limits.check_text(self, text, TOKENIZER_INPUT)
            tokens = super().tokenize_with_weights(text, return_word_ids, **kwargs)
            prompt_limits.check_tokens(self, tokens, text, TOKENIZER_INPUT)
            return tokens

    return NewBieTE, NewBieTokenizer


def build_clip(parts: NewBieParts, te_precision: str | None, disable_dynamic: bool = False):
    """ComfyUI's CLIP holding Gemma and Jina. te_precision fp8/int8 quantizes Gemma's decoder layers
    (pipeline/te_quantize.py); the rest of Gemma, and Jina, are then in what 'auto' picks."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models_base
    import comfy.utils
    import folder_paths

    gemma_cfg = detect.gemma_config(parts.gemma, parts.paths.get("gemma"))
    jina_cfg = detect.jina_config(parts.jina, parts.paths.get("jina"))
    gemma = te_quantize.gemma_for(parts.gemma, te_precision, parts.paths.get("gemma"))
    model_options = {}
    if te_precision in PRECISIONS:
        model_options["dtype"] = PRECISIONS[te_precision]
    te_cls, tok_cls = _te_classes(gemma_cfg, jina_cfg, te_quantize.model_options(gemma))
    target = comfy.supported_models_base.ClipTarget(tok_cls, te_cls)
    params = comfy.utils.calculate_parameters(parts.gemma) + comfy.utils.calculate_parameters(parts.jina)
    tokenizer_data = {"gemma_spiece_model": parts.gemma_tokenizer, "jina_spiece_model": parts.jina_tokenizer}
    kwargs = {}
    if disable_dynamic and compat.clip_takes_disable_dynamic():
        kwargs["disable_dynamic"] = True
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=params, tokenizer_data=tokenizer_data, state_dict=[gemma, parts.jina],
                         model_options=model_options, **kwargs)
    return clip, gemma_cfg, jina_cfg, model_options.get("dtype") or mm.text_encoder_dtype()


def build_vae(parts: NewBieParts):
    import comfy.sd

    w = parts.vae.get("decoder.conv_in.weight")
    if w is None:  # diffusers layout: ComfyUI converts it, the check uses the diffusers name
        w = parts.vae.get("decoder.conv_in.weight", parts.vae.get("decoder.conv_in.conv.weight"))
    if w is not None and w.shape[1] != 16:
        raise ModelFileError(parts.paths.get("vae"), f"VAE with {w.shape[1]} latent channels",
                             "the FLUX.1 VAE with 16 latent channels (ae.safetensors)")
    vae = comfy.sd.VAE(sd=parts.vae)
    vae_memory.fit(vae)
    if group_norm.enabled() and group_norm.usable(vae.device):
        group_norm.attach(vae)
    return vae


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def _weights_line(patcher, precision: str, dtype, compute: str) -> str:
    """The DiT's format and bytes as loaded, for the report."""
    import comfy.model_management as mm

    sd = patcher.model.diffusion_model.state_dict()
    size = _size(quantize.stored_bytes(sd))
    if precision not in quantize.FORMATS:
        return f"weights {_dtype_name(dtype)}, {size}; compute {compute}"
    n = len(quantize.layer_formats(sd))
    if precision == "fp8" and mm.supports_fp8_compute(patcher.load_device):
        run = "fp8 matmuls, " + ("feed_forward.w2 in bf16 (NEWBIE_FP8_W2=bf16)" if not quantized_ops.rowwise_w2()
                                 else "feed_forward.w2's bf16 input scaled per row"
                                 + (f" by the pack's SwiGLU kernel ({swiglu_fp8.switch_words()})"
                                    if swiglu_fp8.attached(patcher) else ""))
        run += (", accumulating in the tensor cores" if quantized_ops.fast_accumulation()
                else ", partial sums promoted to fp32 (NEWBIE_FP8_ACCUM=fp32)")
    elif precision == "int8" and not quantized_ops.int8_matmuls_dequantised(patcher.load_device):
        run = "int8 matmuls (activations quantized per row)"
    else:
        run = f"each layer dequantised to {compute} when it runs"
    return (f"weights {precision} ({quantize.DESCRIPTION[precision]}) in {n} Linear layers, the rest {compute}, "
            f"{size}; {run}")


def _text_encoders_line(clip, gemma_cfg: dict, jina_cfg: dict, te_precision: str | None, te_dtype) -> str:
    """Gemma's and Jina's sizes, formats and bytes as loaded, for the report."""
    te = clip.cond_stage_model
    gemma_sd, jina_sd = te.gemma.state_dict(), te.jina.state_dict()
    rest = _dtype_name(te_dtype)
    gemma = rest
    stored = quantize.precision_of(gemma_sd)  # te_precision's, or a quantized file's own
    if stored in quantize.FORMATS:
        gemma = (f"{stored} ({quantize.DESCRIPTION[stored]}) in {len(quantize.layer_formats(gemma_sd))} "
                 f"Linear layers (each dequantised when it runs), the rest {rest}")
    return (f"Gemma-3: {gemma_cfg['num_hidden_layers']} layers, width {gemma_cfg['hidden_size']}, {gemma}, "
            f"{_size(quantize.stored_bytes(gemma_sd))}; Jina CLIP v2: {jina_cfg['num_hidden_layers']} layers, width "
            f"{jina_cfg['hidden_size']}, {rest}, {_size(quantize.stored_bytes(jina_sd))}")


def on_dynamic_vram(compile: str, resident, device, fmt: str | None) -> bool:
    """Whether the DiT goes to ComfyUI's dynamic-VRAM patcher (where the host has one): only an eager DiT that does
    not stay resident and that the block streamer does not take (a quantized one, the switch off, a CPU, or ComfyUI's
    pinned memory off)."""
    streams_blocks = block_stream.available(device) and block_stream.enabled() and fmt is None
    return compile == "off" and not resident and not streams_blocks


def load_newbie(parts: NewBieParts, precision: str = "fp16", te_precision: str | None = "auto",
                progress=None, vram_budget_gb: float = 0.0, compile: str = "auto") -> LoadedNewBie:
    """progress: an object with update(n) (ComfyUI's ProgressBar), advanced once per built part (3 in all).
    vram_budget_gb: cap on the DiT's weights kept on the GPU; 0 leaves residency to ComfyUI.
    compile: "auto" (compile where it pays: CUDA with Triton), "off", or "blocks" for regional compilation of
    the DiT (pipeline/block_compile.py)."""
    import comfy.model_management as mm

    t0 = time.perf_counter()
    dit_cfg = detect.nextdit_config(parts.dit, parts.paths.get("dit"))
    detect.check_compatible(dit_cfg, detect.gemma_config(parts.gemma, parts.paths.get("gemma")),
                            detect.jina_config(parts.jina, parts.paths.get("jina")), parts.paths)
    step = progress.update if progress is not None else (lambda n: None)
    budget = vram_budget.budget_bytes(vram_budget_gb)
    device = mm.get_torch_device()
    weight_bytes = dit_weight_bytes(parts, precision)
    fmt = precision if precision in quantize.FORMATS else quantize.precision_of(parts.dit)
    traceable = quantized_ops_for(fmt, device) is not None
    room = dit_room(device, budget)
    compile, compile_why = block_compile.resolve(compile, device, weight_bytes, room, fmt is not None, traceable)
    # Weights that fit stay resident in ComfyUI's non-dynamic patcher, compiled or not: under dynamic VRAM every
    # Linear fetches its weight through comfy-aimdo on each call (eager bf16 sampled 4.9 it/s that way against
    # upstream --gpu-only's 5.9, run15; the fp8 DiT 3.9 it/s, run18). 16-bit weights that don't fit go to the same
    # patcher, which loads what fits, and the rest is streamed a block ahead (pipeline/block_stream.py: at 6 GiB 0.73x
    # and 0.93x upstream against 0.86x under dynamic VRAM, run63/run64). A quantized DiT that does not fit (its
    # layers are ComfyUI's quantized tensors, which the streamer leaves alone), the switch off, or a CPU: dynamic
    # VRAM streams it where the host has it, as before.
    resident = block_compile.weights_fit(weight_bytes, room)
    dynamic = on_dynamic_vram(compile, resident, device, fmt)
    model, unet_config, dtype, manual_cast = build_model(parts, precision, budget=budget, dynamic=dynamic)
    model.cached_patcher_init = (reload_dit_patcher, (dict(parts.paths), precision, budget,
                                                      precision_mod.state_of(model), dynamic))
    compiled = block_compile.apply(model) if compile == "blocks" else 0
    setattr(model.model, cfg_batch.SHARE_ATTR, streamed_share(weight_bytes, budget, activations=0) if budget
            else streamed_share(weight_bytes, room))
    step(1)
    clip, gemma_cfg, jina_cfg, te_dtype = build_clip(parts, te_precision)
    clip.patcher.cached_patcher_init = (reload_clip_patcher, (dict(parts.paths), te_precision))
    step(1)
    vae = build_vae(parts)
    step(1)
    n_params = sum(v.numel() for k, v in parts.dit.items() if not k.endswith(quantize.QUANT_KEY)) / 1e6
    if precision == "fp16":
        compute = "fp16 matmuls + fp32 activations (overflow-safe)"
    else:
        compute = _dtype_name(manual_cast) if manual_cast is not None else _dtype_name(dtype)
    report = "\n".join([
        f"DiT: {n_params:.1f}M params, dim {unet_config['dim']}, {unet_config['n_layers']} layers, "
        f"{unet_config['n_heads']}/{unet_config['n_kv_heads']} heads; " + _weights_line(model, precision, dtype, compute),
        _text_encoders_line(clip, gemma_cfg, jina_cfg, te_precision, te_dtype),
        (f"VRAM budget: at most {budget / vram_budget.GIB:.2f} GiB of DiT weights on the GPU, the rest streamed "
         f"per step ({_streaming(model)})" if budget else
         _resident_line(weight_bytes, room, dit_decode_eviction(device, budget, weight_bytes)) if resident else
         f"VRAM budget: none ({_streaming(model)})"),
        (f"compile: {compiled} transformer blocks compiled on their own at the first sampling run (one graph per "
         f"block kind; ComfyUI's non-dynamic model patcher; {compile_why})" if compiled
         else f"compile: off (eager; {compile_why})"),
        sdpa.describe(device, *kv_repeat.from_options(model.model_options.get("transformer_options"))),
        qkv_rope.describe(model),
        group_norm.describe(vae),
        *([guard_skip.describe()] if compiled else []),
        cuda_graphs.describe(model),
        "from: " + ", ".join(f"{k}={Path(str(v)).name}" for k, v in parts.paths.items()),
        f"loaded in {time.perf_counter() - t0:.1f} s",
    ])
    log.info("NewBie loaded:\n%s", report)
    return LoadedNewBie(model, clip, vae, report)
