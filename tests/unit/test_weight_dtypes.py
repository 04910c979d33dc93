"""A resident DiT holds its weights in the dtype its layers were built for, on a host with dynamic VRAM too.

ComfyUI v0.33 with dynamic VRAM on (comfy-aimdo, on by default on NVIDIA) builds its layers without weights and
takes the file's tensors as they are at load. The pack's non-dynamic patcher (a resident or budgeted DiT) then
kept a bf16 file's weights in bf16 at `precision: fp16`, and every DiT call cast all of them (run50's profile of
an fp16 server). CPU hosts never turn dynamic VRAM on, so these tests set ComfyUI's own switch
(`comfy.memory_management.aimdo_enabled`) while the model is built, which is what decides how its layers load.
"""
from __future__ import annotations

import copy

import pytest
import torch

from devkit.dit_calls import dit_call
from host_features import dynamic_vram_module

pytestmark = pytest.mark.host


def _file_in(parts, dtype=torch.bfloat16):
    """The tiny model's parts with the DiT as a file in `dtype` holds it (NewBie's checkpoint is bf16)."""
    p = copy.copy(parts)
    p.dit = {k: v.to(dtype) if v.is_floating_point() else v for k, v in parts.dit.items()}
    return p


def _linear_weight_dtypes(patcher) -> set:
    return {m.weight.dtype for m in patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)}


def test_fp16_weights_are_fp16_after_a_dynamic_vram_load(tiny_parts, dynamic_vram_layers):
    from pipeline import loader

    patcher, cfg, _, _ = loader.build_model(_file_in(tiny_parts), "fp16", dynamic=False)
    assert _linear_weight_dtypes(patcher) == {torch.float16}


def test_the_settled_model_gives_what_a_load_without_dynamic_vram_gives(tiny_parts, comfy_import_path,
                                                                        monkeypatch):
    from pipeline import loader

    memory_management = dynamic_vram_module()

    parts = _file_in(tiny_parts, torch.float32)  # wider than the model: the size ComfyUI budgets must shrink too
    plain, cfg, _, _ = loader.build_model(parts, "fp16", dynamic=False)
    expected = dit_call(plain, cfg)
    monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    settled, cfg, _, _ = loader.build_model(parts, "fp16", dynamic=False)
    assert torch.equal(dit_call(settled, cfg), expected)
    assert settled.model_size() == plain.model_size()  # what ComfyUI budgets for the model


def test_settling_leaves_quantized_and_matching_weights_alone(comfy_import_path):
    from pipeline import loader

    layer = torch.nn.Linear(4, 4)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    layer.weight_comfy_model_dtype = torch.bfloat16  # built for bf16, holds a quantized fp8 tensor
    kept = torch.nn.Linear(4, 4).to(torch.bfloat16)
    kept.weight_comfy_model_dtype = torch.bfloat16
    kept.bias_comfy_model_dtype = torch.bfloat16
    wide = torch.nn.Linear(4, 4)  # fp32 as loaded, built for fp16
    wide.weight_comfy_model_dtype = torch.float16
    model = torch.nn.Sequential(layer, kept, wide)
    assert loader.settle_weight_dtypes(model) == 1
    assert layer.weight.dtype == torch.float8_e4m3fn and kept.weight.dtype == torch.bfloat16
    assert wide.weight.dtype == torch.float16 and wide.bias.dtype == torch.float32  # no dtype recorded: kept



@pytest.mark.parametrize("precision", ["fp8", "int8", "bf16"])
def test_quantized_and_bf16_dits_load_alike_with_and_without_dynamic_vram(tiny_parts, comfy_import_path,
                                                                          monkeypatch, precision):
    from pipeline import loader

    memory_management = dynamic_vram_module()

    parts = _file_in(tiny_parts)
    plain, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    expected = dit_call(plain, cfg)
    monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    settled, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    assert torch.equal(dit_call(settled, cfg), expected)
    assert loader.settle_weight_dtypes(settled.model) == 0
