"""NewBieOOMGuard inside a real ComfyUI server: out-of-memory errors injected at chosen sampling steps and in
VAE decoding (devkit's fault node, devkit/faults.py, loaded into this module's server only) must leave the image
an uninterrupted run gives: bit-identical where the retry ran the same computation, within 1e-3 relative where
the batch was split (or ComfyUI tiled the decode). An unrecoverable fault fails that prompt only.

KSampler runs euler_ancestral, so a retry that drew noise again would change the image.
Each case gives the guard its own max_retries, so ComfyUI's cache cannot serve a case from the one before.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from devkit import graphs
from devkit import harness
from conftest import HOSTS, LANES
from devkit.harness import PromptFailed

pytestmark = pytest.mark.host

STEPS = 4


@pytest.fixture(scope="module", params=LANES or ["none"])
def fault_server(request, models_root, tmp_path_factory):
    """A server of its own that also loads devkit's fault node (the shared one does not)."""
    lane = request.param
    host = HOSTS.get(lane)
    if host is None:
        pytest.skip("no ComfyUI host found; looked in " + harness.where_looked())
    # NEWBIE_CFG_BATCH=always: the positive and the negative prompt as one call on this resident CPU model too,
    # so that the Guard's batch split (and its cutting of the caption paddings) is what these tests exercise.
    srv = harness.ComfyServer(host, tmp_path_factory.mktemp(f"oom-{lane}"), models_root,
                              extra_nodes=[harness.FAULT_NODES], env={"NEWBIE_CFG_BATCH": "always"})
    srv.lane = lane
    srv.start()
    yield srv
    srv.stop()


