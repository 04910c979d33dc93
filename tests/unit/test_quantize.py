"""fp8 and int8 DiT weights (pipeline/quantize.py) through ComfyUI's own quantized format and mixed-precision
operations, on the CPU: round-trip bounds, the error of one DiT call against fp32 (beating upstream's plain fp8
cast), quantized files that reload bit-identically and damaged ones that fail naming the file, LoRAs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from devkit import quant_errors, stress, tiny_models
from devkit.dit_calls import dit_call
from host_features import quantization_or_skip
from pipeline.errors import ModelFileError


def _parts(sd, path="tiny"):
    from pipeline import loader

    return loader.NewBieParts(sd, {}, {}, {}, None, None, {"dit": str(path)})


_build = quant_errors.build_dit


@pytest.fixture(scope="module")
def tiny_dit(comfy_import_path):
    return tiny_models.random_dit(torch.bfloat16)


# --- round trip of single weights ------------------------------------------------------------------------------

def test_fp8_round_trip_is_per_tensor_amax_over_448(tiny_dit):
    from pipeline import quantize

    w = tiny_dit["layers.0.feed_forward.w1.weight"]
    q, scale = quantize.quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.numel() == 1
    assert torch.allclose(scale, w.float().abs().max() / 448)
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself; the subnormals (below
    # 2^-6 * scale) by at most half their spacing 2^-9 * scale.
    err = (back - w.float()).abs()
    assert bool((err <= w.float().abs() / 16 + scale * 2 ** -10).all())
    assert stress.relative_error(back, w.float()) < 0.03


def test_int8_round_trip_is_per_output_channel(tiny_dit):
    from pipeline import quantize

    quantization_or_skip("int8")

    w = tiny_dit["layers.0.feed_forward.w2.weight"].float()
    q, scale = quantize.quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0], 1)
    assert torch.allclose(scale.flatten(), w.abs().amax(dim=1) / 127)
    back = q.float() * scale
    assert bool(((back - w).abs() <= scale / 2 * (1 + 1e-5)).all())
    assert stress.relative_error(back, w) < 0.01


def test_layers_kept_16_bit(tiny_dit):
    from pipeline import quantize

    layers = quantize.layers_to_quantize(tiny_dit)
    kinds = {name.split(".", 2)[-1] for name in layers}
    assert kinds == {"attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    assert not [n for n in layers if n.startswith(("x_embedder", "t_embedder", "cap_embedder", "final_layer",
                                                    "clip_text_pooled_proj", "time_text_embed"))]
    q = quantize.quantize_state_dict(tiny_dit, "fp8")
    assert q["layers.0.adaLN_modulation.1.weight"].dtype == torch.bfloat16
    assert quantize.precision_of(q) == "fp8" and quantize.precision_of(tiny_dit) is None
    assert quantize.stored_bytes(q) < 0.65 * quantize.stored_bytes(tiny_dit)


def test_fp8_w2_multiplies_in_the_compute_dtype(tiny_dit):
    """feed_forward.w2's input (the SwiGLU product) has no bound an fp8 input of scale 1 could take: its layers
    carry ComfyUI's full_precision_matrix_mult, which the loaded model honours; int8's per-row activation scales
    follow the input's range."""
    from pipeline import quantize

    quantization_or_skip("int8")

    confs = quantize.layer_formats(quantize.quantize_state_dict(tiny_dit, "fp8"))
    flagged = sorted(k for k, c in confs.items() if c.get("full_precision_matrix_mult"))
    assert flagged and all(k.endswith(".feed_forward.w2") for k in flagged)
    assert len(flagged) == len([k for k in confs if k.endswith(".feed_forward.w2")])
    assert not any(c.get("full_precision_matrix_mult")
                   for c in quantize.layer_formats(quantize.quantize_state_dict(tiny_dit, "int8")).values())
    patcher, _ = _build(quantize.quantize_state_dict(tiny_dit, "fp8"), "fp8")
    ffn = patcher.model.diffusion_model.layers[0].feed_forward
    assert ffn.w2._full_precision_mm_config and not ffn.w1._full_precision_mm_config


