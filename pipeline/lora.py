"""LoRA files for NewBie's DiT -> patches on ComfyUI's MODEL, with every tensor either applied or named.

What NewBie's own trainer writes (NewBieAI-Lab/NewbieLoraTrainer, `train_newbie_lora.py`: `setup_lora`,
`save_lora_model`), training the DiT in its original NextDiT module names (which are ComfyUI's names too,
see pipeline/keymaps.py):
- PEFT branch: `PeftModel.save_pretrained` -> `adapter_model.safetensors` with keys
  `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (DoRA adds `.lora_magnitude_vector`), and
  `adapter_config.json` with `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `use_dora`.
  The scale lives only in the JSON: PEFT applies `lora_alpha / r` (`/ sqrt(r)` with rslora).
- LyCORIS branch (`adapter_type = "lyco_lokr"`): `LycorisNetwork.save_weights` -> keys
  `lycoris_<module with dots as underscores>.lokr_w1` / `.lokr_w2` (or their `_a`/`_b` factors) and `.alpha`.

Upstream's key map for Lumina-2 models (`comfy.lora.model_lora_keys_unet`) knows `diffusion_model.<module>`,
`lora_unet_<module_>` and diffusers names (`transformer.`, `lycoris_`, bare), but not `base_model.model.<module>`
and, for the fused `attention.qkv`/`attention.out`, not `lycoris_<module_>`: with LoraLoaderModelOnly those keys
are skipped with a log line. Here the pack adds those names to upstream's map (upstream's entries win) and
hands everything to ComfyUI's own `comfy.lora.load_lora` (its LoRA/LoKr/LoHa weight adapters do the maths) and
`ModelPatcher.clone()` + `add_patches`, exactly as ComfyUI's LoRA loader does, so it stacks with any LoRA node.

The one thing translated is PEFT's scale: ComfyUI scales a LoRA by `alpha / rank` with `rank` = rows of the
down matrix and `alpha` read from a `<module>.alpha` tensor (none: scale 1). So the pack writes that tensor as
`peft_scale * rank`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelFileError

log = logging.getLogger(__name__)

# The trainer's default targets (train_newbie_lora.py `default_target_modules`, lora.toml, lokr.toml).
TRAINER_TARGETS = ("attention.qkv", "attention.out", "feed_forward.w2", "time_text_embed.1", "clip_text_pooled_proj.1")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Tensor-name endings of the LoRA-family formats ComfyUI's load_lora reads (weight_adapter/*.py and the
# diff/set/norm patches in comfy/lora.py), plus PEFT's DoRA magnitude. What is left is the module name.
_SUFFIXES = tuple(sorted((
    ".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight", ".lora_A", ".lora_B",
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", "_lora.down.weight", "_lora.up.weight",
    ".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
    ".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".alpha", ".dora_scale", ".reshape_weight",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".oft_blocks", ".oft_R", ".rescale", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight",
), key=len, reverse=True))
_DOWN_SUFFIXES = (".lora_A.weight", ".lora_A")
_UP_SUFFIXES = (".lora_B.weight", ".lora_B")
_MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
_BLOCK_PREFIX = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.")


@dataclass
class LoraSource:
    """A LoRA file's tensors and, for PEFT files, the adapter_config.json found beside it."""
    path: Path
    tensors: dict
    config: dict | None = None
    config_path: Path | None = None
    notes: list = field(default_factory=list)


@dataclass
class LoraResult:
    model: object  # the patched clone (ModelPatcher)
    report: str
    applied: dict  # module kind -> number of modules patched
    unmapped: list  # (tensor name, why)


# -- reading ---------------------------------------------------------------------------------------------

