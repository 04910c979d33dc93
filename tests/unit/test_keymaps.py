"""Key maps between NewBie's folder layout and ComfyUI names (pipeline/keymaps.py).

The ComfyUI-layout state dicts are generated here from the module structure (no ComfyUI
import). Their key sets were checked once against ComfyUI v0.33.0 classes instantiated on
the meta device with the same small sizes: NextDiT 68 keys, Gemma3_4B 28, JinaClip2
XLMRobertaModel 28, AutoencodingEngine (FLUX VAE layout) 244.
"""

import pytest
import torch

from pipeline import keymaps as km

_GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=_GEN)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# ComfyUI-layout builders
# ---------------------------------------------------------------------------------------------

DIM, N_LAYERS, N_REFINER, HEADS, KV_HEADS = 64, 2, 1, 4, 2
HEAD_DIM = DIM // HEADS
CAP_DIM, CLIP_DIM, IN_CH, PATCH = 40, 24, 16, 2
FFN = 4 * DIM
T_DIM = min(DIM, 1024)


def comfy_dit():
    """NextDiT(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2, qk_norm=True,
    cap_feat_dim=40, clip_text_dim=24, in_channels=16, patch_size=2, multiple_of=16, ffn x4)."""
    sd = {}

    def block(prefix, modulated):
        sd[prefix + "attention.qkv.weight"] = _rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, DIM)
        sd[prefix + "attention.out.weight"] = _rand(DIM, HEADS * HEAD_DIM)
        sd[prefix + "attention.q_norm.weight"] = _rand(HEAD_DIM)
        sd[prefix + "attention.k_norm.weight"] = _rand(HEAD_DIM)
        sd[prefix + "feed_forward.w1.weight"] = _rand(FFN, DIM)
        sd[prefix + "feed_forward.w2.weight"] = _rand(DIM, FFN)
        sd[prefix + "feed_forward.w3.weight"] = _rand(FFN, DIM)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            sd[prefix + norm + ".weight"] = _rand(DIM)
        if modulated:
            sd[prefix + "adaLN_modulation.1.weight"] = _rand(4 * DIM, T_DIM)
            sd[prefix + "adaLN_modulation.1.bias"] = _rand(4 * DIM)

    sd["x_embedder.weight"] = _rand(DIM, PATCH * PATCH * IN_CH)
    sd["x_embedder.bias"] = _rand(DIM)
    for i in range(N_REFINER):
        block(f"noise_refiner.{i}.", True)
        block(f"context_refiner.{i}.", False)
    sd["t_embedder.mlp.0.weight"] = _rand(T_DIM, 256)
    sd["t_embedder.mlp.0.bias"] = _rand(T_DIM)
    sd["t_embedder.mlp.2.weight"] = _rand(T_DIM, T_DIM)
    sd["t_embedder.mlp.2.bias"] = _rand(T_DIM)
    sd["cap_embedder.0.weight"] = _rand(CAP_DIM)
    sd["cap_embedder.1.weight"] = _rand(DIM, CAP_DIM)
    sd["cap_embedder.1.bias"] = _rand(DIM)
    sd["clip_text_pooled_proj.0.weight"] = _rand(CLIP_DIM)
    sd["clip_text_pooled_proj.1.weight"] = _rand(CLIP_DIM, CLIP_DIM)
    sd["clip_text_pooled_proj.1.bias"] = _rand(CLIP_DIM)
    sd["time_text_embed.1.weight"] = _rand(T_DIM, T_DIM + CLIP_DIM)
    sd["time_text_embed.1.bias"] = _rand(T_DIM)
    for i in range(N_LAYERS):
        block(f"layers.{i}.", True)
    sd["final_layer.linear.weight"] = _rand(PATCH * PATCH * IN_CH, DIM)
    sd["final_layer.linear.bias"] = _rand(PATCH * PATCH * IN_CH)
    sd["final_layer.adaLN_modulation.1.weight"] = _rand(DIM, T_DIM)
    sd["final_layer.adaLN_modulation.1.bias"] = _rand(DIM)
    return sd


