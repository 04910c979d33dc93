"""Reading model files safely and telling which part of NewBie a state dict is.

Only safetensors are read: pickle-based formats (.ckpt, .pt, .pth, .bin) can run code when loaded and are
refused with a message. The header is checked before handing the file to ComfyUI's reader, so a truncated
or foreign file gets an error that names it and says what was expected.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_MAX_HEADER = 100 * 1024 * 1024


def check_safetensors(path: str | os.PathLike, expected: str) -> dict:
    """Validate that `path` is a complete safetensors file; return its header (name -> dtype/shape/offsets)."""
    header = _header(path, expected)
    header.pop("__metadata__", None)
    return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's safetensors metadata (string -> string; empty when it has none)."""
    meta = _header(path, "a safetensors file").get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _header(path: str | os.PathLike, expected: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "file not found", expected)
    if p.is_dir():
        raise ModelFileError(p, "is a folder, not a file", expected)
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelFileError(p, "pickle-based files are refused because loading them can run arbitrary code; "
                                "use the .safetensors release of this model", expected)
    if suffix not in SAFETENSORS_SUFFIXES:
        raise ModelFileError(p, f"unsupported file type '{suffix}'", f"{expected} as .safetensors")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(p, f"file is empty or truncated ({size} bytes)", expected)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise ModelFileError(p, "not a valid safetensors file (bad header length: truncated or another format)",
                                 expected)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(p, "safetensors header is not valid JSON (corrupt file)", expected) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFileError(p, f"file is truncated: {size} bytes on disk, the header describes {8 + n + end}",
                             expected)
    return header


def load_state_dict(path: str | os.PathLike, expected: str) -> dict:
    """Load a validated safetensors file with ComfyUI's own reader (which knows its memory modes)."""
    check_safetensors(path, expected)
    import comfy.utils

    try:
        return comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as e:  # the reader's own errors, re-raised naming the file
        raise ModelFileError(path, f"could not be read: {e}", expected) from e


# Keys that identify well-known checkpoints, so a wrong pick gets a useful message.
_SIGNATURES = (
    ("NewBie DiT (Next-DiT)", ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")),
    ("Gemma-3 text encoder", ("model.layers.0.self_attn.q_norm.weight", "model.embed_tokens.weight")),
    ("Jina CLIP v2 text encoder", ("model.encoder.layers.0.mixer.Wqkv.weight",)),
    ("FLUX/SD VAE", ("decoder.conv_in.weight",)),
    ("SD1/SDXL UNet checkpoint", ("model.diffusion_model.input_blocks.0.0.weight",)),
    ("SD1/SDXL UNet", ("input_blocks.0.0.weight",)),
    ("FLUX DiT checkpoint", ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight",)),
    ("FLUX DiT", ("double_blocks.0.img_attn.qkv.weight",)),
    ("SD3 MMDiT", ("joint_blocks.0.x_block.attn.qkv.weight",)),
    ("CLIP-L/G text encoder", ("text_model.encoder.layers.0.self_attn.q_proj.weight",)),
    ("T5 text encoder", ("encoder.block.0.layer.0.SelfAttention.q.weight",)),
)


def identify(keys) -> str:
    """A human name for what a state dict holds, from its keys."""
    keys = set(keys)
    for name, needed in _SIGNATURES:
        if all(k in keys for k in needed):
            return name
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a full checkpoint of another model family"
    return "an unknown model"


def strip_prefix(sd: dict, prefixes) -> dict:
    """Remove the first matching prefix (e.g. 'model.diffusion_model.') from every key that has it."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd
