"""What a test needs of the ComfyUI host, checked by the host's own modules and the product's own checks: the test is
skipped, with the reason, on a host without it (v0.8 has neither dynamic VRAM nor the int8 format)."""
from __future__ import annotations

import pytest


def quantization_or_skip(precision: str, option: str = "precision") -> None:
    """Skips the test where the host lacks what the quantized `precision` needs for the loader's `option` (v0.8 has
    no int8 format), by the product's own check and with its message (pipeline/compat.py; test_te_quantize holds
    that message)."""
    from pipeline import compat, quantize

    try:
        if option == "text_encoder_precision":
            compat.require_text_encoder_quantization(precision)
        compat.quant_layout(quantize.FORMATS[precision], precision, option)
    except compat.QuantizationUnavailable as e:
        pytest.skip(str(e))


def dynamic_vram_module():
    """The host's `comfy.memory_management` with its dynamic-VRAM switch (`aimdo_enabled`); skips the test on a
    host without them (v0.8 has neither the switch nor the module)."""
    memory_management = pytest.importorskip("comfy.memory_management",
                                            reason="this host has no dynamic VRAM (ComfyUI v0.8)")
    if not hasattr(memory_management, "aimdo_enabled"):
        pytest.skip("this host has no dynamic VRAM (ComfyUI v0.8)")
    return memory_management
