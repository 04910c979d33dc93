"""Deterministic NewBie-format models with chosen dimensions: the pack's embedded demo model and the
test suite's fixtures, and (with `FULL`) full-size random weights for GPU memory and speed runs.

The files are written in the real formats so that tiny and full-size models go through the same loading
code: ComfyUI's single files (DiT, Gemma-3 with its `spiece_model`, Jina CLIP v2 with its `spiece_model`,
FLUX VAE) and the official repository's diffusers-style folder (see `write_folder_layout`).
Key names and shapes come from ComfyUI's own classes built on the meta device, so they are exactly what
ComfyUI loads. Values are random (seeded): fit for loading, memory and speed, not for pictures.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# A corpus for the on-the-spot sentencepiece tokenizers: NewBie-style XML and tag prompts.
_CORPUS = """<character_1><n>$character_1$</n><gender>1girl</gender><appearance>blue_hair, long_twintails, teal_eyes</appearance>
<clothing>white_shirt, black_skirt</clothing><expression>smile</expression><action>waving</action><position>center_left</position></character_1>
<general_tags><count>1girl</count><style>anime_style, digital_art</style><background>night_sky, city_lights</background>
<quality>high_quality, masterpiece, best_quality</quality><lighting>soft_lighting</lighting></general_tags>
<caption>A cheerful girl with blue twin tails waves at the viewer under a starry sky.</caption>
You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start>
You are an assistant designed to generate high-quality anime images with the highest degree of image-text alignment based on textual prompts.
You are an assistant designed to generate low-quality images based on textual prompts.
lowres, bad_anatomy, bad_hands, text, error, missing_fingers, extra_digit, worst_quality, low_quality, jpeg_artifacts, signature, watermark
1boy, 2girls, red_eyes, short_hair, school_uniform, standing, sitting, looking_at_viewer, outdoors, indoors, cherry_blossoms
"""


@dataclass(frozen=True)
class DiTSpec:
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    cap_feat_dim: int
    clip_text_dim: int
    axes_dims: tuple = (32, 32, 32)
    axes_lens: tuple = (1024, 512, 512)


@dataclass(frozen=True)
class GemmaSpec:
    # head_dim is fixed at 256 by ComfyUI's Gemma3_4B_Config (a class attribute, not a field).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tokenizer_vocab: int


@dataclass(frozen=True)
class JinaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    tokenizer_vocab: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dit: DiTSpec
    gemma: GemmaSpec
    jina: JinaSpec
    seed: int = 0
    dtype: str = "bfloat16"

    def fingerprint(self) -> str:
        """Changes whenever anything that shapes the written files changes (cache key)."""
        blob = json.dumps(asdict(self), sort_keys=True) + _CORPUS + str(_FORMAT_VERSION)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_FORMAT_VERSION = 2

TINY = ModelSpec(
    name="newbie-tiny",
    dit=DiTSpec(dim=96, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=384,
                cap_feat_dim=64, clip_text_dim=32, axes_dims=(16, 16, 16)),
    gemma=GemmaSpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, tokenizer_vocab=400),
    jina=JinaSpec(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, tokenizer_vocab=400),
)

# NewBie-image-Exp0.1's real dimensions (the official transformer/config.json); random values.
FULL = ModelSpec(
    name="newbie-full-random",
    dit=DiTSpec(dim=2304, n_layers=36, n_refiner_layers=2, n_heads=24, n_kv_heads=8, ffn_dim=9216,
                cap_feat_dim=2560, clip_text_dim=1024),
    gemma=GemmaSpec(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                    num_attention_heads=8, num_key_value_heads=4, tokenizer_vocab=400),
    jina=JinaSpec(vocab_size=250002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, tokenizer_vocab=400),
)

# (Gemma needs 3+ layers: ComfyUI takes hidden_states[-2] and asserts abs(layer_idx) < num_layers.)

# FLUX.1 VAE: ComfyUI has a single fixed architecture for it (ch 128, ch_mult 1-2-4-4, 16 latent channels),
# so the tiny set carries a full-size VAE (84M parameters).
_FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                      "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                      "dropout": 0.0}

SINGLE_FILE_NAMES = {
    "dit": "diffusion_models/{name}.safetensors",
    "gemma": "text_encoders/{name}-gemma3.safetensors",
    "jina": "text_encoders/{name}-jina-clip-v2.safetensors",
    "vae": "vae/{name}-flux-ae.safetensors",
}


def _comfy_cpu_safe():
    """Import-time guard: ComfyUI's model_management probes CUDA unless told to use the CPU."""
    if not torch.cuda.is_available():
        from comfy.cli_args import args
        args.cpu = True