def read_lora(path) -> LoraSource:
    """The file's tensors (safetensors only) and its PEFT config when one sits beside it."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(path, f"'{path.suffix}' is a pickle file, and loading a pickle can run code, so it is "
                                   "not read", "a .safetensors LoRA; convert it once with "
                                   "safetensors.torch.save_file(torch.load(p, weights_only=True), p_out) from a "
                                   "source you trust, or ask its author for the safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(path, f"'{path.suffix}' is not a LoRA format the pack reads", "a .safetensors file")
    if not path.is_file():
        raise ModelFileError(path, "no such file", "a LoRA in models/loras")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(path, f"cannot be read as safetensors ({e})", "a complete .safetensors file") from e
    if not tensors:
        raise ModelFileError(path, "holds no tensors", "a LoRA's tensors")
    source = LoraSource(path, tensors)
    source.config_path, source.config = find_adapter_config(path, source.notes)
    return source


def find_adapter_config(path: Path, notes: list) -> tuple[Path | None, dict | None]:
    """`<name>.json` beside the file, else `adapter_config.json` in its folder (where save_pretrained puts it).
    A JSON that is not an adapter config (e.g. a download manager's metadata) is ignored, with a note."""
    for cand in (path.with_suffix(".json"), path.parent / "adapter_config.json"):
        if not cand.is_file():
            continue
        try:
            data = json.loads(cand.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"{cand.name} beside the file is not readable JSON ({e}); ignored")
            continue
        if isinstance(data, dict) and ({"peft_type", "lora_alpha", "r"} & data.keys()):
            return cand, data
        notes.append(f"{cand.name} beside the file is not an adapter config (no peft_type, r or lora_alpha); ignored")
    return None, None


# -- key names -------------------------------------------------------------------------------------------

def split_key(key: str) -> tuple[str, str] | None:
    """`<module>.lora_A.weight` -> (`<module>`, `.lora_A.weight`); None for a name no LoRA format uses."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], suffix
    return None


def build_key_map(base_model) -> dict:
    """Upstream's LoRA key map for this model plus the names NewBie's trainer writes (upstream's entries win):
    `base_model.model.<m>` (PEFT on the bare NextDiT), `lycoris_<m_>` (LyCORIS's prefix, dots as underscores),
    `transformer.<m>` and bare `<m>` (the official folder's names), each -> `diffusion_model.<m>.weight`."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    ours = {}
    for key in base_model.state_dict():
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        module = key[len("diffusion_model."):-len(".weight")]
        for alias in (f"base_model.model.{module}", "lycoris_" + module.replace(".", "_"),
                      f"transformer.{module}", module):
            ours.setdefault(alias, key)
    for alias, key in ours.items():
        key_map.setdefault(alias, key)
    return key_map


def module_kind(model_key) -> str:
    """`diffusion_model.layers.3.attention.qkv.weight` -> `attention.qkv` (what the trainer's targets name)."""
    key = model_key[0] if isinstance(model_key, tuple) else model_key
    key = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
    key = key[:-len(".weight")] if key.endswith(".weight") else key
    return _BLOCK_PREFIX.sub("", key)


def looks_like(keys) -> str:
    """A short guess at what a LoRA that does not fit NewBie was made for, for the error message."""
    keys = list(keys)

    def has(*parts):
        return next((k for k in keys if any(p in k for p in parts)), None)

    guesses = (
        (("lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"),
         "an SDXL LoRA"),
        (("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"), "an SD 1.x/2.x LoRA"),
        (("double_blocks", "single_blocks", "single_transformer_blocks"), "a FLUX LoRA"),
        (("transformer_blocks",), "a LoRA for another diffusion transformer (transformer_blocks)"),
        (("lora_te_", "lora_te1_", "text_model.", "text_encoder"), "a text-encoder LoRA"),
        ((".self_attn.", ".mlp."), "a language-model LoRA (self_attn/mlp modules)"),
    )
    for parts, what in guesses:
        hit = has(*parts)
        if hit:
            module = (split_key(hit) or (hit, ""))[0]
            return f"{what} (keys {module}…)"
    sample = sorted({(split_key(k) or (k, ""))[0] for k in keys})[:3]
    return "a LoRA for another model (keys " + ", ".join(sample) + ")"


# -- PEFT scale ------------------------------------------------------------------------------------------

def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a pattern matches a module name or any dotted tail of it."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def peft_scale(config: dict, module: str) -> tuple[float, int]:
    """(PEFT's scaling of `module`, the rank the config gives it); `module` is relative to the base model."""
    r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
    return (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r), r


def _is_peft_lora_config(config: dict | None) -> bool:
    return bool(config) and str(config.get("peft_type", "LORA")).upper() == "LORA"


# -- planning and applying ------------------------------------------------------------------------------

@dataclass
class _Plan:
    tensors: dict  # what comfy.lora.load_lora reads (file tensors, plus alpha/dora_scale the pack adds)
    to_load: dict  # module name in the file -> model key (str or (key, offset))
    groups: dict  # module name in the file -> its tensor names in the file
    unmapped: list  # (tensor name, why)
    notes: list
    dora: list  # modules with PEFT's DoRA magnitude


def plan(source: LoraSource, key_map: dict) -> _Plan:
    """Group the file's tensors by module, find each module in the model, add the scale tensors PEFT left out."""
    groups, unmapped = {}, []
    for key in source.tensors:
        split = split_key(key)
        if split is None:
            unmapped.append((key, "not a tensor name any LoRA format ComfyUI reads uses"))
            continue
        groups.setdefault(split[0], []).append(key)
    to_load = {}
    for module, keys in groups.items():
        if module in key_map:
            to_load[module] = key_map[module]
        else:
            unmapped += [(k, f"no module '{module}' in this NewBie model") for k in sorted(keys)]
    tensors = dict(source.tensors)
    notes = list(source.notes)
    _add_peft_scales(source, tensors, to_load, groups, notes)
    dora = _add_dora_scales(tensors, to_load, groups, notes)
    return _Plan(tensors, to_load, groups, unmapped, notes, dora)


def _down_key(keys) -> str | None:
    return next((k for k in keys for s in _DOWN_SUFFIXES if k.endswith(s)), None)


def _add_peft_scales(source, tensors, to_load, groups, notes) -> None:
    peft_modules = [m for m in to_load if _down_key(groups[m]) and f"{m}.alpha" not in tensors]
    if not peft_modules:
        return
    config = source.config if _is_peft_lora_config(source.config) else None
    if config is None:
        notes.append("no adapter_config.json beside the file: scale 1 (alpha = rank) used for its "
                     f"{len(peft_modules)} lora_A/lora_B modules; PEFT keeps the real scale (lora_alpha / r) only "
                     "in adapter_config.json (NewBie's trainer default is rank 8, alpha 4: scale 0.5), so put it "
                     "beside the file as <name>.json or adapter_config.json")
        return
    mismatched, scales = [], set()
    for module in peft_modules:
        rank = tensors[_down_key(groups[module])].shape[0]
        relative = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        scale, config_rank = peft_scale(config, relative)
        if config_rank != rank:
            mismatched.append(f"{relative} (rank {rank} in the file, {config_rank} in the config)")
        # ComfyUI scales by alpha / rank, so this alpha gives PEFT's scale.
        tensors[f"{module}.alpha"] = torch.tensor(scale * rank)
        scales.add(round(scale, 6))
    kind = "rsLoRA " if config.get("use_rslora") else ""
    notes.append(f"{kind}scale from {source.config_path.name}: r {config.get('r')}, lora_alpha "
                 f"{config.get('lora_alpha')}" + (", with rank/alpha patterns" if config.get("rank_pattern")
                                                  or config.get("alpha_pattern") else "")
                 + f" -> scale {', '.join(str(s) for s in sorted(scales))}")
    if mismatched:
        notes.append(f"WARNING: {source.config_path.name} does not describe this file: " + "; ".join(mismatched[:5]))


def _add_dora_scales(tensors, to_load, groups, notes) -> list:
    """PEFT's DoRA magnitude m (one value per output row) -> ComfyUI's `dora_scale` (shape (out, 1)); returns the
    modules that carry one."""
    dora = [m for m in to_load if any(k.endswith(_MAGNITUDE_SUFFIXES) for k in groups[m])]
    for module in dora:
        key = next(k for k in groups[module] if k.endswith(_MAGNITUDE_SUFFIXES))
        tensors[f"{module}.dora_scale"] = tensors[key].reshape(-1, 1)
    if dora:
        notes.append(f"DoRA: {len(dora)} modules carry PEFT's magnitude vector")
    return dora


def _peft_dora_adapter(adapter):
    """ComfyUI's LoRA adapter for `adapter`'s tensors, made to follow PEFT's DoRA rule.

    PEFT: W' = m * (W + dW) / ||W + dW|| per output row. ComfyUI v0.8.0-v0.33.0 divide a per-row `dora_scale` by
    ||W||, the norm before the patch (probed by `_dora_divides_by_patched_norm`). So at patch time, on the weight
    ComfyUI hands over, this adapter lets ComfyUI's own plain LoRA adapter compute W + dW, and then hands ComfyUI's
    DoRA adapter m * ||W|| / ||W + dW||: PEFT's W', also when other LoRAs patched W first."""
    from comfy.weight_adapter.lora import LoRAAdapter

    class PeftDoraLoRAAdapter(LoRAAdapter):
        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            up, down, alpha, mid, magnitude, *rest = self.weights
            plain = LoRAAdapter(self.loaded_keys, (up, down, alpha, mid, None, *rest))
            patched = plain.calculate_weight(weight.clone(), key, 1.0, strength_model, offset, function,
                                             intermediate_dtype, original_weight)
            rows = weight.shape[0]
            ratio = (weight.float().reshape(rows, -1).norm(dim=1, keepdim=True)
                     / patched.float().reshape(rows, -1).norm(dim=1, keepdim=True))
            scale = magnitude.to(device=ratio.device, dtype=torch.float32).reshape(rows, 1) * ratio
            corrected = LoRAAdapter(self.loaded_keys, (up, down, alpha, mid, scale, *rest))
            return corrected.calculate_weight(weight, key, strength, strength_model, offset, function,
                                              intermediate_dtype, original_weight)

    return PeftDoraLoRAAdapter(adapter.loaded_keys, adapter.weights)


@functools.cache  # a property of the running ComfyUI: probed once
def _dora_divides_by_patched_norm() -> bool:
    """Feature check on ComfyUI's own DoRA code with a 2x2 example: a per-row dora_scale of 1 and a patch that
    doubles row 0 gives row 0 = 1 when ComfyUI divides by the patched weight's norm (PEFT's rule), 2 when it
    divides by the norm before the patch."""
    import comfy.lora

    down, up = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    adapter = comfy.lora.load_lora({"p.lora_up.weight": up, "p.lora_down.weight": down,
                                    "p.alpha": torch.tensor(1.0), "p.dora_scale": torch.ones(2, 1)},
                                   {"p": "w"}, log_missing=False)["w"]
    out = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], torch.eye(2), "w")
    return abs(float(out[0, 0]) - 1.0) < 1e-4


def apply_lora(model, path, strength: float) -> LoraResult:
    """A clone of `model` (ModelPatcher) with the LoRA's patches added at `strength`, and the report."""
    import comfy.lora
    from comfy.weight_adapter.lora import LoRAAdapter

    source = read_lora(path)
    key_map = build_key_map(model.model)
    p = plan(source, key_map)
    if not p.to_load:
        raise ModelFileError(source.path, "no tensor of this file maps onto NewBie's DiT; it looks like "
                             + looks_like(source.tensors),
                             "a LoRA trained for NewBie-image: NewbieLoraTrainer's PEFT or LoKr output, or a "
                             "ComfyUI-format NewBie/Lumina-2 LoRA")
    patches = comfy.lora.load_lora(p.tensors, p.to_load, log_missing=False)
    if p.dora and not _dora_divides_by_patched_norm():
        for module in p.dora:
            target = p.to_load[module]
            if type(patches.get(target)) is LoRAAdapter:  # PEFT's DoRA is always a plain LoRA
                patches[target] = _peft_dora_adapter(patches[target])
    applied, unmapped = {}, list(p.unmapped)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    for module, target in list(p.to_load.items()):
        want, have = delta_shape(p.tensors, module), shapes.get(target) if isinstance(target, str) else None
        if want is not None and have is not None and len(have) == 2 and want != have:
            unmapped += [(k, f"its change has shape {want[0]}x{want[1]}, the model's {target} is "
                             f"{have[0]}x{have[1]} (a LoRA for another model size?)") for k in sorted(p.groups[module])]
            del p.to_load[module]
            patches.pop(target, None)
    patched = model.clone()
    accepted = set(patched.add_patches(patches, strength))
    for module, target in p.to_load.items():
        keys = p.groups[module]
        if target not in patches:
            unmapped += [(k, "ComfyUI has no weight adapter for this set of tensors") for k in sorted(keys)]
            continue
        if target not in accepted:
            unmapped += [(k, f"the model has no weight {target}") for k in sorted(keys)]
            continue
        consumed = getattr(patches[target], "loaded_keys", None)
        if consumed is not None:
            consumed = set(consumed) | {f"{module}.alpha", f"{module}.dora_scale"}
            consumed |= {k for k in keys if k.endswith(_MAGNITUDE_SUFFIXES)}
            unmapped += [(k, "not used by ComfyUI's patch for this module") for k in sorted(keys) if k not in consumed]
        kind = module_kind(target)
        applied[kind] = applied.get(kind, 0) + 1
    if not applied:
        raise ModelFileError(source.path, "none of its modules could be applied: "
                             + "; ".join(f"{k}: {why}" for k, why in unmapped[:5]),
                             "a LoRA trained for NewBie-image")
    for key, why in unmapped:
        log.warning("NewBie LoRA %s: tensor %s not applied: %s", source.path.name, key, why)
    report = describe(source, strength, applied, unmapped, p.notes, _adapter_names(patches))
    log.info("%s", report)
    return LoraResult(patched, report, applied, unmapped)


def delta_shape(tensors: dict, module: str) -> tuple | None:
    """The (rows, columns) of the weight change a LoRA, LoKr or LoHa module describes, from its factors' shapes
    alone; None for other layouts. ComfyUI skips a patch whose shape does not fit the weight with only a log
    line at sampling time, so the pack checks this up front and reports such modules as not applied."""
    def get(suffix):
        return tensors.get(module + suffix)

    up = next((get(s) for s in _UP_SUFFIXES + (".lora_up.weight",) if get(s) is not None), None)
    down = next((get(s) for s in _DOWN_SUFFIXES + (".lora_down.weight",) if get(s) is not None), None)
    if up is not None and down is not None and up.dim() == 2 and down.dim() == 2:
        return up.shape[0], down.shape[1]
    if get(".hada_w1_a") is not None and get(".hada_w1_b") is not None and get(".hada_w1_b").dim() == 2:
        return get(".hada_w1_a").shape[0], get(".hada_w1_b").shape[1]
    w1 = get(".lokr_w1")
    w1_shape = tuple(w1.shape) if w1 is not None else None
    if w1_shape is None and get(".lokr_w1_a") is not None and get(".lokr_w1_b") is not None:
        w1_shape = (get(".lokr_w1_a").shape[0], get(".lokr_w1_b").shape[1])
    w2 = get(".lokr_w2")
    w2_shape = tuple(w2.shape) if w2 is not None else None
    if w2_shape is None and get(".lokr_w2_a") is not None and get(".lokr_w2_b") is not None \
            and get(".lokr_t2") is None:
        w2_shape = (get(".lokr_w2_a").shape[0], get(".lokr_w2_b").shape[1])
    if w1_shape and w2_shape and len(w1_shape) == len(w2_shape) == 2:
        return w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1]
    return None


def _adapter_names(patches: dict) -> list[str]:
    names = {type(v).__name__ if not isinstance(v, tuple) else v[0] for v in patches.values()}
    return sorted(names)


def describe(source: LoraSource, strength, applied: dict, unmapped: list, notes: list, adapters: list) -> str:
    lines = [f"LoRA {source.path.name} at strength {strength:g}: {sum(applied.values())} modules patched "
             f"({', '.join(adapters)})"]
    lines += [f"  {kind}: {count}" for kind, count in sorted(applied.items())]
    lines += [f"note: {n}" for n in notes]
    if unmapped:
        lines.append(f"NOT APPLIED: {len(unmapped)} tensors")
        lines += [f"  {key}: {why}" for key, why in unmapped]
    else:
        lines.append("every tensor of the file was applied")
    return "\n".join(lines)
