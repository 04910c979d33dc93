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


def is_dynamic(patcher) -> bool:
    """Whether the patcher is a dynamic-VRAM one (v0.33's ModelPatcherDynamic); hosts without dynamic VRAM have none."""
    return hasattr(patcher, "is_dynamic") and patcher.is_dynamic()


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


# The loader input a quantized precision was picked in -> what to pick instead on a host without it.
_INSTEAD = {"precision": "precision fp16 or bf16", "text_encoder_precision": "text_encoder_precision auto"}


def _quant_algo(fmt: str, precision: str, option: str = "precision") -> dict:
    """ComfyUI's definition of a quantized format (comfy.quant_ops.QUANT_ALGOS), with its layout class present
    (comfy_kitchen imported) and the mixed-precision operations that load it; else a clear error naming the
    loader's `option` where it was picked."""
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
            f"{option} '{precision}' needs {missing}, which this ComfyUI does not have. Update ComfyUI (and "
            f"install its requirements, comfy-kitchen included), or pick {_INSTEAD[option]}.")
    return algo


def quant_layout(fmt: str, precision: str, option: str = "precision"):
    """The layout class ComfyUI uses for `fmt` (e.g. TensorCoreFP8E4M3Layout for float8_e4m3fn)."""
    import comfy.quant_ops as quant_ops

    return quant_ops.get_layout_class(_quant_algo(fmt, precision, option)["comfy_tensor_layout"])


def quant_storage_dtype(fmt: str, precision: str):
    return _quant_algo(fmt, precision)["storage_t"]


@functools.cache
def _text_encoder_takes_quantization_metadata() -> bool:
    """Whether comfy.sd1_clip.SDClipModel builds ComfyUI's mixed-precision operations from
    model_options["quantization_metadata"] (how comfy.sd loads a quantized text-encoder file). Asked of the class
    itself: an SDClipModel around a stand-in transformer that only records the operations it was given."""
    import comfy.sd1_clip
    import torch

    class _Recorder(torch.nn.Module):
        num_layers = 1

        def __init__(self, config, dtype, device, operations):
            super().__init__()
            self.operations = operations

    probe = comfy.sd1_clip.SDClipModel(textmodel_json_config={}, model_class=_Recorder,
                                       model_options={"quantization_metadata": {"mixed_ops": True}})
    return getattr(probe.transformer.operations, "_quant_config", None) is not None


def require_text_encoder_quantization(precision: str) -> None:
    """A quantized text encoder needs the host to read model_options["quantization_metadata"]; else a clear
    error naming the loader's input and the fix."""
    if not _text_encoder_takes_quantization_metadata():
        raise QuantizationUnavailable(
            f"text_encoder_precision '{precision}' needs ComfyUI's quantized text encoders (model_options "
            f"'quantization_metadata' read by comfy.sd1_clip.SDClipModel), which this ComfyUI does not have. "
            f"Update ComfyUI, or pick {_INSTEAD['text_encoder_precision']}.")
