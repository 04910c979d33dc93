"""fp8 and int8 Gemma-3 (pipeline/te_quantize.py) through ComfyUI's quantized text-encoder mechanism, on the CPU:
which layers are quantized, that only Gemma runs ComfyUI's mixed-precision operations, and the error of the
conditioning NewBie uses (Gemma's hidden_states[-2]) against the 32-bit encoder, beating a plain fp8 cast."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from devkit import quant_errors, tiny_models
from host_features import quantization_or_skip

_clip = quant_errors.clip
_cond = quant_errors.conditioning
_errors = quant_errors.gemma_errors


def test_decoder_projections_are_quantized_embeddings_and_norms_are_not(tiny_parts):
    from pipeline import quantize, te_quantize

    layers = te_quantize.gemma_layers(tiny_parts.gemma)
    kinds = {name.split(".", 3)[-1] for name in layers}
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(layers) == 7 * tiny_models.TINY.gemma.num_hidden_layers
    q = te_quantize.quantized_gemma(tiny_parts.gemma, "fp8")
    assert set(quantize.layer_formats(q)) == set(layers)
    kept = [k for k, v in q.items() if k.endswith(".weight") and v.dtype != torch.float8_e4m3fn]
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert all(v.dtype == tiny_parts.gemma[k].dtype for k, v in q.items() if k in kept)


def test_only_gemma_runs_comfys_mixed_precision_operations(tiny_parts):
    from comfy.quant_ops import QuantizedTensor

    quantization_or_skip("int8", "text_encoder_precision")
    te = _clip(tiny_parts, "int8").cond_stage_model
    assert te.gemma.operations._quant_config is not None
    assert getattr(te.jina.operations, "_quant_config", None) is None, "Jina stays 16-bit"
    q_proj = te.gemma.transformer.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.weight, QuantizedTensor) and q_proj.quant_format == "int8_tensorwise"
    assert not isinstance(te.gemma.transformer.model.embed_tokens.weight, QuantizedTensor)


def test_tiny_gemma_conditioning_error_beats_a_plain_fp8_cast(tiny_parts):
    quantization_or_skip("int8", "text_encoder_precision")
    err = _errors(tiny_parts)
    # measured: fp8 0.122, int8 0.032, plain fp8 cast 0.155 (pipeline/te_quantize.py)
    assert err["fp8"] < 0.14 and err["int8"] < 0.04, err
    assert err["fp8"] < 0.85 * err["plain fp8"] and err["int8"] < 0.3 * err["plain fp8"], err


def test_full_width_gemma_conditioning_error_beats_a_plain_fp8_cast(tiny_parts):
    """Gemma-3-4B's real width (2560, 8/4 heads, MLP 10240) with 3 decoder layers (the fewest that have a
    hidden_states[-2] ComfyUI accepts) and a tiny vocabulary."""
    quantization_or_skip("int8", "text_encoder_precision")
    g = dataclasses.replace(tiny_models.FULL.gemma, vocab_size=tiny_models.TINY.gemma.vocab_size,
                            num_hidden_layers=3, tokenizer_vocab=tiny_models.TINY.gemma.tokenizer_vocab)
    spec = dataclasses.replace(tiny_models.TINY, gemma=g)
    gemma = tiny_models.random_state_dict(tiny_models._meta_state_shapes(spec)["gemma"], 1, torch.bfloat16)
    err = _errors(dataclasses.replace(tiny_parts, gemma=gemma))
    # measured: fp8 0.136, int8 0.048, plain fp8 cast 0.259 (pipeline/te_quantize.py)
    assert err["fp8"] < 0.16 and err["int8"] < 0.06, err
    assert err["fp8"] < 0.6 * err["plain fp8"] and err["int8"] < 0.25 * err["plain fp8"], err


def test_host_without_quantized_text_encoders_names_the_option_and_the_fix(tiny_parts, monkeypatch):
    """Both supported hosts read model_options["quantization_metadata"]; one that did not must say so before
    anything is quantized (the probe itself is asked of the real host on both lanes by tests/host/test_quantized.py)."""
    from pipeline import compat

    monkeypatch.setattr(compat, "_text_encoder_takes_quantization_metadata", lambda: False)
    with pytest.raises(compat.QuantizationUnavailable, match="text_encoder_precision 'fp8' needs .*Update ComfyUI"):
        _clip(tiny_parts, "fp8")


def _write_text_encoder(path, sd: dict, tokenizer, metadata=None):
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in sd.items() if not k.endswith(".comfy_quant")}
    save_file({**tensors, "spiece_model": tokenizer}, str(path), metadata=metadata)
    return path


def test_a_quantized_gemma_file_loads_as_it_is(tiny_parts, tmp_path):
    """A Gemma file already quantized (ComfyUI's _quantization_metadata, as the pack would write it, or the older
    scaled_fp8 layout ComfyUI's reader converts) is used as it is under 'auto': the conditioning equals quantizing
    the 16-bit file at load, bit for bit."""
    from pipeline import loader, quantize, te_quantize

    q = te_quantize.quantized_gemma(tiny_parts.gemma, "fp8")
    at_load = _cond(_clip(tiny_parts, "fp8"))
    new_style = _write_text_encoder(tmp_path / "gemma-fp8.safetensors", q, tiny_parts.gemma_tokenizer,
                                    quantize.file_metadata(q))
    old = {k.replace(".weight_scale", ".scale_weight"): v for k, v in q.items() if not k.endswith(".comfy_quant")}
    old_style = _write_text_encoder(tmp_path / "gemma-scaled-fp8.safetensors",
                                    {**old, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)},
                                    tiny_parts.gemma_tokenizer)
    for path in (new_style, old_style):
        sd, _ = loader.read_single_part("gemma", path)
        assert quantize.precision_of(sd) == "fp8", path.name
        parts = dataclasses.replace(tiny_parts, gemma=sd, paths={**tiny_parts.paths, "gemma": str(path)})
        assert torch.equal(_cond(_clip(parts, "auto")), at_load), path.name
        assert torch.equal(_cond(_clip(parts, "fp8")), at_load), path.name


def test_quantized_text_encoder_files_that_cannot_be_used_fail_naming_them(tiny_parts, tmp_path):
    from pipeline import loader, quantize, te_quantize
    from pipeline.errors import ModelFileError

    q = te_quantize.quantized_gemma(tiny_parts.gemma, "fp8")
    path = _write_text_encoder(tmp_path / "gemma-fp8.safetensors", q, tiny_parts.gemma_tokenizer,
                               quantize.file_metadata(q))
    sd, _ = loader.read_single_part("gemma", path)
    parts = dataclasses.replace(tiny_parts, gemma=sd, paths={**tiny_parts.paths, "gemma": str(path)})
    with pytest.raises(ModelFileError, match="gemma-fp8.safetensors.*already quantized"):
        _clip(parts, "int8")
    jina_q = quantize.quantize_state_dict(tiny_parts.jina, "fp8", ["model.encoder.layers.0.mixer.Wqkv"])
    jina_path = _write_text_encoder(tmp_path / "jina-fp8.safetensors", jina_q, tiny_parts.jina_tokenizer,
                                    quantize.file_metadata(jina_q))
    with pytest.raises(ModelFileError, match="jina-fp8.safetensors.*quantized"):
        loader.read_single_part("jina", jina_path)
