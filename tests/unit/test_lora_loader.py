"""NewBie LoRA Loader logic (pipeline/lora.py) on the tiny DiT: LoRAs written by PEFT and LyCORIS themselves, applied
through ComfyUI's own patches, give the output of the model the library merged itself (fp32, 1e-4)."""
from __future__ import annotations

import pytest
import torch

from devkit.dit_calls import dit_call
from pipeline.errors import ModelFileError

TOL = 1e-4


@pytest.fixture(scope="module")
def lib(comfy_import_path):
    import lora_files

    return lora_files


@pytest.fixture(scope="module")
def base(lib):
    dit = lib.tiny_dit()
    patcher, cfg = lib.build(dit)
    return dit, patcher, cfg


def _out(patcher, cfg) -> torch.Tensor:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])  # applies the patcher's patches to the weights, as sampling does
    return dit_call(patcher, cfg)


def _model_output(lib, weights: dict) -> torch.Tensor:
    patcher, cfg = lib.build(weights)
    return _out(patcher, cfg)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _apply(patcher, path, strength=1.0):
    from pipeline import lora

    return lora.apply_lora(patcher, path, strength)


def test_peft_lora_from_the_trainer_equals_peft_merge(lib, base, tmp_path):
    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "peft", dit, r=4, alpha=2)  # the trainer's alpha = r / 2
    result = _apply(patcher, path)
    assert result.applied == {"attention.qkv": 4, "attention.out": 4, "feed_forward.w2": 4,
                              "time_text_embed.1": 1, "clip_text_pooled_proj.1": 1}
    assert not result.unmapped and "every tensor of the file was applied" in result.report
    assert "scale 0.5" in result.report
    got, want = _out(result.model, cfg), _model_output(lib, merged)
    assert _rel(got, want) < TOL
    assert _rel(_out(patcher, cfg), want) > 100 * TOL, "the LoRA should change the output"


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_from_the_trainer_equals_lycoris_forward(lib, base, tmp_path, algo):
    """Rank 4, alpha 2 (scale 0.5): against LyCORIS's own forward (see lora_files.write_lycoris for why not merge_to)."""
    dit, patcher, cfg = base
    path, _, forward = lib.write_lycoris(tmp_path / f"{algo}.safetensors", dit, algo=algo)
    result = _apply(patcher, path)
    assert sum(result.applied.values()) == 14 and not result.unmapped, result.report
    assert _rel(_out(result.model, cfg), forward) < TOL


def test_lokr_full_rank_as_in_lokr_toml_equals_lycoris_merge(lib, base, tmp_path):
    """lokr.toml: rank and alpha 114514 ("full dimension"), factor 8: whole Kronecker factors, scale 1."""
    dit, patcher, cfg = base
    path, merged, forward = lib.write_lycoris(tmp_path / "full.safetensors", dit, dim=114514, alpha=114514, factor=8)
    result = _apply(patcher, path)
    assert not result.unmapped
    got = _out(result.model, cfg)
    assert _rel(got, _model_output(lib, merged)) < TOL and _rel(got, forward) < TOL


def test_strength_scales_the_weight_change_and_zero_is_the_base(lib, base, tmp_path):
    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "peft", dit)
    assert torch.equal(_out(_apply(patcher, path, 0.0).model, cfg), _out(patcher, cfg))
    for s in (0.5, -1.0):
        scaled = {k: dit[k] + s * (merged[k] - dit[k]) for k in dit}
        assert _rel(_out(_apply(patcher, path, s).model, cfg), _model_output(lib, scaled)) < TOL


def test_two_loras_stack_and_clones_keep_their_own_patches(lib, base, tmp_path):
    dit, patcher, cfg = base
    peft_path, peft_merged = lib.write_peft(tmp_path / "peft", dit)
    lokr_path, lokr_merged, _ = lib.write_lycoris(tmp_path / "lokr.safetensors", dit, dim=114514, alpha=114514,
                                                  factor=8, seed=7)
    first = _apply(patcher, peft_path).model
    both = _apply(first, lokr_path).model
    stacked = {k: peft_merged[k] + lokr_merged[k] - dit[k] for k in dit}
    assert _rel(_out(both, cfg), _model_output(lib, stacked)) < TOL
    assert _rel(_out(first, cfg), _model_output(lib, peft_merged)) < TOL, "the second LoRA leaked into the first"
    assert _rel(_out(first.clone(), cfg), _model_output(lib, peft_merged)) < TOL


