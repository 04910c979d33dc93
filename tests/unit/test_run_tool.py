"""bench/run.py's API graphs: the loader's inputs each configuration asks for."""
from __future__ import annotations

import bench_scripts

run = bench_scripts.load("run")
NAMES = {"dit": "dit.safetensors", "gemma": "gemma.safetensors", "jina": "jina.safetensors", "vae": "ae.safetensors"}


def _loader_inputs(config: str) -> dict:
    kind, precision, _, compile_mode = run.CONFIGS[config]
    g = run.graph(kind, precision, NAMES, 1, 1024, 1024, 25, compile_mode=compile_mode,
                  te_precision=run.TE_PRECISIONS.get(config, "auto"))
    return g["1"]["inputs"]


def test_the_text_encoder_configurations_quantize_gemma_and_the_others_leave_it_to_comfyui():
    assert _loader_inputs("pack-fp8-tefp8")["text_encoder_precision"] == "fp8"
    assert _loader_inputs("pack-bf16-teint8")["text_encoder_precision"] == "int8"
    assert _loader_inputs("pack-bf16-teint8")["precision"] == "bf16"
    assert _loader_inputs("pack-fp8")["text_encoder_precision"] == "auto"
    assert _loader_inputs("pack-fp8-w2bf16")["text_encoder_precision"] == "auto"