def comfy_gemma(hidden=32, layers=2, heads=2, kv=1, head_dim=16, inter=48, vocab=50):
    """Gemma3_4B ("model." + Llama2_ with Gemma-2/3 blocks)."""
    sd = {"model.embed_tokens.weight": _rand(vocab, hidden), "model.norm.weight": _rand(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _rand(heads * head_dim, hidden)
        sd[p + "self_attn.k_proj.weight"] = _rand(kv * head_dim, hidden)
        sd[p + "self_attn.v_proj.weight"] = _rand(kv * head_dim, hidden)
        sd[p + "self_attn.o_proj.weight"] = _rand(hidden, heads * head_dim)
        sd[p + "self_attn.q_norm.weight"] = _rand(head_dim)
        sd[p + "self_attn.k_norm.weight"] = _rand(head_dim)
        sd[p + "mlp.gate_proj.weight"] = _rand(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = _rand(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = _rand(hidden, inter)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            sd[p + norm + ".weight"] = _rand(hidden)
    return sd


def comfy_jina(hidden=32, layers=2, inter=64, vocab=50, type_vocab=1):
    """JinaClip2 XLMRobertaModel ("model." + XLMRobertaModel_)."""
    sd = {
        "model.embeddings.word_embeddings.weight": _rand(vocab, hidden),
        "model.embeddings.token_type_embeddings.weight": _rand(type_vocab, hidden),
        "model.emb_ln.weight": _rand(hidden),
        "model.emb_ln.bias": _rand(hidden),
    }
    for i in range(layers):
        p = f"model.encoder.layers.{i}."
        sd[p + "mixer.Wqkv.weight"] = _rand(3 * hidden, hidden)
        sd[p + "mixer.Wqkv.bias"] = _rand(3 * hidden)
        sd[p + "mixer.out_proj.weight"] = _rand(hidden, hidden)
        sd[p + "mixer.out_proj.bias"] = _rand(hidden)
        sd[p + "mlp.fc1.weight"] = _rand(inter, hidden)
        sd[p + "mlp.fc1.bias"] = _rand(inter)
        sd[p + "mlp.fc2.weight"] = _rand(hidden, inter)
        sd[p + "mlp.fc2.bias"] = _rand(hidden)
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = _rand(hidden)
            sd[p + norm + ".bias"] = _rand(hidden)
    return sd


def comfy_vae(ch=32, ch_mult=(1, 2, 4, 4), res_blocks=2, z=16):
    """AutoencodingEngine Encoder/Decoder (comfy/ldm/modules/diffusionmodules/model.py), FLUX layout."""
    sd = {}
    levels = len(ch_mult)

    def conv(name, cout, cin, k=3):
        sd[name + ".weight"] = _rand(cout, cin, k, k)
        sd[name + ".bias"] = _rand(cout)

    def norm(name, c):
        sd[name + ".weight"] = _rand(c)
        sd[name + ".bias"] = _rand(c)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(side, c):
        resnet(side + ".mid.block_1", c, c)
        norm(side + ".mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(side + ".mid.attn_1." + proj, c, c, 1)
        resnet(side + ".mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", 2 * z, cin)

    c = ch * ch_mult[-1]
    conv("decoder.conv_in", c, z)
    mid("decoder", c)
    for i in reversed(range(levels)):
        for j in range(res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", 3, c)
    return sd


def test_builders_match_comfyui_key_counts():
    assert len(comfy_dit()) == 68
    assert len(comfy_gemma()) == 28
    assert len(comfy_jina()) == 28
    assert len(comfy_vae()) == 244


# ---------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------


def test_dit_newbie_layout_round_trip():
    sd = comfy_dit()
    folder = km.dit_to_diffusers(sd)  # default: the official NewBie folder layout
    assert folder.keys() - sd.keys() == {"norm_final.weight"}
    assert torch.equal(folder["norm_final.weight"], torch.ones(DIM))
    assert km.detect_dit_layout(folder) == km.DIT_LAYOUT_NEWBIE
    assert _same(km.dit_from_diffusers(folder), sd)


@pytest.mark.parametrize("prefix", ["inner_model.", "model.diffusion_model."])
def test_dit_newbie_layout_strips_wrapper_prefix(prefix):
    sd = comfy_dit()
    wrapped = {prefix + k: v for k, v in km.dit_to_diffusers(sd).items()}
    assert _same(km.dit_from_diffusers(wrapped), sd)


def test_dit_lumina2_layout_round_trip_and_names():
    sd = comfy_dit()
    d = km.dit_to_diffusers(sd, km.DIT_LAYOUT_LUMINA2)
    assert len(d) == 76  # = diffusers Lumina2Transformer2DModel(pooled_projection_dim=24) at these sizes
    assert km.detect_dit_layout(d) == km.DIT_LAYOUT_LUMINA2
    assert _same(km.dit_from_diffusers(d), sd)

    qkv = sd["layers.0.attention.qkv.weight"]
    kv_rows = KV_HEADS * HEAD_DIM
    assert torch.equal(d["layers.0.attn.to_q.weight"], qkv[:DIM])
    assert torch.equal(d["layers.0.attn.to_k.weight"], qkv[DIM:DIM + kv_rows])
    assert torch.equal(d["layers.0.attn.to_v.weight"], qkv[DIM + kv_rows:])
    assert d["layers.0.attn.to_k.weight"].shape == (kv_rows, DIM)

    expected = {
        "x_embedder.weight": "x_embedder.weight",
        "t_embedder.mlp.0.weight": "time_caption_embed.timestep_embedder.linear_1.weight",
        "t_embedder.mlp.2.bias": "time_caption_embed.timestep_embedder.linear_2.bias",
        "cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight",
        "cap_embedder.1.bias": "time_caption_embed.caption_embedder.1.bias",
        "clip_text_pooled_proj.0.weight": "time_caption_embed.clip_text_pooled_proj.0.weight",
        "clip_text_pooled_proj.1.weight": "time_caption_embed.clip_text_pooled_proj.1.weight",
        "time_text_embed.1.weight": "time_caption_embed.time_text_embed.1.weight",
        "final_layer.adaLN_modulation.1.weight": "norm_out.linear_1.weight",
        "final_layer.linear.bias": "norm_out.linear_2.bias",
        "layers.1.attention.out.weight": "layers.1.attn.to_out.0.weight",
        "layers.1.attention.q_norm.weight": "layers.1.attn.norm_q.weight",
        "layers.1.attention.k_norm.weight": "layers.1.attn.norm_k.weight",
        "layers.1.feed_forward.w1.weight": "layers.1.feed_forward.linear_1.weight",
        "layers.1.feed_forward.w2.weight": "layers.1.feed_forward.linear_2.weight",
        "layers.1.feed_forward.w3.weight": "layers.1.feed_forward.linear_3.weight",
        "layers.1.attention_norm1.weight": "layers.1.norm1.norm.weight",
        "layers.1.adaLN_modulation.1.weight": "layers.1.norm1.linear.weight",
        "layers.1.adaLN_modulation.1.bias": "layers.1.norm1.linear.bias",
        "layers.1.attention_norm2.weight": "layers.1.norm2.weight",
        "layers.1.ffn_norm1.weight": "layers.1.ffn_norm1.weight",
        "layers.1.ffn_norm2.weight": "layers.1.ffn_norm2.weight",
        "noise_refiner.0.attention_norm1.weight": "noise_refiner.0.norm1.norm.weight",
        "noise_refiner.0.adaLN_modulation.1.weight": "noise_refiner.0.norm1.linear.weight",
        "context_refiner.0.attention_norm1.weight": "context_refiner.0.norm1.weight",
        "context_refiner.0.attention_norm2.weight": "context_refiner.0.norm2.weight",
    }
    for comfy, diff in expected.items():
        assert torch.equal(d[diff], sd[comfy]), (comfy, diff)
    assert not any("adaLN" in k or "norm1.linear" in k for k in d if k.startswith("context_refiner."))


def test_dit_split_tensors_own_their_storage():
    d = km.dit_to_diffusers(comfy_dit(), km.DIT_LAYOUT_LUMINA2)
    q, k = d["layers.0.attn.to_q.weight"], d["layers.0.attn.to_k.weight"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()


def test_dit_rejects_unknown_keys():
    sd = km.dit_to_diffusers(comfy_dit())
    sd["layers.0.attention.mystery.weight"] = _rand(2)
    with pytest.raises(ValueError):
        km.dit_from_diffusers(sd)
    assert "layers.0.attention.mystery.weight" not in km.dit_from_diffusers(sd, strict=False)


# ---------------------------------------------------------------------------------------------
# Gemma-3
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", [km.GEMMA_PREFIX_MULTIMODAL, km.GEMMA_PREFIX_CAUSAL_LM, "model.language_model.", "language_model."]
)
def test_gemma_round_trip(prefix):
    sd = comfy_gemma()
    folder = km.gemma_to_transformers(sd, prefix)
    assert _same(km.gemma_from_transformers(folder), sd)


def test_gemma_default_is_multimodal_checkpoint_layout():
    sd = comfy_gemma()
    folder = km.gemma_to_transformers(sd)
    assert torch.equal(folder["language_model.model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(folder["language_model.model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(folder["language_model.model.norm.weight"], sd["model.norm.weight"])


def test_gemma_drops_vision_projector_and_lm_head():
    sd = comfy_gemma()
    folder = km.gemma_to_transformers(sd)
    folder["vision_tower.vision_model.embeddings.patch_embedding.weight"] = _rand(4, 3, 2, 2)
    folder["vision_tower.encoder.layers.0.mlp.fc1.weight"] = _rand(4, 4)
    folder["multi_modal_projector.mm_input_projection_weight"] = _rand(4, 32)
    folder["multi_modal_projector.mm_soft_emb_norm.weight"] = _rand(4)
    folder["lm_head.weight"] = _rand(50, 32)
    assert _same(km.gemma_from_transformers(folder), sd)
    runtime = {("model.language_model." + k[len("model."):]): v for k, v in sd.items()}
    runtime["model.vision_tower.vision_model.post_layernorm.weight"] = _rand(4)
    runtime["model.multi_modal_projector.mm_soft_emb_norm.weight"] = _rand(4)
    assert _same(km.gemma_from_transformers(runtime), sd)


def test_gemma_rejects_unknown_keys():
    folder = km.gemma_to_transformers(comfy_gemma())
    folder["something.else.weight"] = _rand(2)
    with pytest.raises(ValueError):
        km.gemma_from_transformers(folder)


# ---------------------------------------------------------------------------------------------
# Jina CLIP v2
# ---------------------------------------------------------------------------------------------

P = km.JINA_TEXT_PREFIX


@pytest.mark.parametrize("with_lora", [True, False])
def test_jina_round_trip(with_lora):
    sd = comfy_jina()
    folder = km.jina_to_remote_code(sd, with_lora=with_lora)
    assert _same(km.jina_from_remote_code(folder, lora_alpha=4.0), sd)


def test_jina_names():
    sd = comfy_jina()
    folder = km.jina_to_remote_code(sd)
    orig = ".parametrizations.weight.original"
    assert torch.equal(folder[P + "encoder.layers.0.mixer.Wqkv" + orig], sd["model.encoder.layers.0.mixer.Wqkv.weight"])
    assert torch.equal(folder[P + "encoder.layers.0.mixer.Wqkv.bias"], sd["model.encoder.layers.0.mixer.Wqkv.bias"])
    assert torch.equal(folder[P + "encoder.layers.1.mlp.fc2" + orig], sd["model.encoder.layers.1.mlp.fc2.weight"])
    assert torch.equal(folder[P + "embeddings.word_embeddings" + orig], sd["model.embeddings.word_embeddings.weight"])
    assert torch.equal(folder[P + "emb_ln.weight"], sd["model.emb_ln.weight"])
    assert torch.equal(folder[P + "encoder.layers.1.norm2.bias"], sd["model.encoder.layers.1.norm2.bias"])
    # LoRA tensor shapes of the remote code (modeling_lora.py LoRAParametrization)
    assert folder[P + "encoder.layers.0.mlp.fc1.parametrizations.weight.0.lora_A"].shape == (1, 4, 32)
    assert folder[P + "encoder.layers.0.mlp.fc1.parametrizations.weight.0.lora_B"].shape == (1, 64, 4)
    assert folder[P + "embeddings.word_embeddings.parametrizations.weight.0.lora_A"].shape == (1, 50, 4)
    assert folder[P + "embeddings.word_embeddings.parametrizations.weight.0.lora_B"].shape == (1, 4, 32)
    plain = km.jina_to_remote_code(sd, with_lora=False)
    assert torch.equal(plain[P + "encoder.layers.0.mixer.out_proj.weight"], sd["model.encoder.layers.0.mixer.out_proj.weight"])


def _jina_with_adapters(tasks=2, rank=4):
    sd = comfy_jina()
    folder = km.jina_to_remote_code(sd, lora_rank=rank, lora_tasks=tasks)
    for key in list(folder):
        if key.endswith(("lora_A", "lora_B")):
            folder[key] = _rand(*folder[key].shape)
    return sd, folder


def test_jina_merges_the_default_task_adapter():
    sd, folder = _jina_with_adapters(tasks=2, rank=4)
    config = {
        "text_config": {
            "default_lora_task": "retrieval.query",
            "hf_model_config_kwargs": {"lora_adaptations": ["classification", "retrieval.query"], "lora_alpha": 2},
        }
    }
    out = km.jina_from_remote_code(folder, config)
    scale = 2 / 4
    mod = P + "encoder.layers.1.mixer.Wqkv.parametrizations.weight."
    want = sd["model.encoder.layers.1.mixer.Wqkv.weight"] + folder[mod + "0.lora_B"][1] @ folder[mod + "0.lora_A"][1] * scale
    assert torch.allclose(out["model.encoder.layers.1.mixer.Wqkv.weight"], want, atol=1e-5)
    emb = P + "embeddings.token_type_embeddings.parametrizations.weight."
    want = sd["model.embeddings.token_type_embeddings.weight"] + folder[emb + "0.lora_A"][1] @ folder[emb + "0.lora_B"][1] * scale
    assert torch.allclose(out["model.embeddings.token_type_embeddings.weight"], want, atol=1e-5)
    assert torch.equal(out["model.encoder.layers.1.mixer.Wqkv.bias"], sd["model.encoder.layers.1.mixer.Wqkv.bias"])
    # explicit arguments give the same result
    same = km.jina_from_remote_code(folder, lora_task_index=1, lora_alpha=2)
    assert _same(out, same)


def test_jina_no_default_task_means_no_merge():
    sd, folder = _jina_with_adapters()
    out = km.jina_from_remote_code(folder, {"text_config": {"default_lora_task": None}})
    assert _same(out, sd)


def test_jina_refuses_to_guess_lora_alpha():
    _, folder = _jina_with_adapters(tasks=1)
    with pytest.raises(ValueError):
        km.jina_from_remote_code(folder)


def test_jina_drops_vision_tower_and_refuses_projection():
    sd = comfy_jina()
    folder = km.jina_to_remote_code(sd)
    folder["vision_model.blocks.0.attn.qkv.weight"] = _rand(6, 2)
    folder["vision_model.patch_embed.proj.weight"] = _rand(2, 3, 2, 2)
    folder["logit_scale"] = torch.tensor(2.6592)
    assert _same(km.jina_from_remote_code(folder, lora_alpha=4.0), sd)
    folder["text_projection.weight"] = _rand(32, 32)
    with pytest.raises(ValueError):
        km.jina_from_remote_code(folder, lora_alpha=4.0)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


@pytest.mark.host
def test_vae_fixture_layout_is_the_official_one_and_comfyui_reads_it(comfy_import_path):
    """devkit/vae_layout.py writes the diffusers names of the official folder, from ComfyUI's own map; ComfyUI's
    converter gives the input back exactly (the writer checks that too)."""
    from comfy import diffusers_convert

    from devkit import vae_layout

    sd = comfy_vae()
    d = vae_layout.to_diffusers(sd)
    assert len(d) == len(sd)
    assert _same(diffusers_convert.convert_vae_state_dict(dict(d)), sd)
    expected = {
        "encoder.conv_in.weight": "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.bias": "encoder.down_blocks.0.resnets.1.conv2.bias",
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down.2.downsample.conv.weight": "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "encoder.mid.block_1.norm1.weight": "encoder.mid_block.resnets.0.norm1.weight",
        "encoder.mid.block_2.conv2.weight": "encoder.mid_block.resnets.1.conv2.weight",
        "encoder.mid.attn_1.norm.bias": "encoder.mid_block.attentions.0.group_norm.bias",
        "encoder.mid.attn_1.q.bias": "encoder.mid_block.attentions.0.to_q.bias",
        "encoder.norm_out.weight": "encoder.conv_norm_out.weight",
        "encoder.conv_out.weight": "encoder.conv_out.weight",
        "decoder.up.3.block.0.conv1.weight": "decoder.up_blocks.0.resnets.0.conv1.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up.0.block.2.norm2.weight": "decoder.up_blocks.3.resnets.2.norm2.weight",
        "decoder.up.0.block.0.nin_shortcut.bias": "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
        "decoder.up.1.upsample.conv.bias": "decoder.up_blocks.2.upsamplers.0.conv.bias",
        "decoder.norm_out.bias": "decoder.conv_norm_out.bias",
    }
    for comfy, diff in expected.items():
        assert torch.equal(d[diff], sd[comfy]), (comfy, diff)
    for side in ("encoder", "decoder"):
        for comfy, diff in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            w = sd[f"{side}.mid.attn_1.{comfy}.weight"]
            assert w.dim() == 4
            assert torch.equal(d[f"{side}.mid_block.attentions.0.{diff}.weight"], w[:, :, 0, 0])
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in d)  # FLUX has neither


@pytest.mark.host
def test_vae_fixture_refuses_what_comfyui_map_cannot_name(comfy_import_path):
    """A fifth level is beyond ComfyUI's map (it names four): the writer says so instead of writing ComfyUI keys."""
    from devkit import vae_layout

    sd = comfy_vae()
    sd["encoder.down.4.block.0.conv1.weight"] = _rand(2, 2, 3, 3)
    with pytest.raises(ValueError, match="encoder.down.4.block.0.conv1.weight"):
        vae_layout.to_diffusers(sd)
