"""fp8 and int8 DiT and Gemma-3 weights inside a real ComfyUI server: a quantized tiny model (and a tiny model whose
Gemma is quantized) samples through native KSampler, a DiT saved quantized by NewBie Save Quantized DiT loads as it
is and gives the same pixels as quantizing at load, and a host without the int8 format says so (v0.8.0 has fp8
but not int8_tensorwise)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devkit import graphs
from devkit.harness import PromptFailed

pytestmark = pytest.mark.host


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _int8_available(server) -> bool:
    return "int8" not in _unavailable(server)


def _unavailable(server) -> set:
    """int8 needs ComfyUI's int8_tensorwise format: present on the v0.33 lane, absent on v0.8.0 (the probe is
    pipeline/compat.py; the lane decides what this test expects)."""
    return {"int8"} if server.lane == "v0.8" else set()


def _image(server, prefix, **loader_args):
    graph = graphs.txt2img(seed=5, prefix=f"{prefix}-{server.lane}", compile="off", **loader_args)
    return _pixels(server.output_images(server.run(graph))[0])


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_model_samples_with_ksampler(server, precision):
    if precision in _unavailable(server):
        with pytest.raises(PromptFailed) as err:
            _image(server, f"q-{precision}", precision=precision)
        message = str(err.value) + str(err.value.details)
        assert f"precision '{precision}' needs" in message and "Update ComfyUI" in message, message
        return
    image = _image(server, f"q-{precision}", precision=precision)
    reference = _image(server, "q-fp32", precision="fp32")
    assert image.shape == (64, 64, 3) and image.std() > 0
    # Random weights, 3 steps: the decoded noise image stays close to the 32-bit one (mean |diff| in 0..255).
    assert np.abs(image.astype(float) - reference.astype(float)).mean() < 12


@pytest.mark.parametrize("te_precision", ["fp8", "int8"])
def test_quantized_gemma_conditions_ksampler(server, te_precision):
    if te_precision in _unavailable(server):
        with pytest.raises(PromptFailed) as err:
            _image(server, f"te-{te_precision}", precision="fp32", text_encoder_precision=te_precision)
        message = str(err.value) + str(err.value.details)
        assert f"text_encoder_precision '{te_precision}' needs" in message and "Update ComfyUI" in message, message
        return
    image = _image(server, f"te-{te_precision}", precision="fp32", text_encoder_precision=te_precision)
    reference = _image(server, "te-fp32", precision="fp32", text_encoder_precision="fp32")
    assert image.shape == (64, 64, 3) and image.std() > 0
    # Only the conditioning differs (tests/unit/test_te_quantize.py bounds its error): the image stays close.
    assert np.abs(image.astype(float) - reference.astype(float)).mean() < 12


def test_saved_quantized_dit_loads_as_it_is(server, models_root):
    name = f"newbie-tiny-fp8-{server.lane}.safetensors"
    saved = server.run({"1": {"class_type": "NewBieSaveQuantizedDiT", "inputs": {
        "diffusion_model": graphs.TINY_DIT, "precision": "fp8", "filename": name}}})
    assert (models_root / "diffusion_models" / name).is_file(), saved
    from_file = _image(server, "q-file", precision="fp8", diffusion_model=name)
    at_load = _image(server, "q-load", precision="fp8")
    assert np.array_equal(from_file, at_load), "the saved file gave other pixels than quantizing at load"
    with pytest.raises(PromptFailed) as err:  # the file holds fp8: another precision names it
        _image(server, "q-wrong", precision="bf16", diffusion_model=name)
    message = str(err.value) + str(err.value.details)
    assert name in message and "already quantized (fp8)" in message, message
    with pytest.raises(PromptFailed) as err:  # never overwrites
        server.run({"1": {"class_type": "NewBieSaveQuantizedDiT", "inputs": {
            "diffusion_model": graphs.TINY_DIT, "precision": "fp8", "filename": name + "x.safetensors"}}})
        server.run({"1": {"class_type": "NewBieSaveQuantizedDiT", "inputs": {
            "diffusion_model": graphs.TINY_DIT, "precision": "int8" if _int8_available(server) else "fp8",
            "filename": name}}})
    assert "already exists" in str(err.value) + str(err.value.details)
