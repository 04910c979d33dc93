"""State-dict key maps between NewBie's folder layout and ComfyUI's module names.

Three parts, each with a reader (folder layout -> ComfyUI) and a writer (ComfyUI ->
folder layout) built from the same name table, so every reader(writer(sd)) round trip is exact; the test factory
uses the writers to build tiny folders:

  DiT       dit_from_diffusers / dit_to_diffusers
  Gemma-3   gemma_from_transformers / gemma_to_transformers
  Jina v2   jina_from_remote_code / jina_to_remote_code

The VAE needs no map here: ComfyUI's VAE reads the diffusers layout itself (comfy.diffusers_convert); the test
factory writes that layout with ComfyUI's own map (devkit/vae_layout.py).

ComfyUI-side names are those of ComfyUI v0.33.0:
  DiT     comfy/ldm/lumina/model.py            NextDiT (as detected by comfy/model_detection.py, "Lumina 2"
                                               branch, dim 2304 + clip_text_pooled_proj.0.weight => NewBie)
  Gemma   comfy/text_encoders/llama.py         Gemma3_4B ("model." + Llama2_ module), loaded via
                                               comfy/text_encoders/newbie.py -> lumina2.Gemma3_4BModel
  Jina    comfy/text_encoders/jina_clip_2.py   XLMRobertaModel ("model." + XLMRobertaModel_)

Only pure tensor ops (cat/split/matmul) are used; nothing here imports ComfyUI.
"""

from __future__ import annotations

import torch

__all__ = [
    "DIT_LAYOUT_NEWBIE",
    "DIT_LAYOUT_LUMINA2",
    "detect_dit_layout",
    "dit_from_diffusers",
    "dit_to_diffusers",
    "GEMMA_PREFIX_MULTIMODAL",
    "GEMMA_PREFIX_CAUSAL_LM",
    "gemma_from_transformers",
    "gemma_to_transformers",
    "JINA_TEXT_PREFIX",
    "jina_lora_settings",
    "jina_from_remote_code",
    "jina_to_remote_code",
]


# ======================================================================================
# DiT
# ======================================================================================
#
# Two folder layouts exist for transformer/diffusion_pytorch_model.safetensors:
#
# 1. DIT_LAYOUT_NEWBIE - the official NewBie folder (NewBie-AI/NewBie-image-Exp0.1).
#    Written by NewBieAI-Lab/NewbieLoraTrainer convert_newbie_to_diffusers.py
#    (commit 928477487212b0eb0ba83bb83e7f049695d84702, 2025-12-07), which does
#    `save_file(model.state_dict(), "transformer/diffusion_pytorch_model.safetensors")` on
#    NextDiT_CLIP from NewBieAI-Lab/NewBie-image-Exp0.1 models/model.py
#    (commit 709e9a482fb2b861ad6aa50dcafb0198cad66c1d). Those are the original Lumina-Image-2.0
#    NextDiT names, i.e. ComfyUI's names, plus `norm_final.weight` (an RMSNorm that NextDiT
#    defines but never uses; ComfyUI comments it out in comfy/ldm/lumina/model.py).
#    Comfy-Org/ComfyUI PR #11415 loads that very file
#    (.../NewBie-image-Exp0.1/blob/main/transformer/diffusion_pytorch_model.safetensors)
#    straight into ComfyUI. huggingface/diffusers PR #12789 (E-Anlia, the NewBie team's
#    NewbiePipeline) wraps the same module as `self.inner_model`, so an `inner_model.` prefix
#    is stripped too.
#
# 2. DIT_LAYOUT_LUMINA2 - diffusers' Lumina2Transformer2DModel, extended for NewBie by
#    huggingface/diffusers PR #12803 (Disty0, head e061f982c6c1e162309f9df919662e6fa61e60ea,
#    2026-01-21; used by the Disty0/NewBie-image-Exp0.1-Diffusers folder):
#      src/diffusers/models/transformers/transformer_lumina2.py  (module names)
#      src/diffusers/loaders/single_file_utils.py convert_lumina2_to_diffusers (name map,
#      incl. the PR's "clip_text_pooled_proj" -> "time_caption_embed.clip_text_pooled_proj"
#      and "time_text_embed" -> "time_caption_embed.time_text_embed")
#    diffusers splits the fused qkv into to_q / to_k / to_v (rows: q = dim, k = v = kv_heads*head_dim).
#
# ComfyUI does NOT convert layout 2 itself: comfy/model_detection.py convert_diffusers_mmdit only
# knows the Z-Image diffusers layout (comfy/utils.py z_image_to_diffusers), not Lumina2/NewBie.

