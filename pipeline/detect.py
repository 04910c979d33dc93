"""Model dimensions read from tensor shapes, so any size of NewBie (full, tiny, future variants) builds
ComfyUI's own classes with the right configuration. Pure logic: works on anything with `.shape`.

Upstream ComfyUI recognises NewBie only when dim == 2304 (comfy/model_detection.py, Lumina 2 branch);
here every dimension is derived, and the full-size model gets exactly upstream's configuration.
"""
from __future__ import annotations

import re

from .errors import ModelFileError


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _need(sd, key, path, expected):
    if key not in sd:
        raise ModelFileError(path, f"tensor '{key}' is missing", expected)
    return tuple(sd[key].shape)


def nextdit_config(sd: dict, path="DiT") -> dict:
    """unet_config for comfy.ldm.lumina.model.NextDiT from a NewBie DiT state dict (ComfyUI key names)."""
    what = "a NewBie Next-DiT state dict"
    dim, cap_feat_dim = _need(sd, "cap_embedder.1.weight", path, what)
    qkv_rows = _need(sd, "layers.0.attention.qkv.weight", path, what)[0]
    head_dim = _need(sd, "layers.0.attention.q_norm.weight", path, what)[0]
    ffn_dim = _need(sd, "layers.0.feed_forward.w1.weight", path, what)[0]
    patch_in = _need(sd, "x_embedder.weight", path, what)[1]
    if "clip_text_pooled_proj.0.weight" not in sd:
        raise ModelFileError(path, "this is a Lumina-2-family DiT without NewBie's clip_text_pooled_proj "
                                   "(plain Lumina 2 or Z-Image?)", what)
    clip_text_dim = sd["clip_text_pooled_proj.0.weight"].shape[0]
    if dim % head_dim:
        raise ModelFileError(path, f"dim {dim} is not a multiple of head dim {head_dim}", what)
    n_heads = dim // head_dim
    n_kv_heads = (qkv_rows // head_dim - n_heads) // 2
    if head_dim % 3 or (head_dim // 3) % 2:
        raise ModelFileError(path, f"head dim {head_dim} cannot be split into three even RoPE axes", what)
    axis = head_dim // 3
    in_channels = patch_in // 4
    keys = sd.keys()
    config = {
        "image_model": "lumina2",
        "patch_size": 2,
        "in_channels": in_channels,
        "dim": dim,
        "cap_feat_dim": cap_feat_dim,
        "n_layers": _count(keys, r"layers\.(\d+)\."),
        "n_refiner_layers": _count(keys, r"noise_refiner\.(\d+)\."),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "qk_norm": True,
        "axes_dims": [axis, axis, axis],
        # NewBie's own config says [1024, 512, 512]; upstream uses [300, 512, 512]. RoPE tables are built
        # from them but only positions actually used matter, and both exceed 1024x1536 images' needs.
        "axes_lens": [300, 512, 512],
        "rope_theta": 10000.0,
        "clip_text_dim": clip_text_dim,
    }
    # FeedForward: hidden = multiple_of * ceil(int(mult * dim) / multiple_of) (comfy/ldm/lumina/model.py).
    if ffn_dim == 4 * dim and dim % 256 == 0:
        config.update(ffn_dim_multiplier=4.0, multiple_of=256)  # upstream's values for the real model
    elif ffn_dim % dim == 0:
        config.update(ffn_dim_multiplier=float(ffn_dim // dim), multiple_of=1)
    elif ffn_dim >= dim:
        config.update(ffn_dim_multiplier=None, multiple_of=ffn_dim)
    else:
        raise ModelFileError(path, f"FFN width {ffn_dim} is below the model width {dim}", what)
    return config


GEMMA_HEAD_DIM = 256  # fixed by ComfyUI's Gemma3_4B_Config (class attribute, not configurable)


def gemma_config(sd: dict, path="Gemma") -> dict:
    """config_dict for comfy.text_encoders.llama.Gemma3_4B from a Gemma-3 state dict (ComfyUI names)."""
    what = "a Gemma-3 text encoder (model.layers.N.self_attn...)"
    vocab, hidden = _need(sd, "model.embed_tokens.weight", path, what)
    head_dim = _need(sd, "model.layers.0.self_attn.q_norm.weight", path, what)[0]
    if head_dim != GEMMA_HEAD_DIM:
        raise ModelFileError(path, f"Gemma head dim is {head_dim}", f"Gemma-3 with head dim {GEMMA_HEAD_DIM}")
    q_rows = _need(sd, "model.layers.0.self_attn.q_proj.weight", path, what)[0]
    k_rows = _need(sd, "model.layers.0.self_attn.k_proj.weight", path, what)[0]
    inter = _need(sd, "model.layers.0.mlp.gate_proj.weight", path, what)[0]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": _count(sd.keys(), r"model\.layers\.(\d+)\."),
        "num_attention_heads": q_rows // head_dim,
        "num_key_value_heads": k_rows // head_dim,
    }


def jina_config(sd: dict, path="Jina") -> dict:
    """config_dict for comfy.text_encoders.jina_clip_2.XLMRobertaModel from a Jina CLIP v2 text state dict."""
    what = "a Jina CLIP v2 text encoder (model.encoder.layers.N.mixer...)"
    vocab, hidden = _need(sd, "model.embeddings.word_embeddings.weight", path, what)
    inter = _need(sd, "model.encoder.layers.0.mlp.fc1.weight", path, what)[0]
    # XLM-RoBERTa heads are 64 wide in Jina (1024 / 16); tiny models keep 16-wide heads.
    head_dim = 64 if hidden % 64 == 0 else 16
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": _count(sd.keys(), r"model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": hidden // head_dim,
    }


def check_compatible(dit: dict, gemma: dict, jina: dict, paths: dict) -> None:
    """The three parts must fit together: Gemma width = DiT caption width, Jina width = pooled width."""
    if gemma["hidden_size"] != dit["cap_feat_dim"]:
        raise ModelFileError(paths["gemma"], f"Gemma width {gemma['hidden_size']} does not match the DiT's "
                                             f"caption input {dit['cap_feat_dim']}",
                             "the Gemma-3 encoder this DiT was trained with")
    if jina["hidden_size"] != dit["clip_text_dim"]:
        raise ModelFileError(paths["jina"], f"Jina width {jina['hidden_size']} does not match the DiT's "
                                            f"pooled-text input {dit['clip_text_dim']}",
                             "the Jina CLIP v2 encoder this DiT was trained with")
