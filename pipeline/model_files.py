"""Finding NewBie's files in ComfyUI's model folders: the choices the loader node offers and what 'auto' picks."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ModelFileError

FOLDER_PREFIX = "folder: "
AUTO = "auto"

# Words that mark each part in the usual file names (Comfy-Org repackage, official repo, users' renames).
_HINTS = {"gemma": ("gemma",), "jina": ("jina",), "vae": ("ae.", "flux", "vae")}


def newbie_folders(diffusers_roots) -> list[str]:
    """Sub-folders of ComfyUI's `diffusers` model folders that hold a NewBie model_index.json."""
    found = []
    for root in diffusers_roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            index = Path(root) / name / "model_index.json"
            try:
                if "newbie" in json.loads(index.read_text()).get("_class_name", "").lower():
                    found.append(name)
            except (OSError, ValueError):
                continue
    return found


def resolve_folder(name: str, diffusers_roots) -> Path:
    for root in diffusers_roots:
        p = Path(root) / name
        if (p / "model_index.json").exists():
            return p
    raise ModelFileError(name, "folder not found in the diffusers model folders",
                         "a NewBie folder with model_index.json under models/diffusers/")


def pick_auto(part: str, filenames: list[str], where: str) -> str:
    """The one file whose name marks it as `part`; an error naming the candidates if none or several do."""
    hits = [f for f in filenames if any(h in os.path.basename(f).lower() for h in _HINTS[part])]
    if part == "vae":  # prefer the canonical FLUX name
        exact = [f for f in hits if os.path.basename(f) == "ae.safetensors"]
        hits = exact or hits
    if len(hits) == 1:
        return hits[0]
    what = {"gemma": "Gemma-3 text encoder", "jina": "Jina CLIP v2 text encoder", "vae": "FLUX VAE"}[part]
    if not hits:
        raise ModelFileError(where, f"'auto' found no {what} (no file name containing "
                                    f"{' or '.join(repr(h) for h in _HINTS[part])})",
                             f"the {what} file there, or pick it in the node")
    raise ModelFileError(where, f"'auto' found several candidates for the {what}: {', '.join(hits)}",
                         "exactly one; pick the file in the node")
