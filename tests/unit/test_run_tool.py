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



def test_a_server_log_whose_key_value_check_failed_is_flagged(tmp_path):
    """The line pipeline/kv_repeat.py logs when flash-attn-4 keeps ComfyUI's copies is counted and printed as a
    warning with the configuration (every server kept them until run108's failure was found)."""
    import inspect

    from pipeline import kv_repeat

    assert run.LOG_EVENTS["kv_copies_kept"] in inspect.getsource(kv_repeat), "the text kv_repeat.factor logs"
    log = tmp_path / "server.log"
    log.write_text("[INFO] NewBie attention: key/value heads stay repeated (checking ComfyUI's repeat failed: ...)\n"
                   f"[INFO] NewBie attention: ComfyUI's {run.LOG_EVENTS['kv_copies_kept']}\n")
    events = run.log_events(log, tmp_path / "logs" / "copy.log")
    assert run.warnings_of(events) == {"kv_copies_kept": 1}
    assert (tmp_path / "logs" / "copy.log").read_text() == log.read_text()
    assert run.warnings_of({"kv_copies_kept": 0, "oom": 0}) == {}