DIT_LAYOUT_NEWBIE = "newbie"
DIT_LAYOUT_LUMINA2 = "lumina2_diffusers"

# Unused RMSNorm present in NewBie/Lumina-Image-2.0 checkpoints (dropped on read).
_DIT_UNUSED_KEYS = ("norm_final.weight",)

# Wrapper prefixes stripped on read in the NewBie layout.
_DIT_STRIP_PREFIXES = ("model.diffusion_model.", "inner_model.")

# Top-level tensors: (ComfyUI name, diffusers Lumina2 name).
_DIT_GLOBAL_RENAMES = (
    ("x_embedder.weight", "x_embedder.weight"),
    ("x_embedder.bias", "x_embedder.bias"),
    ("t_embedder.mlp.0.weight", "time_caption_embed.timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "time_caption_embed.timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "time_caption_embed.timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "time_caption_embed.timestep_embedder.linear_2.bias"),
    ("cap_embedder.0.weight", "time_caption_embed.caption_embedder.0.weight"),
    ("cap_embedder.1.weight", "time_caption_embed.caption_embedder.1.weight"),
    ("cap_embedder.1.bias", "time_caption_embed.caption_embedder.1.bias"),
    # NewBie's pooled Jina-CLIP path (diffusers PR #12803)
    ("clip_text_pooled_proj.0.weight", "time_caption_embed.clip_text_pooled_proj.0.weight"),
    ("clip_text_pooled_proj.1.weight", "time_caption_embed.clip_text_pooled_proj.1.weight"),
    ("clip_text_pooled_proj.1.bias", "time_caption_embed.clip_text_pooled_proj.1.bias"),
    ("time_text_embed.1.weight", "time_caption_embed.time_text_embed.1.weight"),
    ("time_text_embed.1.bias", "time_caption_embed.time_text_embed.1.bias"),
    # FinalLayer -> LuminaLayerNormContinuous
    ("final_layer.adaLN_modulation.1.weight", "norm_out.linear_1.weight"),
    ("final_layer.adaLN_modulation.1.bias", "norm_out.linear_1.bias"),
    ("final_layer.linear.weight", "norm_out.linear_2.weight"),
    ("final_layer.linear.bias", "norm_out.linear_2.bias"),
    # Z-Image-style pad tokens: not in NewBie/Lumina2, passed through if present.
    ("x_pad_token", "x_pad_token"),
    ("cap_pad_token", "cap_pad_token"),
)

# Per-block tensors (relative to "<group>.<i>."): (ComfyUI, diffusers Lumina2TransformerBlock).
_DIT_BLOCK_RENAMES = (
    ("attention.out.weight", "attn.to_out.0.weight"),
    ("attention.q_norm.weight", "attn.norm_q.weight"),
    ("attention.k_norm.weight", "attn.norm_k.weight"),
    ("feed_forward.w1.weight", "feed_forward.linear_1.weight"),
    ("feed_forward.w2.weight", "feed_forward.linear_2.weight"),
    ("feed_forward.w3.weight", "feed_forward.linear_3.weight"),
    ("attention_norm2.weight", "norm2.weight"),
    ("ffn_norm1.weight", "ffn_norm1.weight"),
    ("ffn_norm2.weight", "ffn_norm2.weight"),
)
# Blocks with adaLN (layers.*, noise_refiner.*): norm1 is LuminaRMSNormZero(linear, norm).
_DIT_BLOCK_RENAMES_MODULATED = (
    ("attention_norm1.weight", "norm1.norm.weight"),
    ("adaLN_modulation.1.weight", "norm1.linear.weight"),
    ("adaLN_modulation.1.bias", "norm1.linear.bias"),
)
# Blocks without adaLN (context_refiner.*): norm1 is a plain RMSNorm.
_DIT_BLOCK_RENAMES_PLAIN = (("attention_norm1.weight", "norm1.weight"),)

_DIT_BLOCK_GROUPS = {"layers": True, "noise_refiner": True, "context_refiner": False}  # group -> modulated

_DIT_QKV = "attention.qkv.weight"
_DIT_QKV_SPLIT = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")


def _dit_block_table(modulated: bool):
    return _DIT_BLOCK_RENAMES + (_DIT_BLOCK_RENAMES_MODULATED if modulated else _DIT_BLOCK_RENAMES_PLAIN)


def _split_block_key(key: str):
    """'layers.3.attention.out.weight' -> ('layers', '3', 'attention.out.weight'), else None."""
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] in _DIT_BLOCK_GROUPS and parts[1].isdigit():
        return parts[0], parts[1], parts[2]
    return None


