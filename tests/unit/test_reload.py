"""The loader registers ComfyUI's `cached_patcher_init` factories on its MODEL and CLIP, as ComfyUI's own loaders
do: under dynamic VRAM, hooked conditioning, TorchCompileModel and the CLIP hook nodes ask for a non-dynamic twin
through them (ModelPatcher.clone(disable_dynamic=True)). The twin must be the same model, from the same files."""
from __future__ import annotations

import pytest
import torch

from devkit.dit_calls import dit_call
from host_features import quantization_or_skip

pytestmark = pytest.mark.host


def _paths(models_root, layout: str) -> dict:
    from devkit import tiny_models

    if layout == "folder":
        return {"folder": models_root / "diffusers" / tiny_models.TINY.name}
    return tiny_models.single_file_paths(models_root)


def _load(models_root, layout: str, precision: str, te_precision: str = "auto"):
    from pipeline import loader

    paths = _paths(models_root, layout)
    parts = loader.read_folder(paths["folder"]) if layout == "folder" else loader.read_single_files(paths)
    return loader.load_newbie(parts, precision, te_precision, compile="off")


@pytest.mark.parametrize("layout", ["single", "folder"])
def test_model_twin_is_the_same_dit_without_dynamic_vram(models_root, layout):
    import comfy.model_patcher

    from pipeline import compat, precision, vram_budget

    loaded = _load(models_root, layout, "fp16")
    factory, args = loaded.model.cached_patcher_init
    twin = factory(*args, disable_dynamic=True)
    assert isinstance(twin, comfy.model_patcher.ModelPatcher) and not compat.is_dynamic(twin)
    assert type(twin) is vram_budget.resident_patcher_class(), \
        "the pack's resident patcher (its evictions kept as host copies)"
    assert precision.state_of(twin) is precision.state_of(loaded.model), "the twin must share the fp16 path's state"
    cfg = {"cap_feat_dim": loaded.model.model.diffusion_model.cap_embedder[1].weight.shape[1],
           "clip_text_dim": loaded.model.model.diffusion_model.clip_text_pooled_proj[1].weight.shape[1]}
    torch.testing.assert_close(dit_call(twin, cfg), dit_call(loaded.model, cfg), rtol=0, atol=0)


@pytest.mark.parametrize("layout,te_precision", [("single", "auto"), ("folder", "auto"), ("single", "fp8"),
                                                 ("folder", "int8")])
def test_clip_twin_holds_the_same_text_encoders(models_root, layout, te_precision):
    from pipeline import quantize

    if te_precision in quantize.FORMATS:
        quantization_or_skip(te_precision, "text_encoder_precision")
    loaded = _load(models_root, layout, "bf16", te_precision)
    factory, args = loaded.clip.patcher.cached_patcher_init
    twin = factory(*args, disable_dynamic=True)
    ours, theirs = loaded.clip.patcher.model.state_dict(), twin.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    if te_precision in quantize.FORMATS:  # the twin is the quantized Gemma again, not a 16-bit one
        assert quantize.layer_formats(theirs) == quantize.layer_formats(ours) != {}
        assert f"{te_precision} ({quantize.DESCRIPTION[te_precision]})" in loaded.report


def test_a_plain_reload_rebuilds_the_patcher_the_model_was_loaded_on(models_root, monkeypatch, request):
    """ComfyUI's multi-GPU deep clone (`ModelPatcher.deepclone_multigpu`) calls the factory without disable_dynamic
    and puts the fresh DiT in a patcher of the original's class: the factory must build the DiT as the loader did
    (here compiled, so on the pack's non-dynamic patcher), also where dynamic VRAM is on, not on the core patcher
    the original never used. With disable_dynamic it gives the non-dynamic twin as before."""
    from pipeline import compat, loader

    loaded = loader.load_newbie(loader.read_single_files(_paths(models_root, "single")), "bf16", compile="blocks")
    assert not compat.is_dynamic(loaded.model) and type(loaded.model) is not compat.core_patcher_class()
    factory, args = loaded.model.cached_patcher_init
    dit = loader.read_dit(_paths(models_root, "single"))
    request.getfixturevalue("dynamic_vram_layers")  # dynamic VRAM on from here (a CPU host never has it)
    monkeypatch.setattr(loader, "read_dit", lambda paths: dict(dit))  # comfy-aimdo's file reader needs a GPU
    again = factory(*args)
    assert type(again) is type(loaded.model) and not compat.is_dynamic(again)
    assert type(factory(*args, disable_dynamic=True)) is type(loaded.model)
