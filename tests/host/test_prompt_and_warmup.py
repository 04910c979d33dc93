"""XML Prompt Flatten and VRAM Warmup inside a real ComfyUI server on the tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from devkit import graphs
from devkit.harness import PromptFailed

pytestmark = pytest.mark.host


def _flatten_graph(text, mode, seed=11, prefix="xml", negative=graphs.NEGATIVE, latent=True):
    g = {
        "1": graphs.loader(),
        "2": {"class_type": "NewBieXMLPromptFlatten", "inputs": {"text": text, "mode": mode, "negative": negative,
                                                                 "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["4", 0], "seed": seed,
            "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
    return g


def _latent(server, entry):
    from safetensors.torch import load_file

    for out in entry["outputs"].values():
        for item in out.get("latents", []):
            return load_file(str(server.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"]
    raise AssertionError(f"no latent in {entry['outputs']}")


def test_official_differs_from_raw_and_raw_equals_upstream_encoding(server):
    official = _latent(server, server.run(_flatten_graph(graphs.XML_PROMPT, "official", prefix="off")))
    raw = _latent(server, server.run(_flatten_graph(graphs.XML_PROMPT, "raw", prefix="raw")))
    assert not np.allclose(official.numpy(), raw.numpy()), "official and raw conditioning gave the same result"
    # raw mode is upstream's behaviour: the same text to both encoders, as CLIPTextEncode does.
    upstream = _flatten_graph(graphs.XML_PROMPT, "raw", prefix="up")
    upstream["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": graphs.XML_PROMPT, "clip": ["1", 1]}}
    upstream["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": graphs.NEGATIVE, "clip": ["1", 1]}}
    upstream["5"]["inputs"]["negative"] = ["3", 0]
    via_clip_text_encode = _latent(server, server.run(upstream))
    assert np.array_equal(raw.numpy(), via_clip_text_encode.numpy())


def test_text_outputs_are_the_documented_strings(server):
    from pipeline import xml_prompt

    g = {"2": {"class_type": "NewBieXMLPromptFlatten", "inputs": {"text": graphs.XML_PROMPT, "mode": "official",
                                                                  "negative": ""}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
         "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}
    if "PreviewAny" not in server.get("/object_info"):
        pytest.skip("this host has no PreviewAny node to show a STRING")
    entry = server.run(g)
    texts = json.dumps(entry["outputs"])
    assert json.dumps(xml_prompt.SYSTEM_PROMPT_XML + graphs.XML_PROMPT)[1:-1] in texts


def test_malformed_prompt_fails_with_line_and_column_and_server_goes_on(server):
    bad = "<character_1>\n  <appearance>blue_hair\n</character_1>"
    with pytest.raises(PromptFailed) as err:
        server.run(_flatten_graph(bad, "official", prefix="bad"))
    message = str(err.value)
    assert "line 2, column 3" in message and "<appearance>" in message, message
    ok = server.run(_flatten_graph(graphs.XML_PROMPT, "official", prefix="after-bad"))
    assert _latent(server, ok) is not None


def test_warmup_passes_the_model_through_without_changing_the_image(server):
    plain = graphs.txt2img(seed=21, prefix=f"nowarm-{server.lane}")
    warmed = graphs.txt2img(seed=21, prefix=f"warm-{server.lane}")
    warmed["9"] = {"class_type": "NewBieVRAMWarmup", "inputs": {
        "model": ["1", 0], "width": 64, "height": 64, "batch_size": 1, "steps": 2, "clip": ["1", 1],
        "vae": ["1", 2]}}
    warmed["5"]["inputs"]["model"] = ["9", 0]
    a = server.output_images(server.run(plain))[0]
    b = server.output_images(server.run(warmed))[0]
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_loader_and_warmup_drive_the_progress_bar(server):
    g = graphs.txt2img(seed=41, prefix=f"progress-{server.lane}", precision="bf16")  # bf16: a fresh loader run
    g["9"] = {"class_type": "NewBieVRAMWarmup", "inputs": {
        "model": ["1", 0], "width": 64, "height": 64, "batch_size": 1, "steps": 3}}
    g["5"]["inputs"]["model"] = ["9", 0]
    _, events = server.run_with_events(g)
    progress = [e["data"] for e in events if e.get("type") == "progress"]
    assert {"node": "1", "max": 3} in [{"node": p.get("node"), "max": p["max"]} for p in progress], progress
    assert any(p.get("node") == "9" and p["max"] == 3 for p in progress), progress