def detect_dit_layout(sd: dict) -> str:
    """DIT_LAYOUT_LUMINA2 if the keys are diffusers' Lumina2 names, else DIT_LAYOUT_NEWBIE."""
    for key in sd:
        if key.startswith(("time_caption_embed.", "norm_out.")) or ".attn.to_q." in key:
            return DIT_LAYOUT_LUMINA2
    return DIT_LAYOUT_NEWBIE


def _dit_from_lumina2(sd: dict, strict: bool) -> dict:
    global_map = {d: c for c, d in _DIT_GLOBAL_RENAMES}
    out, qkv_parts, unknown = {}, {}, []
    for key, value in sd.items():
        if key in global_map:
            out[global_map[key]] = value
            continue
        split = _split_block_key(key)
        if split is None:
            unknown.append(key)
            continue
        group, index, rest = split
        prefix = f"{group}.{index}."
        if rest in _DIT_QKV_SPLIT:
            qkv_parts.setdefault(prefix, {})[rest] = value
            continue
        table = {d: c for c, d in _dit_block_table(_DIT_BLOCK_GROUPS[group])}
        if rest in table:
            out[prefix + table[rest]] = value
        else:
            unknown.append(key)
    for prefix, parts in qkv_parts.items():
        missing = [p for p in _DIT_QKV_SPLIT if p not in parts]
        if missing:
            raise ValueError(f"DiT: {prefix}attn is missing {missing}")
        out[prefix + _DIT_QKV] = torch.cat([parts[p] for p in _DIT_QKV_SPLIT], dim=0)
    if unknown and strict:
        raise ValueError(f"DiT (diffusers Lumina2 layout): unrecognised keys {sorted(unknown)[:8]}")
    return out


def _dit_from_newbie(sd: dict, strict: bool) -> dict:
    known_globals = {c for c, _ in _DIT_GLOBAL_RENAMES}
    out, unknown = {}, []
    for key, value in sd.items():
        for prefix in _DIT_STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key in _DIT_UNUSED_KEYS:
            continue
        split = _split_block_key(key)
        if key in known_globals:
            out[key] = value
        elif split is not None and (
            split[2] == _DIT_QKV or split[2] in {c for c, _ in _dit_block_table(_DIT_BLOCK_GROUPS[split[0]])}
        ):
            out[key] = value
        else:
            unknown.append(key)
    if unknown and strict:
        raise ValueError(f"DiT (NewBie layout): unrecognised keys {sorted(unknown)[:8]}")
    return out


def dit_from_diffusers(sd: dict, layout: str | None = None, strict: bool = True) -> dict:
    """transformer/diffusion_pytorch_model.safetensors keys -> ComfyUI NextDiT keys.

    `layout` None auto-detects (see detect_dit_layout). NewBie layout: identity apart from
    dropping `norm_final.weight` and wrapper prefixes. Lumina2 layout: renames plus
    to_q/to_k/to_v concatenated (dim 0, q-k-v order) into attention.qkv.weight.
    strict: raise on keys that belong to neither table.
    """
    layout = layout or detect_dit_layout(sd)
    if layout == DIT_LAYOUT_LUMINA2:
        return _dit_from_lumina2(sd, strict)
    if layout == DIT_LAYOUT_NEWBIE:
        return _dit_from_newbie(sd, strict)
    raise ValueError(f"unknown DiT layout {layout!r}")


