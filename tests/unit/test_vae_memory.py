"""The pack's VAE plans its decode with the measured need (pipeline/vae_memory.py), not ComfyUI's AutoencoderKL
guess, which is twice the measured peak and under a VRAM cap unloads DiT weights the next image loads again."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


def test_pack_vae_plans_the_measured_decode_memory(tiny_parts):
    import comfy.model_management as mm
    import comfy.sd

    from pipeline import loader, vae_memory

    vae = loader.build_vae(tiny_parts)
    stock = comfy.sd.VAE(sd=dict(tiny_parts.vae))
    shape = (1, 16, 128, 128)  # 1024x1024
    ours, theirs = vae.memory_used_decode(shape, torch.bfloat16), stock.memory_used_decode(shape, torch.bfloat16)
    measured = vae_memory.MEASURED_BYTES_PER_LATENT_PIXEL * 128 * 128 * mm.dtype_size(torch.bfloat16)
    assert measured < ours < 0.65 * theirs, (measured, ours, theirs)
    assert vae.memory_used_decode((1, 16, 256, 256), torch.float32) == 8 * ours, "linear in pixels and dtype size"
    assert vae.memory_used_encode(shape, torch.bfloat16) == stock.memory_used_encode(shape, torch.bfloat16)


def test_decode_still_works_with_the_pack_estimate(tiny_parts):
    from pipeline import loader

    image = loader.build_vae(tiny_parts).decode(torch.randn(1, 16, 8, 8))
    assert image.shape[-3:-1] == (64, 64) and torch.isfinite(image).all()


def test_the_benches_load_the_vae_alone_from_the_single_file_layout(tmp_path, comfy_import_path):
    """devkit.tiny_models.vae_parts, as bench/vae_memory.py and bench/vae_decode.py load the full-size VAE: the
    layout written where it is missing, the VAE read from it alone, and a VAE that decodes."""
    from devkit import tiny_models
    from pipeline import loader

    parts = tiny_models.vae_parts(tmp_path, tiny_models.TINY, device="cpu")
    assert parts.dit == {} and parts.gemma == {} and "decoder.conv_in.weight" in parts.vae
    assert parts.paths["vae"] == str(tiny_models.single_file_paths(tmp_path, tiny_models.TINY)["vae"])
    image = loader.build_vae(parts).decode(torch.randn(1, 16, 8, 8))
    assert image.shape[-3:-1] == (64, 64) and torch.isfinite(image).all()