def _meta_state_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple]]:
    _comfy_cpu_safe()
    import comfy.ops
    import comfy.ldm.lumina.model as lumina
    import comfy.text_encoders.jina_clip_2 as jina
    import comfy.text_encoders.llama as llama
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ops = comfy.ops.disable_weight_init
    d = spec.dit
    dit = lumina.NextDiT(patch_size=2, in_channels=16, dim=d.dim, n_layers=d.n_layers,
                         n_refiner_layers=d.n_refiner_layers, n_heads=d.n_heads, n_kv_heads=d.n_kv_heads,
                         multiple_of=1, ffn_dim_multiplier=d.ffn_dim / d.dim, qk_norm=True,
                         cap_feat_dim=d.cap_feat_dim, axes_dims=list(d.axes_dims), axes_lens=list(d.axes_lens),
                         rope_theta=10000.0, clip_text_dim=d.clip_text_dim, device="meta", operations=ops)
    g = spec.gemma
    gemma = llama.Gemma3_4B({k: v for k, v in asdict(g).items() if k != "tokenizer_vocab"}, None, "meta", ops)
    j = spec.jina
    jina_model = jina.XLMRobertaModel({k: v for k, v in asdict(j).items() if k != "tokenizer_vocab"}, None, "meta", ops)
    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": _FLUX_VAE_DDCONFIG},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": _FLUX_VAE_DDCONFIG})
    out = {}
    for part, module in (("dit", dit), ("gemma", gemma), ("jina", jina_model), ("vae", vae)):
        out[part] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if out["dit"]["layers.0.feed_forward.w1.weight"][0] != d.ffn_dim:
        raise ValueError(f"ffn_dim {d.ffn_dim} is not reachable from dim {d.dim}")
    return out