def dit_to_diffusers(sd: dict, layout: str = DIT_LAYOUT_NEWBIE) -> dict:
    """ComfyUI NextDiT keys -> folder keys; the exact inverse of dit_from_diffusers.

    DIT_LAYOUT_NEWBIE (default; what the official NewBie folder holds): same names, plus the
    unused `norm_final.weight` (ones, like NextDiT's RMSNorm init) so the file looks like the
    official one. DIT_LAYOUT_LUMINA2: diffusers names, qkv split into q (dim rows, where
    dim = in_features) and k, v (equal halves of the rest).
    """
    if layout == DIT_LAYOUT_NEWBIE:
        out = dict(sd)
        ref = sd["x_embedder.weight"]
        out["norm_final.weight"] = torch.ones(ref.shape[0], dtype=ref.dtype, device=ref.device)
        return out
    if layout != DIT_LAYOUT_LUMINA2:
        raise ValueError(f"unknown DiT layout {layout!r}")
    global_map = dict(_DIT_GLOBAL_RENAMES)
    out, unknown = {}, []
    for key, value in sd.items():
        if key in global_map:
            out[global_map[key]] = value
            continue
        split = _split_block_key(key)
        if split is None:
            unknown.append(key)
            continue
        group, index, rest = split
        prefix = f"{group}.{index}."
        if rest == _DIT_QKV:
            dim = value.shape[1]
            kv = (value.shape[0] - dim) // 2
            if dim + 2 * kv != value.shape[0]:
                raise ValueError(f"DiT: {key} has shape {tuple(value.shape)}, cannot split into q/k/v")
            for name, part in zip(_DIT_QKV_SPLIT, torch.split(value, [dim, kv, kv], dim=0)):
                out[prefix + name] = part.clone()  # own storage: safetensors refuses shared tensors
            continue
        table = dict(_dit_block_table(_DIT_BLOCK_GROUPS[group]))
        if rest in table:
            out[prefix + table[rest]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"DiT: no diffusers name for {sorted(unknown)[:8]}")
    return out


# ======================================================================================
# Gemma-3-4B-it (text_encoder/)
# ======================================================================================
#
# ComfyUI: comfy/text_encoders/llama.py Gemma3_4B -> self.model = Llama2_(...) with
# embed_tokens / layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.{gate,up,down}_proj,
# input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm}
# / norm; i.e. exactly Hugging Face transformers' Gemma3 text-model names under "model.".
# No value changes: ComfyUI's RMSNorm(add=True) applies (1 + w) like transformers' Gemma3RMSNorm,
# and ComfyUI's ScaledEmbedding multiplies by sqrt(hidden) like Gemma3TextScaledWordEmbedding
# (whose embed_scale is not a saved tensor). ComfyUI's Gemma3_4B has no lm_head (tied in HF).
#
# Folder: NewbieLoraTrainer convert_newbie_to_diffusers.py saves
# `AutoModel.from_pretrained("google/gemma-3-4b-it")` (a Gemma3Model) with save_pretrained, and
# model_index.json labels it "Gemma3ForConditionalGeneration". transformers' save_pretrained writes
# the original checkpoint names for both Gemma3Model and Gemma3ForConditionalGeneration
# (modeling_utils.save_pretrained -> revert_weight_conversion / _checkpoint_conversion_mapping):
#   language_model.model.{embed_tokens,layers.N...,norm}   text tower   <- kept
#   vision_tower.*  multi_modal_projector.*                  SigLIP + projector  <- dropped
# (checked by saving tiny models with transformers 5.24.0; 4.52+ does the same reverse mapping).
# Other layouts accepted on read: "model.language_model." (transformers >= 4.52 runtime names of
# Gemma3ForConditionalGeneration), "language_model." (Gemma3Model runtime names), "model."
# (Gemma3ForCausalLM / text-only checkpoints = ComfyUI's own names), bare "layers." etc.