def guarded_txt2img(prefix: str, max_retries: int | None, allow_batch_split: bool = True, seed: int = 11,
                    negative: str = graphs.NEGATIVE) -> dict:
    """graphs.txt2img with NewBieOOMGuard between the loader and KSampler / VAEDecode (max_retries None: no
    guard), and the sampled latent saved too, for float comparisons."""
    graph = graphs.txt2img(seed=seed, steps=STEPS, cfg=4.0, sampler="euler_ancestral", prefix=prefix,
                           negative=negative)
    if max_retries is not None:
        graph["8"] = {"class_type": "NewBieOOMGuard", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "max_retries": max_retries, "allow_batch_split": allow_batch_split}}
        graph["5"]["inputs"]["model"] = ["8", 0]
        graph["6"]["inputs"]["vae"] = ["8", 1]
    graph["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}}
    return graph


class Result:
    def __init__(self, srv, entry, log_text):
        images = srv.output_images(entry)
        assert len(images) == 1, entry.get("outputs")
        self.pixels = np.asarray(Image.open(images[0]).convert("RGB"))
        latents = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
        assert len(latents) == 1, entry.get("outputs")
        self.latent = load_file(str(srv.output_dir / latents[0]["subfolder"] / latents[0]["filename"]))[
            "latent_tensor"].numpy()
        self.log = log_text
        self.recoveries = log_text.count("NewBie OOM guard: recovered")


def run_case(srv, prefix, max_retries, plan: dict | None, **graph_args) -> Result:
    """One prompt; with a fault plan (devkit/faults.py), devkit's fault node goes into its graph."""
    graph = guarded_txt2img(f"{prefix}-{srv.lane}", max_retries, **graph_args)
    if plan is not None:
        graph = graphs.with_faults(graph, plan)
    start = srv.log_path.stat().st_size if srv.log_path.exists() else 0
    entry = srv.run(graph)
    with open(srv.log_path, "rb") as f:
        f.seek(start)
        log_text = f.read().decode(errors="replace")
    return Result(srv, entry, log_text)


@pytest.fixture(scope="module")
def reference(fault_server):
    """The uninterrupted run without the guard; the guarded run without faults must be the very same."""
    plain = run_case(fault_server, "plain", None, None)
    assert plain.pixels.std() > 0, "image is flat"
    return plain


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_identical(result: Result, ref: Result):
    assert np.array_equal(result.latent, ref.latent), f"latent differs (rel {rel_err(result.latent, ref.latent)})"
    assert np.array_equal(result.pixels, ref.pixels), "pixels differ"


def assert_close(result: Result, ref: Result):
    assert rel_err(result.latent, ref.latent) <= 1e-3
    diff = np.abs(result.pixels.astype(int) - ref.pixels.astype(int))
    assert diff.max() <= 2 and rel_err(result.pixels, ref.pixels) <= 1e-3, f"max pixel diff {diff.max()}"


def test_guard_without_faults_changes_nothing(fault_server, reference):
    result = run_case(fault_server, "guarded", 5, None)
    assert_identical(result, reference)
    assert result.recoveries == 0


def recovered_steps(result: Result) -> set[int]:
    return {int(line.split("recovered step ")[1].split("/")[0])
            for line in result.log.splitlines() if "NewBie OOM guard: recovered step " in line}


# NewBie's positive and negative prompts differ in token count, so ComfyUI cannot batch them (CONDRegular
# shapes differ): each step is two model calls of one row, and a step's fault hits both calls.
@pytest.mark.parametrize("case, max_retries, plan, steps", [
    ("first-step", 6, {"steps": [0]}, {1}),
    ("last-step", 7, {"steps": [-1]}, {STEPS}),
    ("twice-same-step", 8, {"steps": [2], "times": 2}, {3}),
    ("two-steps", 9, {"steps": [1, 3]}, {2, 4}),
    ("one-call-three-times", 10, {"model_calls": [0], "times": 3}, {1}),
])
def test_retried_steps_give_the_same_image(fault_server, reference, case, max_retries, plan, steps):
    result = run_case(fault_server, case, max_retries, plan)
    assert recovered_steps(result) == steps, result.log
    assert result.recoveries >= len(steps)
    assert f"on retry {plan.get('times', 1)} after" in result.log
    assert "Injected by devkit's fault plan" in result.log
    assert_identical(result, reference)


def test_split_cfg_batch_gives_the_same_image_within_rounding(fault_server):
    # With the negative prompt equal to the positive one, ComfyUI batches cond and uncond into one call of
    # two rows. Four failures use up the three memory rungs; the fourth retry runs cond and uncond apart,
    # and they stay apart for the rest of the run.
    same = graphs.XML_PROMPT
    reference = run_case(fault_server, "split-reference", None, None, negative=same)
    result = run_case(fault_server, "split", 11, {"steps": [1], "times": 4}, negative=same)
    assert result.recoveries == 1, result.log
    assert "split the batch of 2 into 2 pieces of 1" in result.log
    assert_close(result, reference)


def test_vae_decode_retry_gives_the_same_image(fault_server, reference):
    result = run_case(fault_server, "vae-retry", 12, {"vae_decode": True, "times": 1})
    assert result.recoveries == 1, result.log
    assert "recovered VAE decode on retry 1" in result.log
    assert "tiled" not in result.log.lower()
    assert_identical(result, reference)


def test_vae_decode_beyond_the_ladder_falls_back_to_comfyui_tiling(fault_server, reference):
    # Three failures use up the guard's VAE ladder (try, empty cache, unload others); ComfyUI's VAE.decode
    # then decodes in tiles, which at 64x64 is one tile, so the image matches within rounding.
    result = run_case(fault_server, "vae-tiled", 13, {"vae_decode": True, "vae_times": 3})
    assert "retrying with tiled VAE decoding" in result.log
    assert np.array_equal(result.latent, reference.latent)
    assert_close(result, reference)


def test_unrecoverable_fault_fails_only_that_prompt(fault_server, reference):
    with pytest.raises(PromptFailed) as err:
        run_case(fault_server, "unrecoverable", 14, {"steps": [0], "unrecoverable": True})
    message = str(err.value)
    assert "KSampler" in message and "Out of memory at step 1/4" in message, message
    assert "needs about" in message and "is free on cpu" in message, message
    assert "Try a smaller resolution" in message, message
    # The whole ladder ran first, the batch split included: the pack batches NewBie's positive and negative
    # prompts into one call though their lengths differ (pipeline/cfg_batch.py).
    assert "after 4 retry(ies)" in message and "split the batch of 2 into 2 pieces of 1" in message, message
    # The server goes on serving: the next prompt (no fault node) gives the reference image.
    assert fault_server.alive()
    after = run_case(fault_server, "after-unrecoverable", 15, None)
    assert after.recoveries == 0
    assert_identical(after, reference)


def test_guard_schema_has_tooltips_and_outputs(fault_server):
    nodes = fault_server.get("/object_info")
    info = nodes["NewBieOOMGuard"]
    # devkit's fault node comes from this server's extra folder, not from the pack
    assert nodes["NewBieDevkitFaults"]["python_module"].split(".")[-1] != harness.PACK_NAME
    assert info["display_name"] == "OOM Guard" and info["category"] == "NewBie"
    assert info["output"] == ["MODEL", "VAE", "STRING"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"input {name} has no tooltip"