def test_int8_layers_multiply_in_the_compute_dtype_where_int8_matmuls_are_slow(tiny_dit, monkeypatch):
    """On Hopper and newer the int8 matmul ran 4.4x slower than bf16 (run19), and the loader builds int8 layers
    that dequantise and multiply in the compute dtype there. Such a model's call equals the 16-bit model built from
    the dequantised weights; the int8 matmul (activations quantized per row) does not, and keeps int8 weights."""
    from pipeline import quantize, quantized_ops

    quantization_or_skip("int8")
    q = quantize.quantize_state_dict(tiny_dit, "int8")
    int8_mm_model, cfg = _build(q, "int8")
    int8_mm = dit_call(int8_mm_model, cfg)
    assert not quantized_ops.int8_matmuls_dequantised(torch.device("cpu"))
    monkeypatch.setattr(quantized_ops, "int8_matmuls_dequantised", lambda device: True)
    patcher, _ = _build(q, "int8")
    _quantized_weights(patcher)  # still int8 in memory
    dequantised = dit_call(patcher, cfg)
    plain = dict(tiny_dit)
    for layer in quantize.layer_formats(q):
        plain[f"{layer}.weight"] = q[f"{layer}.weight"].float() * q[f"{layer}.weight_scale"].float()
    reference = dit_call(_build(plain, "fp32")[0], cfg)  # a quantized model computes in fp32 on the CPU
    assert stress.relative_error(dequantised, reference) < 1e-5
    assert stress.relative_error(int8_mm, reference) > 1e-4, "the int8 matmul quantizes the activations"


# --- one DiT call against fp32 -----------------------------------------------------------------------------------

def _quantized_weights(patcher):
    weight = patcher.model.diffusion_model.layers[0].attention.qkv.weight
    assert type(weight).__name__ == "QuantizedTensor" or type(weight.data).__name__ == "QuantizedTensor"


def _errors(sd) -> dict:
    return quant_errors.dit_errors(sd, check=_quantized_weights)


def test_tiny_model_error_beats_a_plain_fp8_cast(tiny_dit):
    # Measured (CPU, fp32 compute): fp8 0.0063, int8 0.0024, plain fp8 cast 0.024.
    quantization_or_skip("int8")
    err = _errors(tiny_dit)
    assert err["fp8"] < 0.01 and err["int8"] < 0.005, err
    assert err["fp8"] < err["plain_fp8_cast"] / 2, err


def test_full_width_block_error_beats_a_plain_fp8_cast(comfy_import_path):
    # NewBie's real widths (dim 2304, FFN 9216, 24/8 heads), one block of each kind, random weights ~N(0, 1/fan_in).
    # Measured (CPU, fp32 compute): fp8 0.0048, int8 0.0025, plain fp8 cast 0.025.
    quantization_or_skip("int8")
    spec = dataclasses.replace(tiny_models.TINY, dit=dataclasses.replace(tiny_models.FULL.dit, n_layers=1,
                                                                          n_refiner_layers=1))
    sd = tiny_models.random_dit(torch.bfloat16, spec)
    err = _errors(sd)
    assert err["fp8"] < 0.008 and err["int8"] < 0.004, err
    assert err["fp8"] < err["plain_fp8_cast"] / 3, err


# --- quantized files -----------------------------------------------------------------------------------------------