GEMMA_PREFIX_MULTIMODAL = "language_model.model."  # Gemma3Model / Gemma3ForConditionalGeneration files
GEMMA_PREFIX_CAUSAL_LM = "model."  # Gemma3ForCausalLM files

# (folder prefix, ComfyUI prefix), tried in order (longest first).
_GEMMA_READ_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.", "model."),
    ("model.", "model."),
    ("", "model."),  # bare Gemma3TextModel: embed_tokens.*, layers.*, norm.*
)
# Non-text parts of the multimodal checkpoint (and the tied LM head).
_GEMMA_DROP_PREFIXES = (
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
    "lm_head.",
    "language_model.lm_head.",
)
_GEMMA_TEXT_ROOTS = ("embed_tokens.", "layers.", "norm.")


def gemma_from_transformers(sd: dict, strict: bool = True) -> dict:
    """Gemma-3 checkpoint keys (any transformers layout above) -> ComfyUI Gemma3_4B keys."""
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith(_GEMMA_DROP_PREFIXES):
            continue
        for src, dst in _GEMMA_READ_PREFIXES:
            if key.startswith(src) and key[len(src):].startswith(_GEMMA_TEXT_ROOTS):
                out[dst + key[len(src):]] = value
                break
        else:
            unknown.append(key)
    if unknown and strict:
        raise ValueError(f"Gemma: unrecognised keys {sorted(unknown)[:8]}")
    return out


def gemma_to_transformers(sd: dict, prefix: str = GEMMA_PREFIX_MULTIMODAL) -> dict:
    """ComfyUI Gemma3_4B keys ("model.X") -> "<prefix>X" (default: the multimodal file layout)."""
    out = {}
    for key, value in sd.items():
        if not key.startswith("model."):
            raise ValueError(f"Gemma: {key!r} is not a ComfyUI Gemma3_4B key")
        out[prefix + key[len("model."):]] = value
    return out


# ======================================================================================
# Jina CLIP v2 text tower (clip_model/)
# ======================================================================================
#
# Folder: convert_newbie_to_diffusers.py saves AutoModel.from_pretrained("jinaai/jina-clip-v2",
# trust_remote_code=True) with save_pretrained. Module path of the text tower, from the remote code:
#   jinaai/jina-clip-implementation modeling_clip.py  JinaCLIPModel.text_model = HFTextEncoder
#   jinaai/jina-clip-implementation hf_model.py       HFTextEncoder.transformer = XLMRobertaLoRA(...)
#                                                     (config is XLMRobertaFlashConfig); .pooler and
#                                                     .proj (Identity for jina-clip-v2) hold no tensors
#   jinaai/xlm-roberta-flash-implementation modeling_lora.py  XLMRobertaLoRA.roberta = XLMRobertaModel,
#     and torch.nn.utils.parametrize puts a LoRAParametrization on every nn.Linear / nn.Embedding:
#       <m>.parametrizations.weight.original   the base weight
#       <m>.parametrizations.weight.0.lora_A   linear: [n_tasks, rank, in]   embedding: [n_tasks, num, rank]
#       <m>.parametrizations.weight.0.lora_B   linear: [n_tasks, out, rank]  embedding: [n_tasks, rank, dim]
#     lora_forward(W, t) = W + (B[t] @ A[t]) * alpha / rank     (embedding: A[t] @ B[t])
#   jinaai/xlm-roberta-flash-implementation modeling_xlm_roberta.py / embedding.py / mha.py / mlp.py:
#     roberta.{embeddings.{word,token_type}_embeddings, emb_ln, encoder.layers.N.{mixer.Wqkv,
#     mixer.out_proj, norm1, mlp.fc1, mlp.fc2, norm2}}; with an adapter_mask every LoRA'd layer runs
#     with lora_forward (task_id).
# (Source copies read: the xlm-roberta-flash-implementation files vendored in aoncevay/jina-wrapper
#  commit d3188e683a022fbe4ccfcc76af55125331e61032; modeling_clip.py / hf_model.py copies found in the
#  public code index. The key list was confirmed by instantiating XLMRobertaLoRA from those files.)
#
# HFTextEncoder.forward uses the default LoRA task (text_config.default_lora_task, "retrieval.query"
# for jina-clip-v2) when no adapter_mask is given, which is how NewBie's get_text_features calls it.
# ComfyUI's XLMRobertaModel has no LoRA, so the reader merges the default task's adapter into the
# base weights. ComfyUI: comfy/text_encoders/jina_clip_2.py, keys "model." + XLMRobertaModel_ names,
# which are the Jina names one-for-one (Wqkv rows stay q|k|v, heads-major, as in mha.py).

