"""A LoRA in NewBie's key layout, applied with ComfyUI's own LoraLoaderModelOnly to the pack's MODEL."""
from __future__ import annotations

import numpy as np
import pytest

from devkit import graphs

pytestmark = pytest.mark.host


def _write_tiny_lora(path):
    """Rank-4 LoRA on every attention qkv of the tiny DiT, in ComfyUI's 'diffusion_model.<module>' naming."""
    import torch
    from safetensors.torch import save_file

    from devkit import tiny_models

    d = tiny_models.TINY.dit
    head_dim = d.dim // d.n_heads
    qkv_rows = (d.n_heads + 2 * d.n_kv_heads) * head_dim
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(d.n_layers):
        prefix = f"diffusion_model.layers.{i}.attention.qkv"
        sd[f"{prefix}.lora_down.weight"] = torch.randn(4, d.dim, generator=g) * 0.5
        sd[f"{prefix}.lora_up.weight"] = torch.randn(qkv_rows, 4, generator=g) * 0.5
    save_file(sd, str(path))


def _latent_graph(lora_strength=None, seed=31, prefix="lora"):
    g = graphs.txt2img(seed=seed, prefix=prefix)
    del g["6"], g["7"]
    if lora_strength is not None:
        g["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": "newbie-tiny-lora.safetensors", "strength_model": lora_strength}}
        g["5"]["inputs"]["model"] = ["10", 0]
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return g


def _latent(server, entry):
    from safetensors.torch import load_file

    item = next(i for out in entry["outputs"].values() for i in out.get("latents", []))
    return load_file(str(server.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"].numpy()


def test_lora_changes_the_output_and_strength_zero_does_not(server, models_root):
    _write_tiny_lora(models_root / "loras" / "newbie-tiny-lora.safetensors")
    base = _latent(server, server.run(_latent_graph(None, prefix=f"lora-base-{server.lane}")))
    with_lora = _latent(server, server.run(_latent_graph(1.0, prefix=f"lora-on-{server.lane}")))
    zero = _latent(server, server.run(_latent_graph(0.0, prefix=f"lora-zero-{server.lane}")))
    assert not np.allclose(base, with_lora, atol=1e-4), "the LoRA did not change the result"
    assert np.allclose(base, zero, atol=1e-5), "strength 0 should leave the model unchanged"
    assert "lora key not loaded" not in server.log_tail(400)


def _hooked_graph(strength: float, prefix: str):
    """The LoRA as a hook on both conditionings (ComfyUI's hook nodes): patched into the pack's MODEL per
    conditioning during sampling, instead of once by a loader."""
    g = _latent_graph(None, prefix=prefix)
    g["20"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {
        "lora_name": "newbie-tiny-lora.safetensors", "strength_model": strength}}
    for cond, node in (("2", "21"), ("3", "22")):
        g[node] = {"class_type": "ConditioningSetProperties", "inputs": {
            "cond_NEW": [cond, 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["20", 0]}}
    g["5"]["inputs"]["positive"], g["5"]["inputs"]["negative"] = ["21", 0], ["22", 0]
    return g


def test_hooked_conditioning_applies_the_lora_as_the_loader_does(server, models_root):
    """Conditioning that carries hooks reaches the pack's MODEL (under dynamic VRAM through the non-dynamic twin
    that the loader's cached_patcher_init builds): the hooked LoRA gives the loaded LoRA's latent."""
    _write_tiny_lora(models_root / "loras" / "newbie-tiny-lora.safetensors")
    base = _latent(server, server.run(_latent_graph(None, prefix=f"hook-base-{server.lane}")))
    loaded = _latent(server, server.run(_latent_graph(1.0, prefix=f"hook-loaded-{server.lane}")))
    hooked = _latent(server, server.run(_hooked_graph(1.0, prefix=f"hook-on-{server.lane}")))
    assert not np.allclose(base, hooked, atol=1e-4), "the hooked LoRA did not change the result"
    scale = float(np.abs(loaded - base).max())
    assert float(np.abs(hooked - loaded).max()) < 0.02 * scale, "hooked and loaded LoRA disagree"