def _init_tensor(key: str, shape: tuple, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Scale-aware random values: norms ~1, biases ~0, weights ~N(0, 1/fan_in) so activations stay O(1)."""
    dev = gen.device
    if len(shape) == 1:
        if key.endswith("bias"):
            t = torch.randn(shape, generator=gen, device=dev) * 0.02
        elif "norm" in key or key.endswith(("emb_ln.weight", "norm1.weight", "norm2.weight")):
            t = 1.0 + torch.randn(shape, generator=gen, device=dev) * 0.02
        else:
            t = torch.randn(shape, generator=gen, device=dev) * 0.02
    else:
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=gen, device=dev) * (1.0 / math.sqrt(fan_in))
    return t.to(dtype).cpu()


def random_state_dict(shapes: dict[str, tuple], seed: int, dtype: torch.dtype,
                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded values; `device='cuda'` draws them on the GPU (much faster for full-size weights)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {k: _init_tensor(k, s, gen, dtype) for k, s in shapes.items()}


def random_dit(dtype: torch.dtype, spec: ModelSpec = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random DiT state dict of `spec`'s shapes, on the CPU (the tests' and CPU benches' tiny DiT)."""
    return random_state_dict(_meta_state_shapes(spec)["dit"], seed, dtype)


def train_tokenizer(vocab: int, pad_id: int, unk_id: int, bos_id: int, eos_id: int) -> bytes:
    """A small sentencepiece model trained on the spot (deterministic: one thread, fixed corpus)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=out, vocab_size=vocab,
        model_type="unigram", character_coverage=1.0, num_threads=1, pad_id=pad_id, unk_id=unk_id,
        bos_id=bos_id, eos_id=eos_id, hard_vocab_limit=False, minloglevel=2, shuffle_input_sentence=False,
        user_defined_symbols=["<", ">", "/", "_", "$"])
    return out.getvalue()


def _spiece_tensor(model_bytes: bytes) -> torch.Tensor:
    # ComfyUI keeps tokenizers inside the text encoder file as a uint8 tensor under `spiece_model`.
    return torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8).clone()


def build_state_dicts(spec: ModelSpec, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """The four parts in ComfyUI's key layout, tokenizers included."""
    dtype = getattr(torch, spec.dtype)
    shapes = _meta_state_shapes(spec)
    sds = {part: random_state_dict(shapes[part], spec.seed + i, dtype, device)
           for i, part in enumerate(("dit", "gemma", "jina", "vae"))}
    # Gemma-3 ids: pad 0, eos 1, bos 2, unk 3; XLM-RoBERTa (Jina) ids: bos 0, pad 1, eos 2, unk 3.
    sds["gemma"]["spiece_model"] = _spiece_tensor(train_tokenizer(spec.gemma.tokenizer_vocab, 0, 3, 2, 1))
    sds["jina"]["spiece_model"] = _spiece_tensor(train_tokenizer(spec.jina.tokenizer_vocab, 1, 3, 0, 2))
    return sds


def in_memory_parts(spec: ModelSpec = TINY):
    """The model's four parts in memory (no files), as the loader hands them to build_model."""
    from pipeline import loader

    sds = build_state_dicts(spec)
    gemma, jina = dict(sds["gemma"]), dict(sds["jina"])
    return loader.NewBieParts(sds["dit"], gemma, jina, sds["vae"], gemma.pop("spiece_model"),
                              jina.pop("spiece_model"), {"dit": spec.name})


def dit_patcher(dit: dict, precision: str, name: str = "tiny"):
    """(ModelPatcher, unet config) of a DiT state dict alone, built by the loader with ComfyUI's non-dynamic
    patcher, as the in-process tests build one (a quantized state dict from pipeline/quantize.py included)."""
    from pipeline import loader

    parts = loader.NewBieParts(dit, {}, {}, {}, None, None, {"dit": name})
    patcher, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    return patcher, cfg


def _save(sd: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def single_file_paths(root: Path, spec: ModelSpec = TINY) -> dict[str, Path]:
    """Where ComfyUI's single-file layout under `root` holds each part of `spec`'s model."""
    return {part: Path(root) / pattern.format(name=spec.name) for part, pattern in SINGLE_FILE_NAMES.items()}


def write_single_files(root: Path, spec: ModelSpec = TINY, sds: dict | None = None,
                       device: str = "cpu") -> dict[str, Path]:
    """Write ComfyUI's single-file layout under `root` (diffusion_models/, text_encoders/, vae/)."""
    root = Path(root)
    paths = single_file_paths(root, spec)
    stamp = root / f".{spec.name}.{spec.fingerprint()}.single"
    if stamp.exists() and all(p.exists() for p in paths.values()):
        return paths
    sds = sds or build_state_dicts(spec, device)
    for part, path in paths.items():
        _save(sds[part], path)
    stamp.write_text("ok")
    return paths


def vae_parts(root: Path, spec: ModelSpec = FULL, device: str = "cuda"):
    """The pack's NewBieParts holding only `spec`'s VAE, from its single file under `root` (the whole single-file
    layout written first where it is missing), as the VAE benches load it."""
    from pipeline import checkpoint, loader

    path = single_file_paths(root, spec)["vae"]
    if not path.exists():
        write_single_files(root, spec, device=device)
    return loader.NewBieParts({}, {}, {}, checkpoint.load_state_dict(path, "VAE"), None, None, {"vae": str(path)})


def write_folder_layout(root: Path, spec: ModelSpec = TINY, sds: dict | None = None) -> Path:
    """Write the official repository's diffusers-style folder under root/<name>/ and return it."""
    from pipeline import keymaps

    from . import vae_layout

    folder = Path(root) / spec.name
    stamp = Path(root) / f".{spec.name}.{spec.fingerprint()}.folder"
    if stamp.exists() and (folder / "model_index.json").exists():
        return folder
    sds = sds or build_state_dicts(spec)
    d, g, j = spec.dit, spec.gemma, spec.jina
    gemma_sd = dict(sds["gemma"])
    gemma_tok = gemma_sd.pop("spiece_model")
    jina_sd = dict(sds["jina"])
    jina_tok = jina_sd.pop("spiece_model")

    # Where each part lives and how it is named: the official converter (see pipeline/keymaps.py).
    _save(keymaps.dit_to_diffusers(sds["dit"]), folder / "transformer" / "diffusion_pytorch_model.safetensors")
    _write_json(folder / "transformer" / "config.json", _transformer_config(spec))
    _save(keymaps.gemma_to_transformers(gemma_sd), folder / "text_encoder" / "model.safetensors")
    _write_json(folder / "text_encoder" / "config.json", _gemma_config(spec))
    (folder / "text_encoder" / "tokenizer.model").write_bytes(gemma_tok.numpy().tobytes())
    _save(keymaps.jina_to_remote_code(jina_sd), folder / "clip_model" / "model.safetensors")
    _write_json(folder / "clip_model" / "config.json", _jina_config(spec))
    (folder / "clip_model" / "sentencepiece.bpe.model").write_bytes(jina_tok.numpy().tobytes())
    _save(vae_layout.to_diffusers(sds["vae"]), folder / "vae" / "diffusion_pytorch_model.safetensors")
    _write_json(folder / "vae" / "config.json", _VAE_CONFIG)
    _write_json(folder / "model_index.json", _MODEL_INDEX)
    stamp.write_text("ok")
    return folder


# Folder configs as the official converter writes them (NewbieLoraTrainer/convert_newbie_to_diffusers.py,
# 2025-12-07; field names from its model_index.json and transformer/config.json; see pipeline/keymaps.py).
_MODEL_INDEX = {"_class_name": "NewbiePipeline", "_diffusers_version": "0.30.0",
                "transformer": ["transformer", "NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP"],
                "text_encoder": ["text_encoder", "Gemma3ForConditionalGeneration"],
                "tokenizer": ["text_encoder", "AutoTokenizer"],
                "clip_model": ["clip_model", "JinaCLIPModel"],
                "clip_tokenizer": ["clip_model", "AutoTokenizer"],
                "vae": ["vae", "AutoencoderKL"]}
_VAE_CONFIG = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
               "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
               "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611,
               "shift_factor": 0.1159}


def _transformer_config(spec: ModelSpec) -> dict:
    d = spec.dit
    return {"_class_name": "NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP", "model_type": "nextdit_clip",
            "patch_size": 2, "dim": d.dim, "n_layers": d.n_layers, "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads,
            "in_channels": 16, "axes_dims": list(d.axes_dims), "axes_lens": list(d.axes_lens),
            "clip_text_dim": d.clip_text_dim, "clip_img_dim": d.clip_text_dim}


def _gemma_config(spec: ModelSpec) -> dict:
    g = spec.gemma
    return {"architectures": ["Gemma3Model"], "model_type": "gemma3",
            "text_config": {"model_type": "gemma3_text", "vocab_size": g.vocab_size, "hidden_size": g.hidden_size,
                            "intermediate_size": g.intermediate_size, "num_hidden_layers": g.num_hidden_layers,
                            "num_attention_heads": g.num_attention_heads,
                            "num_key_value_heads": g.num_key_value_heads, "head_dim": 256}}


def _jina_config(spec: ModelSpec) -> dict:
    j = spec.jina
    return {"architectures": ["JinaCLIPModel"], "model_type": "jina_clip", "add_projections": False,
            "text_config": {"default_lora_task": "retrieval.query", "embed_dim": j.hidden_size,
                            "hf_model_config_kwargs": {"vocab_size": j.vocab_size, "hidden_size": j.hidden_size,
                                                       "intermediate_size": j.intermediate_size,
                                                       "num_hidden_layers": j.num_hidden_layers,
                                                       "num_attention_heads": j.num_attention_heads,
                                                       "lora_adaptations": ["retrieval.query"], "lora_alpha": 4,
                                                       "lora_rank": 4}}}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_all(root: Path, spec: ModelSpec = TINY) -> dict:
    """Both layouts from one set of weights (so they must give identical results)."""
    sds = None
    root = Path(root)
    if not (root / f".{spec.name}.{spec.fingerprint()}.single").exists() or \
            not (root / f".{spec.name}.{spec.fingerprint()}.folder").exists():
        sds = build_state_dicts(spec)
    return {"single": write_single_files(root, spec, sds), "folder": write_folder_layout(root / "diffusers", spec, sds)}