def test_peft_rank_and_alpha_patterns_and_rslora(lib, base, tmp_path):
    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "patterns", dit, r=4, alpha=8, use_rslora=True,
                                  rank_pattern={"feed_forward.w2": 2}, alpha_pattern={"attention.out": 3})
    result = _apply(patcher, path)
    assert "rsLoRA" in result.report and not result.unmapped
    assert _rel(_out(result.model, cfg), _model_output(lib, merged)) < TOL


def test_peft_without_config_falls_back_to_scale_one_and_says_so(lib, base, tmp_path):
    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "noconfig", dit, r=4, alpha=4)  # scale 1: same result
    (path.parent / "adapter_config.json").unlink()
    result = _apply(patcher, path)
    assert "no adapter_config.json beside the file: scale 1" in result.report
    assert _rel(_out(result.model, cfg), _model_output(lib, merged)) < TOL


def test_config_named_after_the_file_is_used(lib, base, tmp_path):
    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "named", dit, r=4, alpha=1)
    renamed = path.rename(tmp_path / "my_style.safetensors")
    (path.parent / "adapter_config.json").rename(tmp_path / "my_style.json")
    result = _apply(patcher, renamed)
    assert "my_style.json" in result.report and "scale 0.25" in result.report
    assert _rel(_out(result.model, cfg), _model_output(lib, merged)) < TOL


def test_peft_dora_equals_peft_merge(lib, base, tmp_path):
    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "dora", dit, use_dora=True)
    result = _apply(patcher, path)
    assert not result.unmapped and "DoRA" in result.report
    assert _rel(_out(result.model, cfg), _model_output(lib, merged)) < TOL


def test_peft_dora_after_another_lora_follows_peft_on_the_patched_weights(lib, base, tmp_path):
    dit, patcher, cfg = base
    lokr_path, lokr_merged, _ = lib.write_lycoris(tmp_path / "lokr.safetensors", dit, dim=114514, alpha=114514,
                                                  factor=8, seed=5)
    dora_path, _ = lib.write_peft(tmp_path / "dora", dit, use_dora=True, seed=6)
    stacked = _apply(_apply(patcher, lokr_path).model, dora_path).model
    want = lib.merge_peft(tmp_path / "dora", lokr_merged)
    assert _rel(_out(stacked, cfg), _model_output(lib, want)) < TOL
    half = _apply(patcher, dora_path, 0.5).model  # ComfyUI's strength: halfway between base and DoRA-merged
    merged = lib.merge_peft(tmp_path / "dora", dit)
    assert _rel(_out(half, cfg), _model_output(lib, {k: (dit[k] + merged[k]) / 2 for k in dit})) < TOL


def test_unmappable_tensors_are_named_and_the_rest_applies(lib, base, tmp_path):
    from safetensors.torch import load_file

    dit, patcher, cfg = base
    path, merged = lib.write_peft(tmp_path / "extra", dit)
    tensors = load_file(str(path))
    tensors["base_model.model.layers.0.attention.not_a_module.lora_A.weight"] = torch.zeros(4, 8)
    tensors["base_model.model.layers.0.attention.not_a_module.lora_B.weight"] = torch.zeros(8, 4)
    tensors["some_stray_tensor"] = torch.zeros(3)
    lib.save(path, tensors)
    result = _apply(patcher, path)
    named = {k for k, _ in result.unmapped}
    assert named == {"base_model.model.layers.0.attention.not_a_module.lora_A.weight",
                     "base_model.model.layers.0.attention.not_a_module.lora_B.weight", "some_stray_tensor"}
    assert "NOT APPLIED: 3 tensors" in result.report and "not_a_module" in result.report
    assert _rel(_out(result.model, cfg), _model_output(lib, merged)) < TOL


