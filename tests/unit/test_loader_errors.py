"""Wrong inputs to the loader fail with a message naming the file and what was expected."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline import checkpoint, detect
from pipeline.errors import ModelFileError


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "dit.safetensors"
    save_file({"a": torch.zeros(4, 4)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="cut.safetensors: file is truncated"):
        checkpoint.check_safetensors(cut, "a DiT")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelFileError, match="junk.safetensors: not a valid safetensors file"):
        checkpoint.check_safetensors(junk, "a DiT")
    pickled = tmp_path / "x.ckpt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(ModelFileError, match="x.ckpt: pickle-based files are refused"):
        checkpoint.check_safetensors(pickled, "a DiT")


def test_identify_names_other_model_families():
    assert checkpoint.identify(["input_blocks.0.0.weight"]) == "SD1/SDXL UNet"
    assert checkpoint.identify(["double_blocks.0.img_attn.qkv.weight"]) == "FLUX DiT"
    assert checkpoint.identify(["something.else"]) == "an unknown model"


def _shapes(**overrides):
    class T:
        def __init__(self, *shape):
            self.shape = shape
    sd = {"cap_embedder.1.weight": T(96, 64), "layers.0.attention.qkv.weight": T(192, 96),
          "layers.0.attention.q_norm.weight": T(48), "layers.0.feed_forward.w1.weight": T(384, 96),
          "x_embedder.weight": T(96, 64), "clip_text_pooled_proj.0.weight": T(32), "noise_refiner.0.x": T(1)}
    sd.update(overrides)
    return sd


def test_nextdit_config_from_shapes():
    cfg = detect.nextdit_config(_shapes())
    assert (cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["axes_dims"], cfg["clip_text_dim"]) == \
        (96, 2, 1, [16, 16, 16], 32)


def test_mismatched_encoders_are_refused_naming_the_file():
    dit = detect.nextdit_config(_shapes())
    gemma = {"hidden_size": 2560}
    jina = {"hidden_size": 32}
    with pytest.raises(ModelFileError, match="gemma.safetensors: Gemma width 2560 does not match"):
        detect.check_compatible(dit, gemma, jina, {"gemma": "gemma.safetensors", "jina": "jina.safetensors"})


def test_plain_lumina2_is_not_taken_for_newbie():
    sd = _shapes()
    del sd["clip_text_pooled_proj.0.weight"]
    with pytest.raises(ModelFileError, match="without NewBie's clip_text_pooled_proj"):
        detect.nextdit_config(sd, "lumina2.safetensors")


@pytest.mark.host
def test_folder_missing_a_part_names_it(models_root, tmp_path):
    from pipeline import loader

    folder = tmp_path / "broken"
    shutil.copytree(models_root / "diffusers" / "newbie-tiny", folder, symlinks=False)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelFileError, match=r"broken/vae: no diffusion_pytorch_model.safetensors"):
        loader.read_folder(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelFileError, match="model_index.json is missing"):
        loader.read_folder(folder)