JINA_TEXT_PREFIX = "text_model.transformer.roberta."
_JINA_READ_PREFIXES = (JINA_TEXT_PREFIX, "text_model.transformer.", "roberta.")
_JINA_LORA_MODULE_SUFFIXES = (  # modules XLMRobertaLoRA parametrizes (every Linear/Embedding present)
    "embeddings.word_embeddings",
    "embeddings.token_type_embeddings",
    "mixer.Wqkv",
    "mixer.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_JINA_EMBEDDING_SUFFIXES = ("embeddings.word_embeddings", "embeddings.token_type_embeddings")
_PARAM_ORIGINAL = ".parametrizations.weight.original"
_PARAM_LORA_A = ".parametrizations.weight.0.lora_A"
_PARAM_LORA_B = ".parametrizations.weight.0.lora_B"
# Tensors of the full JinaCLIPModel that ComfyUI's text-only model does not have.
_JINA_DROP_PREFIXES = ("vision_model.", "visual_projection.", "logit_scale")
# Would change the pooled output if present (jina-clip-v2 has none: add_projections false,
# proj_type null); ComfyUI cannot apply them, so reading refuses.
_JINA_REFUSE_PREFIXES = ("text_projection.", "text_model.proj.")


def jina_lora_settings(config: dict) -> dict:
    """(task_index, alpha) for merging, from clip_model/config.json (JinaCLIPConfig as a dict).

    Reads text_config.default_lora_task and text_config.hf_model_config_kwargs.{lora_adaptations,
    lora_alpha} (fields of jina-clip-implementation configuration_clip.py / xlm-roberta-flash
    configuration_xlm_roberta.py). task_index is None when no default task is set (the tower then
    runs without LoRA, so nothing is merged).
    """
    text = config.get("text_config", config)
    kwargs = text.get("hf_model_config_kwargs") or {}
    task = text.get("default_lora_task")
    if task is None:
        return {"task_index": None, "alpha": None}
    adaptations = kwargs.get("lora_adaptations")
    if adaptations is None or "lora_alpha" not in kwargs:
        raise ValueError("Jina config names a default LoRA task but not lora_adaptations/lora_alpha")
    return {"task_index": list(adaptations).index(task), "alpha": float(kwargs["lora_alpha"])}


def _lora_delta(module: str, base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, task: int):
    a, b = lora_a[task].float(), lora_b[task].float()
    if module.endswith(_JINA_EMBEDDING_SUFFIXES):
        delta, rank = a @ b, a.shape[1]
    else:
        delta, rank = b @ a, a.shape[0]
    if delta.shape != base.shape:
        raise ValueError(f"Jina: LoRA of {module} gives {tuple(delta.shape)}, weight is {tuple(base.shape)}")
    return delta, rank


def jina_from_remote_code(
    sd: dict,
    config: dict | None = None,
    *,
    lora_task_index: int | None = None,
    lora_alpha: float | None = None,
    strict: bool = True,
) -> dict:
    """Jina CLIP v2 checkpoint (full JinaCLIPModel or its text tower) -> ComfyUI JinaClip2 keys.

    The vision tower, logit_scale and projections are dropped. LoRA-parametrized weights become
    plain `.weight`s with the default task's adapter merged (W + B@A * alpha/rank, fp32 math, cast
    back to W's dtype). The task index and alpha come from `config` (clip_model/config.json) or
    the keyword arguments; if LoRA tensors are present and neither gives alpha, this raises rather
    than guess.
    """
    merge = True
    if config is not None:
        settings = jina_lora_settings(config)
        lora_task_index = settings["task_index"] if lora_task_index is None else lora_task_index
        lora_alpha = settings["alpha"] if lora_alpha is None else lora_alpha
        merge = lora_task_index is not None  # no default task: the tower runs without LoRA
    plain, lora, unknown = {}, {}, []
    for key, value in sd.items():
        if key.startswith(_JINA_REFUSE_PREFIXES):
            raise ValueError(f"Jina: {key} (a text projection) has no counterpart in ComfyUI's JinaClip2")
        if key.startswith(_JINA_DROP_PREFIXES):
            continue
        for prefix in _JINA_READ_PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                break
        else:
            unknown.append(key)
            continue
        if rest.endswith("rotary_emb.inv_freq"):  # non-persistent buffer in the remote code
            continue
        for suffix, slot in ((_PARAM_ORIGINAL, "W"), (_PARAM_LORA_A, "A"), (_PARAM_LORA_B, "B")):
            if rest.endswith(suffix):
                lora.setdefault(rest[: -len(suffix)], {})[slot] = value
                break
        else:
            plain["model." + rest] = value
    for module, parts in lora.items():
        if "W" not in parts:
            raise ValueError(f"Jina: {module} has LoRA tensors but no parametrizations.weight.original")
        weight = parts["W"]
        if merge and ("A" in parts or "B" in parts):
            if "A" not in parts or "B" not in parts:
                raise ValueError(f"Jina: {module} has only one of lora_A / lora_B")
            task = lora_task_index
            if task is None:
                if parts["A"].shape[0] != 1:
                    raise ValueError("Jina: several LoRA tasks stored; pass config or lora_task_index")
                task = 0
            if lora_alpha is None:
                raise ValueError("Jina: LoRA adapters present; pass clip_model config.json or lora_alpha")
            delta, rank = _lora_delta(module, weight, parts["A"], parts["B"], task)
            weight = (weight.float() + delta * (float(lora_alpha) / rank)).to(weight.dtype)
        plain["model." + module + ".weight"] = weight
    if unknown and strict:
        raise ValueError(f"Jina: unrecognised keys {sorted(unknown)[:8]}")
    return plain


def jina_to_remote_code(sd: dict, with_lora: bool = True, lora_rank: int = 4, lora_tasks: int = 1) -> dict:
    """ComfyUI JinaClip2 keys -> JinaCLIPModel text-tower keys (no vision tower).

    with_lora: write the parametrized layout of the real checkpoint, with all-zero lora_A/lora_B
    (a zero adapter, so merging on read returns the weights unchanged). Otherwise plain `.weight`s.
    """
    out = {}
    for key, value in sd.items():
        if not key.startswith("model."):
            raise ValueError(f"Jina: {key!r} is not a ComfyUI JinaClip2 key")
        rest = key[len("model."):]
        module = rest[: -len(".weight")] if rest.endswith(".weight") else None
        if with_lora and module is not None and module.endswith(_JINA_LORA_MODULE_SUFFIXES):
            rows, cols = value.shape
            if module.endswith(_JINA_EMBEDDING_SUFFIXES):
                a_shape, b_shape = (lora_tasks, rows, lora_rank), (lora_tasks, lora_rank, cols)
            else:
                a_shape, b_shape = (lora_tasks, lora_rank, cols), (lora_tasks, rows, lora_rank)
            out[JINA_TEXT_PREFIX + module + _PARAM_ORIGINAL] = value
            out[JINA_TEXT_PREFIX + module + _PARAM_LORA_A] = torch.zeros(a_shape, dtype=value.dtype)
            out[JINA_TEXT_PREFIX + module + _PARAM_LORA_B] = torch.zeros(b_shape, dtype=value.dtype)
        else:
            out[JINA_TEXT_PREFIX + rest] = value
    return out
