"""The pack inside a real ComfyUI server: node schemas, a full text-to-image graph, broken inputs."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from devkit import graphs
from devkit.harness import PromptFailed

pytestmark = pytest.mark.host

NODE_IDS = ["NewBieLoader", "NewBieXMLPromptFlatten", "NewBieVRAMWarmup", "NewBieEulerAncestralSampler",
            "NewBieOOMGuard"]


def test_object_info_lists_the_pack_nodes(server):
    info = server.get("/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"missing nodes {missing}; server log:\n{server.log_tail()}"
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] == "NewBie"
        assert node["output"], f"{node_id} has no outputs"
        assert node["input"].get("required") or node["input"].get("optional"), f"{node_id} has no inputs"
    loader = info["NewBieLoader"]
    assert loader["output"] == ["MODEL", "CLIP", "VAE", "STRING"]
    assert graphs.TINY_DIT in loader["input"]["required"]["diffusion_model"][0] or \
        graphs.TINY_DIT in str(loader["input"]["required"]["diffusion_model"])


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt2img_with_native_nodes_is_deterministic(server):
    graph = graphs.txt2img(seed=7, width=64, height=96, prefix=f"e2e-{server.lane}")
    first = server.output_images(server.run(graph))
    graph["5"]["inputs"]["seed"] = 8  # a different prompt in between, so nothing is served from cache
    server.run(graph)
    graph["5"]["inputs"]["seed"] = 7
    graph["7"]["inputs"]["filename_prefix"] = f"e2e-again-{server.lane}"
    second = server.output_images(server.run(graph))
    assert len(first) == 1 and len(second) == 1
    a, b = _pixels(first[0]), _pixels(second[0])
    assert a.shape == (96, 64, 3)
    assert a.std() > 0, "image is flat"
    assert np.array_equal(a, b), "same graph and seed gave different pixels"


@pytest.mark.parametrize("case", ["missing", "truncated", "foreign", "pickle"])
def test_broken_model_file_fails_only_that_prompt(server, models_root, case):
    bad_dir = models_root / "diffusion_models"
    if case == "missing":
        name = "does-not-exist.safetensors"
        expect = name  # ComfyUI's own validation refuses a value that is not in the list
    elif case == "truncated":
        name = "newbie-truncated.safetensors"
        data = (bad_dir / graphs.TINY_DIT).read_bytes()
        (bad_dir / name).write_bytes(data[: len(data) // 2])
        expect = "truncated"
    elif case == "foreign":
        name = "sdxl-like.safetensors"
        import torch
        from safetensors.torch import save_file
        save_file({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), "input_blocks.0.0.bias": torch.zeros(320)},
                  str(bad_dir / name))
        expect = "SD1/SDXL UNet"
    else:
        name = "newbie.ckpt"
        (bad_dir / name).write_bytes(b"\x80\x04not really a pickle")
        expect = "pickle"
    graph = graphs.txt2img(prefix=f"bad-{case}")
    graph["1"]["inputs"]["diffusion_model"] = name
    with pytest.raises(PromptFailed) as err:
        server.run(graph)
    message = str(err.value) + str(err.value.details)
    assert expect in message, message
    if case != "missing":
        assert name in message, message
    # The server goes on serving: the next good prompt succeeds.
    ok = server.run(graphs.txt2img(seed=3, prefix=f"after-{case}"))
    assert server.output_images(ok)


def test_folder_layout_gives_the_same_image_as_single_files(server):
    """Both layouts hold the same weights (tiny_models.write_all), so the pictures must be identical."""
    single = server.output_images(server.run(graphs.txt2img(seed=5, prefix=f"single-{server.lane}")))
    folder = server.output_images(server.run(graphs.txt2img(seed=5, prefix=f"folder-{server.lane}",
                                                            diffusion_model=graphs.TINY_FOLDER)))
    assert np.array_equal(_pixels(single[0]), _pixels(folder[0]))


def test_loader_report_names_precision_and_files(server):
    graph = {"1": graphs.loader(precision="bf16"),
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}}
    info = server.get("/object_info")
    if "PreviewAny" not in info:
        pytest.skip("this host has no PreviewAny node to show a STRING")
    entry = server.run(graph)
    text = json.dumps(entry["outputs"])
    assert "weights bf16" in text and graphs.TINY_DIT in text
    assert "attention: PyTorch SDPA" in text  # the host runs on a CPU: never flash-attn-4 (pipeline/sdpa.py)
    # this host's JointAttention passes its key/value copies side by side (pipeline/kv_repeat.py's probe)
    assert "2 copies of each key/value head go to flash-attn-4 as one" in text


def test_folder_with_a_single_file_override(server):
    """A folder layout whose VAE and Gemma are replaced by single files picked in the node."""
    graph = graphs.txt2img(seed=5, prefix=f"override-{server.lane}", diffusion_model=graphs.TINY_FOLDER,
                           vae=graphs.TINY_VAE, gemma=graphs.TINY_GEMMA)
    single = graphs.txt2img(seed=5, prefix=f"override-ref-{server.lane}")
    a = server.output_images(server.run(graph))[0]
    b = server.output_images(server.run(single))[0]
    assert np.array_equal(_pixels(a), _pixels(b))


def test_vram_budget_streams_the_dit_and_gives_the_same_image(server):
    """A budget far below the tiny DiT's size (1 MiB, the smallest cap) makes ComfyUI stream its layers each
    step; the picture must not change, and the loader's report says what was capped. The negative prompt is the
    positive one: prompts of different lengths would run as two calls a step resident and as one padded call
    streamed (pipeline/cfg_batch.py), equal only to fp16 rounding."""
    prompts = {"positive": graphs.XML_PROMPT, "negative": graphs.XML_PROMPT}
    free = server.output_images(server.run(graphs.txt2img(seed=9, prefix=f"budget-free-{server.lane}", **prompts)))
    graph = graphs.txt2img(seed=9, prefix=f"budget-{server.lane}", vram_budget_gb=0.0001, **prompts)
    graph["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}
    entry = server.run(graph)
    assert np.array_equal(_pixels(free[0]), _pixels(server.output_images(entry)[0]))
    assert "at most 0.00 GiB of DiT weights on the GPU" in json.dumps(entry["outputs"])


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_block_compile_gives_the_same_image_and_compiles_once(server, precision):
    """compile: blocks (pipeline/block_compile.py) with inductor on the CPU, in the default fp16 (its overflow-safe
    path inside the compiled blocks) and in fp32: the picture matches the eager one up to rounding, the report says
    so, and a second run with a new seed compiles nothing new."""
    eager = server.output_images(server.run(graphs.txt2img(seed=13, precision=precision,
                                                           prefix=f"eager-{precision}-{server.lane}")))
    runs = []
    for seed in (13, 14):
        graph = graphs.txt2img(seed=seed, precision=precision, compile="blocks",
                               prefix=f"compiled-{precision}-{seed}-{server.lane}")
        graph["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}
        runs.append(server.run(graph))
    compiled = _pixels(server.output_images(runs[0])[0]).astype(int)
    diff = np.abs(compiled - _pixels(eager[0]).astype(int))
    assert diff.max() <= 2, f"compiled blocks changed the picture (up to {diff.max()} levels)"
    assert "transformer blocks compiled on their own" in json.dumps(runs[0]["outputs"])
    counts = [line for line in server.log_tail(400).splitlines() if "NewBie block compile:" in line]
    assert len(counts) >= 2 and "compiled in this sampling run" in counts[-1], counts
    assert " 0 graphs compiled in this sampling run" in counts[-1], f"the second run compiled again: {counts}"
    # the calls met before in a run skipped the weights' guards (pipeline/guard_skip.py), and the picture held
    assert "Dynamo guards: the weights' checked at the first call of each kind" in json.dumps(runs[0]["outputs"])
    skips = [line for line in server.log_tail(400).splitlines() if "skipped Dynamo's weight guards" in line]
    assert skips and re.search(r"compiled blocks: [1-9]\d* DiT calls of this run skipped Dynamo's weight guards$",
                               skips[-1].rstrip()), skips