def test_modules_of_the_wrong_shape_are_named_not_applied(lib, base, tmp_path):
    """ComfyUI would skip them at sampling time with only a log line; the pack says so in the report."""
    from safetensors.torch import load_file

    dit, patcher, cfg = base
    path, _ = lib.write_peft(tmp_path / "wrong", dit)
    tensors = load_file(str(path))
    key = "base_model.model.layers.0.feed_forward.w2.lora_A.weight"
    tensors[key] = torch.zeros(4, 2 * tensors[key].shape[1])  # as if trained on a wider model
    lib.save(path, tensors)
    result = _apply(patcher, path)
    assert {k for k, _ in result.unmapped} == {key, key.replace("lora_A", "lora_B")}
    assert "a LoRA for another model size?" in result.report and result.applied["feed_forward.w2"] == 3
    full = {k: torch.zeros(4, 2304) if k.endswith("lora_A.weight") else torch.zeros(7 * 96, 4) for k in tensors}
    with pytest.raises(ModelFileError, match="none of its modules could be applied"):
        _apply(patcher, lib.save(tmp_path / "full_size.safetensors", full))


def test_comfyui_format_lora_still_applies(lib, base, tmp_path):
    dit, patcher, cfg = base
    down, up = torch.randn(2, 96) * 0.3, torch.randn(96, 2) * 0.3
    path = lib.save(tmp_path / "comfy.safetensors", {"diffusion_model.layers.0.attention.out.lora_down.weight": down,
                                                     "diffusion_model.layers.0.attention.out.lora_up.weight": up})
    result = _apply(patcher, path)
    assert result.applied == {"attention.out": 1} and not result.unmapped
    want = dict(dit)
    want["layers.0.attention.out.weight"] = dit["layers.0.attention.out.weight"] + up @ down
    assert _rel(_out(result.model, cfg), _model_output(lib, want)) < TOL


def test_an_sdxl_lora_fails_naming_the_file_and_what_it_looks_like(lib, base, tmp_path):
    _, patcher, _ = base
    path = lib.save(tmp_path / "sdxl_style.safetensors", {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)})
    with pytest.raises(ModelFileError) as err:
        _apply(patcher, path)
    assert "sdxl_style.safetensors" in str(err.value) and "looks like an SDXL LoRA (keys lora_" in str(err.value)


def test_pickle_adapters_are_refused_with_the_reason(tmp_path):
    from pipeline import lora

    for name in ("adapter_model.bin", "old.pt", "x.ckpt"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04")
        with pytest.raises(ModelFileError, match="pickle file, and loading a pickle can run code"):
            lora.read_lora(path)


def test_key_names_split_into_module_and_tensor():
    from pipeline import lora

    assert lora.split_key("base_model.model.layers.0.attention.qkv.lora_A.weight") == \
        ("base_model.model.layers.0.attention.qkv", ".lora_A.weight")
    assert lora.split_key("lycoris_layers_0_feed_forward_w2.lokr_w2_b") == ("lycoris_layers_0_feed_forward_w2",
                                                                          ".lokr_w2_b")
    assert lora.split_key("x.diff_b") == ("x", ".diff_b")
    assert lora.split_key("stray") is None
    assert lora.module_kind("diffusion_model.noise_refiner.1.feed_forward.w2.weight") == "feed_forward.w2"
    assert lora.module_kind("diffusion_model.time_text_embed.1.weight") == "time_text_embed.1"


def test_peft_scale_follows_peft_patterns():
    from pipeline import lora

    config = {"r": 8, "lora_alpha": 4, "rank_pattern": {"feed_forward.w2": 16}, "alpha_pattern": {r"layers\.1\..*": 2}}
    assert lora.peft_scale(config, "layers.0.attention.qkv") == (0.5, 8)
    assert lora.peft_scale(config, "layers.0.feed_forward.w2") == (0.25, 16)
    assert lora.peft_scale(config, "layers.1.attention.out") == (0.25, 8)
    assert lora.peft_scale({"r": 4, "lora_alpha": 4, "use_rslora": True}, "a") == (2.0, 4)