def _save(tmp_path, sd, precision, name="q.safetensors"):
    from pipeline import quantize

    path = tmp_path / name
    quantize.save(quantize.quantize_state_dict(sd, precision), path)
    return path


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_saved_file_reloads_bit_identically_without_requantizing(tiny_dit, tmp_path, precision):
    from pipeline import loader, quantize

    quantization_or_skip(precision)

    made = quantize.quantize_state_dict(tiny_dit, precision)
    path = tmp_path / f"tiny-{precision}.safetensors"
    quantize.save(made, path)
    read = loader.read_single_part("dit", path)[0]
    assert set(read) == set(made)
    for k, v in made.items():
        assert read[k].dtype == v.dtype and torch.equal(read[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    parts = _parts(read, path)
    assert loader.quantized_dit(parts, precision) is read  # used as it is, not quantized again
    a, cfg = _build(made, precision)
    b, _ = _build(read, precision, path)
    assert torch.equal(dit_call(a, cfg), dit_call(b, cfg))


def test_older_scaled_fp8_file_is_read_as_quantized(tiny_dit, tmp_path):
    """ComfyUI's older fp8 layout (a `scaled_fp8` marker and per-layer `scale_weight`, no metadata), converted by
    ComfyUI's own reader: the same model as the pack's fp8, under the full checkpoint's key prefix too."""
    from safetensors.torch import save_file

    from pipeline import loader, quantize

    made = quantize.quantize_state_dict(tiny_dit, "fp8")
    old = {"model.diffusion_model." + k.replace(".weight_scale", ".scale_weight"): v.contiguous()
           for k, v in made.items() if not k.endswith(quantize.QUANT_KEY)}
    path = tmp_path / "tiny-scaled-fp8.safetensors"
    save_file({**old, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, str(path))
    read = loader.read_single_part("dit", path)[0]
    assert quantize.precision_of(read) == "fp8" and "scaled_fp8" not in read
    a, cfg = _build(made, "fp8")
    b, _ = _build(read, "fp8", path)
    assert torch.equal(dit_call(a, cfg), dit_call(b, cfg))


def test_upstream_reader_sees_the_quantized_layers(tiny_dit, tmp_path):
    """What UNETLoader does before detecting the model: load_torch_file + convert_old_quants."""
    import comfy.utils

    from pipeline import quantize

    path = _save(tmp_path, tiny_dit, "fp8")
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    assert comfy.utils.detect_layer_quantization(sd, "")
    assert set(quantize.layer_formats(sd)) == set(quantize.layers_to_quantize(tiny_dit))


def test_quantized_file_with_another_precision_fails_naming_it(tiny_dit, tmp_path):
    from pipeline import loader

    path = _save(tmp_path, tiny_dit, "fp8", "tiny-fp8.safetensors")
    parts = _parts(loader.read_single_part("dit", path)[0], path)
    with pytest.raises(ModelFileError, match=r"tiny-fp8\.safetensors.*already quantized \(fp8\)"):
        loader.build_model(parts, "fp16")


def _rewrite(path, tensors=None, metadata=None):
    from safetensors.torch import load_file, save_file

    from pipeline import checkpoint

    sd = load_file(str(path))
    meta = checkpoint.read_metadata(path)
    if tensors:
        tensors(sd)
    if metadata:
        meta = metadata(meta)
    save_file(sd, str(path), metadata=meta)


@pytest.mark.parametrize("damage,message", [
    ("metadata", "_quantization_metadata is not valid"),
    ("format", "quantization format 'nvfp4'"),
    ("scale", "has no weight_scale"),
    ("dtype", "stores torch.bfloat16"),
    ("nan", "damaged weight_scale"),
    ("truncated", "truncated"),
])
def test_damaged_quantized_file_fails_naming_it(tiny_dit, tmp_path, damage, message):
    from pipeline import loader

    path = _save(tmp_path, tiny_dit, "fp8", "broken-fp8.safetensors")
    layer = "layers.0.attention.qkv"
    if damage == "metadata":
        _rewrite(path, metadata=lambda m: {**m, "_quantization_metadata": "{not json"})
    elif damage == "format":
        _rewrite(path, metadata=lambda m: {**m, "_quantization_metadata": json.dumps(
            {"layers": {**json.loads(m["_quantization_metadata"])["layers"], layer: {"format": "nvfp4"}}})})
    elif damage == "scale":
        _rewrite(path, tensors=lambda sd: sd.pop(f"{layer}.weight_scale"))
    elif damage == "dtype":
        _rewrite(path, tensors=lambda sd: sd.update({f"{layer}.weight": sd[f"{layer}.weight"].to(torch.bfloat16)}))
    elif damage == "nan":
        _rewrite(path, tensors=lambda sd: sd.update({f"{layer}.weight_scale": torch.tensor(float("nan"))}))
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match=message) as err:
        loader.read_single_part("dit", path)
    assert "broken-fp8.safetensors" in str(err.value)


# --- LoRA on a quantized model -------------------------------------------------------------------------------------

def test_lora_changes_a_quantized_model_like_the_16_bit_one(comfy_import_path, tmp_path):
    """ComfyUI patches a quantized weight by dequantising, adding the LoRA and requantising it (with a fresh
    scale), so the change a LoRA makes carries the format's rounding noise: strength 4 keeps the change well
    above it, and the quantized model's change must match the 32-bit model's change within that noise."""
    import lora_files

    dit = lora_files.tiny_dit()  # first: it tells ComfyUI to use the CPU before model_management is imported
    import comfy.model_management as mm

    from pipeline import lora

    quantization_or_skip("int8")
    path, _ = lora_files.write_peft(tmp_path / "peft", dit)
    out = {}
    for precision in ("fp32", "fp8", "int8"):
        patcher, cfg = _build(dit, precision)
        mm.load_models_gpu([patcher])
        base = dit_call(patcher, cfg)
        patched = lora.apply_lora(patcher, path, 4.0).model
        mm.load_models_gpu([patched])
        out[precision] = (base, dit_call(patched, cfg))
        mm.unload_all_models()
    base32, lora32 = out["fp32"]
    assert stress.relative_error(lora32, base32) > 0.05, "the LoRA should change the output"
    # Measured (CPU): the LoRA changes the output by 0.062; the quantized models' change differs from the
    # 32-bit change by 0.14 (fp8) and 0.056 (int8), relative to its size.
    for precision, tol in (("fp8", 0.25), ("int8", 0.1)):
        base_q, lora_q = out[precision]
        err = stress.relative_error(lora_q - base_q, lora32 - base32)
        assert err < tol, (precision, err)
