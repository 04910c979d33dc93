"""Every difference between the ComfyUI versions the pack supports (v0.8.0 to v0.33.0 and newer), in one place.

Each probe asks the host for a feature (a parameter, a class, a method), never for a version string, so a newer
ComfyUI that keeps the feature keeps working. Import ComfyUI lazily: this module is imported before the host is.
"""
from __future__ import annotations

import functools
import inspect


def _takes(func, name: str) -> bool:
    return name in inspect.signature(func).parameters


def set_inference_dtype(model_config, dtype, manual_cast, device) -> None:
    """model_config.set_inference_dtype; v0.33 also takes the device (it decides fp8/fp16 support per device)."""
    if _takes(model_config.set_inference_dtype, "device"):
        model_config.set_inference_dtype(dtype, manual_cast, device=device)
    else:
        model_config.set_inference_dtype(dtype, manual_cast)


def core_patcher_class():
    """ComfyUI's default ModelPatcher: the dynamic-VRAM one where main.py enabled it (v0.33), else the plain one."""
    import comfy.model_patcher

    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def load_weights_kwargs(model, patcher) -> dict:
    """Extra arguments for BaseModel.load_model_weights: dynamic patchers take the file's tensors as they are
    (assign=True, v0.33), others copy them."""
    if _takes(model.load_model_weights, "assign") and hasattr(patcher, "is_dynamic"):
        return {"assign": patcher.is_dynamic()}
    return {}


@functools.cache
def clip_takes_disable_dynamic() -> bool:
    """comfy.sd.CLIP(..., disable_dynamic=...) exists where dynamic VRAM does (v0.33)."""
    import comfy.sd

    return _takes(comfy.sd.CLIP.__init__, "disable_dynamic")


def loaded_size(patcher) -> int:
    """Bytes of the patcher's weights on its load device (0 where the host cannot say)."""
    return patcher.loaded_size() if hasattr(patcher, "loaded_size") else 0


def can_partially_unload(patcher) -> bool:
    return hasattr(patcher, "partially_unload")


class QuantizationUnavailable(RuntimeError):
    """The host ComfyUI lacks what a quantized precision needs."""


def _quant_algo(fmt: str, precision: str) -> dict:
    """ComfyUI's definition of a quantized format (comfy.quant_ops.QUANT_ALGOS), with its layout class present
    (comfy_kitchen imported) and the mixed-precision operations that load it; else a clear error."""
    import comfy.ops
    import comfy.quant_ops as quant_ops
    import comfy.utils

    algo = getattr(quant_ops, "QUANT_ALGOS", {}).get(fmt)
    missing = None
    if algo is None:
        missing = f"the quantization format '{fmt}' (comfy/quant_ops.py)"
    elif quant_ops.get_layout_class(algo["comfy_tensor_layout"]) is None:
        missing = f"comfy_kitchen's {algo['comfy_tensor_layout']} (the comfy-kitchen package failed to import)"
    elif not (hasattr(comfy.ops, "mixed_precision_ops") and hasattr(comfy.utils, "convert_old_quants")):
        missing = "mixed-precision operations (comfy.ops.mixed_precision_ops)"
    if missing:
        raise QuantizationUnavailable(
            f"precision '{precision}' needs {missing}, which this ComfyUI does not have. Update ComfyUI (and "
            f"install its requirements, comfy-kitchen included), or pick precision fp16 or bf16.")
    return algo


def quant_layout(fmt: str, precision: str):
    """The layout class ComfyUI uses for `fmt` (e.g. TensorCoreFP8E4M3Layout for float8_e4m3fn)."""
    import comfy.quant_ops as quant_ops

    return quant_ops.get_layout_class(_quant_algo(fmt, precision)["comfy_tensor_layout"])


def quant_storage_dtype(fmt: str, precision: str):
    return _quant_algo(fmt, precision)["storage_t"]

