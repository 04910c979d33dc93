"""The pack's VAE beside a resident DiT gets ComfyUI's non-dynamic ModelPatcher (pipeline/vae_resident.py). The host
tests run without dynamic VRAM (no comfy-aimdo on a CPU), so the stock patcher stands in for the dynamic one here:
`compat.is_dynamic` says so for it."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


@pytest.fixture
def dynamic_stock_patcher(monkeypatch):
    """The VAE's stock patcher taken for a dynamic-VRAM one (what ComfyUI gives a VAE where aimdo is on)."""
    from pipeline import compat

    stock = []
    real = compat.is_dynamic
    monkeypatch.setattr(compat, "is_dynamic", lambda patcher: patcher in stock or real(patcher))
    return stock


def test_a_resident_dit_keeps_its_vae_on_the_gpu_in_the_plain_patcher(tiny_parts, dynamic_stock_patcher,
                                                                       monkeypatch):
    import comfy.model_patcher
    import comfy.sd

    from pipeline import loader, vae_resident

    monkeypatch.delenv(vae_resident.SWITCH, raising=False)
    vae = comfy.sd.VAE(sd=dict(tiny_parts.vae))
    dynamic_stock_patcher.append(vae.patcher)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    want = vae.decode(latent)
    conv = vae.first_stage_model.decoder.conv_in
    conv.weight.data = conv.weight.data.to(torch.bfloat16)  # a file's tensor taken as it is under dynamic VRAM
    assert vae_resident.keep(vae, loader.settle_weight_dtypes)
    assert type(vae.patcher) is comfy.model_patcher.ModelPatcher and not vae.patcher.is_dynamic()
    assert vae.patcher.model is vae.first_stage_model
    assert conv.weight.dtype == vae.vae_dtype, "converted once, at load"
    assert torch.equal(vae.decode(latent), want)
    assert not vae_resident.keep(vae, loader.settle_weight_dtypes), "a non-dynamic patcher is left as it is"


def test_the_loader_keeps_it_only_beside_a_resident_dit_and_the_switch_turns_it_off(tiny_parts,
                                                                                    dynamic_stock_patcher,
                                                                                    monkeypatch):
    import comfy.model_patcher
    import comfy.sd

    from pipeline import loader, vae_resident

    made = []

    class Recording(comfy.sd.VAE):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            dynamic_stock_patcher.append(self.patcher)
            made.append(self.patcher)

    monkeypatch.setattr(comfy.sd, "VAE", Recording)
    monkeypatch.delenv(vae_resident.SWITCH, raising=False)
    assert loader.build_vae(tiny_parts).patcher is made[-1], "streamed or budgeted DiT: dynamic VRAM as ComfyUI has it"
    assert loader.build_vae(tiny_parts, resident=True).patcher is not made[-1]
    monkeypatch.setenv(vae_resident.SWITCH, "0")
    assert loader.build_vae(tiny_parts, resident=True).patcher is made[-1]
