"""The example workflows (example_workflows/, UI format) as ComfyUI serves and runs them: the template browser
lists them, their API twins (tests/workflows/) are what tests/ui_to_api.py makes of them, and every one runs to
an image on the tiny model (sizes and steps made small here; the files keep realistic values)."""
from __future__ import annotations

import json
import urllib.request

import pytest

from devkit import harness
import ui_to_api
from pipeline.xml_prompt import parse_prompt

pytestmark = pytest.mark.host

EXAMPLES = sorted((harness.REPO / "example_workflows").glob("*.json"))
TWINS = harness.REPO / "tests" / "workflows"
REGENERATE = "python tests/ui_to_api.py example_workflows/*.json --out tests/workflows"
SMALL = {"width": 64, "height": 64, "steps": 2}


def _object_info(server) -> dict:
    if not hasattr(server, "object_info_cache"):
        server.object_info_cache = server.get("/object_info")
    return server.object_info_cache


def _small(prompt: dict) -> dict:
    """The same graph at 64x64, 2 steps and at most 2 images a batch."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        for name, value in SMALL.items():
            if isinstance(inputs.get(name), int):
                inputs[name] = value
        if isinstance(inputs.get("batch_size"), int):
            inputs["batch_size"] = min(inputs["batch_size"], 2)
    return out


def test_examples_cover_the_seven_cases():
    assert [p.stem for p in EXAMPLES] == ["newbie_16gb_basic", "newbie_8gb_fp8", "newbie_8gb_low_vram",
                                          "newbie_batch_oom_guard_warmup", "newbie_lora", "newbie_no_bf16_fp16",
                                          "newbie_two_characters"]
    assert sorted(p.name for p in TWINS.glob("*.json")) == [p.name for p in EXAMPLES]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_names_the_public_files_and_keeps_real_settings(example):
    workflow = json.loads(example.read_text())
    nodes = {node["type"]: node for node in workflow["nodes"]}
    dit, gemma, jina, vae, precision, _, budget, compile_mode = nodes["NewBieLoader"]["widgets_values"]
    assert budget == 0, "examples leave residency to ComfyUI (vram_budget_gb is for GPUs shared with other apps)"
    assert compile_mode == "auto", "examples compile on a CUDA GPU and stay eager on a CPU (the loader default)"
    assert [dit, gemma, jina, vae] == list(ui_to_api.PUBLIC_TO_TINY)
    expected = "fp8" if "fp8" in example.stem else "fp16" if "fp16" in example.stem or "8gb" in example.stem else "bf16"
    assert precision == expected
    width, height, _ = nodes["EmptySD3LatentImage"]["widgets_values"]
    assert width * height >= 1024 * 832
    steps = [n["widgets_values"][2] for n in workflow["nodes"] if n["type"] == "KSampler"] + \
            [n["widgets_values"][1] for n in workflow["nodes"] if n["type"] == "BasicScheduler"]
    assert steps and min(steps) >= 20
    parse_prompt(nodes["NewBieXMLPromptFlatten"]["widgets_values"][0])  # raises on a malformed example


def test_template_browser_lists_and_serves_every_example(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get(harness.PACK_NAME, [])) == [p.stem for p in EXAMPLES], listed
    for example in EXAMPLES:
        base = f"/api/workflow_templates/{harness.PACK_NAME}/{example.stem}"
        assert server.get(base + ".json") == json.loads(example.read_text())
        # The template browser shows <name>.jpg as the card's picture.
        with urllib.request.urlopen(server.url + base + ".jpg", timeout=30) as answer:
            assert answer.headers["Content-Type"] == "image/jpeg" and answer.read(3) == b"\xff\xd8\xff"


def _without_titles(prompt: dict) -> dict:
    # A node's default title is its display name, which can differ between ComfyUI versions.
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_api_twin_is_the_converted_example(server, example):
    converted = ui_to_api.with_tiny_models(ui_to_api.ui_to_api(json.loads(example.read_text()), _object_info(server)))
    twin = json.loads((TWINS / example.name).read_text())
    assert _without_titles(converted) == _without_titles(twin), \
        f"tests/workflows/{example.name} is out of date; regenerate with: {REGENERATE}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_to_an_image_on_the_tiny_model(server, example):
    prompt = _small(json.loads((TWINS / example.name).read_text()))
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"{example.stem}-{server.lane}"
    entry = server.run(prompt)
    images = server.output_images(entry)
    batch = max(node["inputs"]["batch_size"] for node in prompt.values() if "batch_size" in node["inputs"]
                and node["class_type"] == "EmptySD3LatentImage")
    assert len(images) == batch and all(p.is_file() for p in images), entry.get("outputs")
    # Every report the example shows (Preview as Text) came back, and says what it should.
    for node_id, node in prompt.items():
        if node["class_type"] != "PreviewAny":
            continue
        text = "".join(entry["outputs"].get(node_id, {}).get("text", []))
        assert text.strip(), f"{example.name}: no text from node {node_id} ({node['_meta']['title']})"
        source = prompt[node["inputs"]["source"][0]]["class_type"]
        expected = {"NewBieLoader": "weights fp16", "NewBieVRAMWarmup": "steps at 64x64",
                    "NewBieXMLPromptFlatten": "characters: 2",
                    "NewBieLoraLoader": "every tensor of the file was applied"}.get(source, "")
        assert expected in text, f"{example.name}: the {source} report reads {text!r}"
