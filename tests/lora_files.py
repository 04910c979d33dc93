"""Tiny NewBie LoRAs written by the real libraries NewBie's trainer uses (PEFT, LyCORIS), each with the model the
library itself merged, so a test can check the pack's result against the library's own maths.

The module tree is ComfyUI's NextDiT built with the tiny model's dimensions: NewBie's trainer trains the DiT in
the original NextDiT names, which are ComfyUI's names (pipeline/keymaps.py), so PEFT writes exactly the keys the
trainer writes (`base_model.model.layers.0.attention.qkv.lora_A.weight`, ...).
"""
from __future__ import annotations

from pathlib import Path

import torch

from devkit import tiny_models
from pipeline import loader
from pipeline.lora import TRAINER_TARGETS


def tiny_dit(seed: int = 0) -> dict:
    """The tiny DiT's weights in fp32 (the accuracy checks run in fp32)."""
    shapes = tiny_models._meta_state_shapes(tiny_models.TINY)["dit"]
    return tiny_models.random_state_dict(shapes, seed, torch.float32)


def build(dit: dict):
    """(ModelPatcher, unet config) of the tiny DiT, through the pack's loader (ComfyUI's Lumina2 model)."""
    parts = loader.NewBieParts(dict(dit), {}, {}, {}, None, None, {"dit": "tiny-lora-test"})
    patcher, cfg, _, _ = loader.build_model(parts, "fp32")
    return patcher, cfg


def _fresh_nextdit(dit: dict) -> torch.nn.Module:
    return build(dit)[0].model.diffusion_model


def _merged(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_peft(folder: Path, dit: dict, targets=TRAINER_TARGETS, r=4, alpha=2, seed=1, **config) -> tuple[Path, dict]:
    """`PeftModel.save_pretrained` into `folder` (adapter_model.safetensors + adapter_config.json), as the trainer's
    LoRA branch does; returns (the safetensors file, the DiT weights after PEFT's merge_and_unload)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False: random A and B (B is zero by default, which would make a no-op LoRA).
    model = get_peft_model(_fresh_nextdit(dit), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                         lora_dropout=0.0, bias="none", init_lora_weights=False,
                                                         **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)  # a change well above fp32 rounding but no blow-up
    folder = Path(folder)
    model.save_pretrained(str(folder))
    return folder / "adapter_model.safetensors", _merged(model.merge_and_unload())


def merge_peft(folder: Path, dit: dict) -> dict:
    """The DiT weights `dit` with the PEFT adapter saved in `folder` merged by PEFT (`from_pretrained` +
    `merge_and_unload`): PEFT's rule applied to other weights than the ones it was trained on (for stacking)."""
    from peft import PeftModel

    return _merged(PeftModel.from_pretrained(_fresh_nextdit(dit), str(folder)).merge_and_unload())


def write_lycoris(path: Path, dit: dict, algo="lokr", dim=4, alpha=2, factor=4, targets=TRAINER_TARGETS,
                  seed=1) -> tuple[Path, dict, torch.Tensor]:
    """`LycorisNetwork.save_weights` with the trainer's preset (train_newbie_lora.py setup_lora: fnmatch targets
    `*<module>`). Returns (the file, the DiT weights after LyCORIS's own `merge_to`, the output of one DiT call
    (devkit/dit_calls.py) through LyCORIS's own forward, which is what training optimised).

    Both references are needed: lycoris-lora 4.1's LoKr `merge_to` applies the alpha/rank scale twice
    (`get_diff_weight` scales the already scaled `get_weight`) while its forward applies it once, so the two agree
    only at scale 1, the trainer's lokr.toml setting (rank = alpha)."""
    from lycoris.wrapper import LycorisNetwork

    from devkit.dit_calls import dit_call

    torch.manual_seed(seed)
    patcher, cfg = build(dit)
    net = patcher.model.diffusion_model
    saved = {name: getattr(LycorisNetwork, name) for name in ("ENABLE_CONV", "TARGET_REPLACE_MODULE",
                                                              "TARGET_REPLACE_NAME", "USE_FNMATCH",
                                                              "TARGET_EXCLUDE_NAME")}
    try:
        LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "use_fnmatch": True,
                                     "target_name": [f"*{t}" for t in targets], "exclude_name": []})
        network = LycorisNetwork(net, multiplier=1.0, lora_dim=dim, alpha=alpha, network_module=algo,
                                 factor=factor)
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            if not p.abs().sum():  # the zero-initialised factor (LyCORIS starts as a no-op)
                p.normal_(0, 0.1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(path), dtype=None, metadata={"adapter_type": f"lyco_{algo}"})
    forward = dit_call(patcher, cfg)
    network.merge_to(1.0)
    network.restore()
    return path, _merged(net), forward


def save(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
