"""NewBie LoRA Loader on a real server, with LoRAs written by PEFT and LyCORIS themselves in NewBie's trainer layout;
and what upstream's LoraLoaderModelOnly does with the same files (it skips them: see the last tests)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from devkit import graphs

pytestmark = pytest.mark.host

PEFT = "newbie-trainer-peft/adapter_model.safetensors"  # the trainer's output folder dropped into models/loras
LOKR = "newbie-trainer-lokr/adapter_model.safetensors"
MERGED_PEFT = "newbie-tiny-peft-merged.safetensors"
MERGED_LOKR = "newbie-tiny-lokr-merged.safetensors"
MERGED_BOTH = "newbie-tiny-both-merged.safetensors"
COMFY_FORMAT = "newbie-comfy-format.safetensors"


@pytest.fixture(scope="session")
def trainer_loras(models_root):
    """The tiny DiT as the server loads it (fp32 here), the trainer's PEFT LoRA and full-rank LoKr (lokr.toml) for it,
    and DiT files holding what each library merged, for the server to load as plain models."""
    import lora_files
    from safetensors.torch import load_file

    dit = {k: v.float() for k, v in load_file(str(models_root / "diffusion_models" / graphs.TINY_DIT)).items()}
    loras = models_root / "loras"
    _, peft_merged = lora_files.write_peft(loras / "newbie-trainer-peft", dit, r=4, alpha=2)
    _, lokr_merged, _ = lora_files.write_lycoris(loras / LOKR, dit, dim=114514, alpha=114514, factor=8, seed=3)
    both = {k: peft_merged[k] + lokr_merged[k] - dit[k] for k in dit}
    for name, sd in ((MERGED_PEFT, peft_merged), (MERGED_LOKR, lokr_merged), (MERGED_BOTH, both)):
        lora_files.save(models_root / "diffusion_models" / name, sd)
    lora_files.save(loras / "sdxl-style.safetensors", {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4)})
    (loras / "pickled-adapter.bin").write_bytes(b"\x80\x04N.")
    g = torch.Generator().manual_seed(9)  # a ComfyUI-format LoRA on one module, for mixed stacks
    rows, cols = dit["layers.1.feed_forward.w2.weight"].shape
    lora_files.save(loras / COMFY_FORMAT, {
        "diffusion_model.layers.1.feed_forward.w2.lora_down.weight": torch.randn(2, cols, generator=g) * 0.1,
        "diffusion_model.layers.1.feed_forward.w2.lora_up.weight": torch.randn(rows, 2, generator=g) * 0.1})
    return models_root


def _graph(chain=(), dit=graphs.TINY_DIT, prefix="lora", upstream=False):
    """Tiny text-to-latent (fp32 DiT) with NewBie LoRA Loader nodes (or LoraLoaderModelOnly) chained in front of
    KSampler; each report goes to a PreviewAny."""
    g = graphs.txt2img(seed=13, prefix=prefix, diffusion_model=dit, precision="fp32")
    del g["6"], g["7"]
    model = ["1", 0]
    for i, (name, strength, *kind) in enumerate(chain):
        node = str(20 + i)
        if upstream or kind == ["upstream"]:
            g[node] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": model, "lora_name": name, "strength_model": strength}}
        else:
            g[node] = {"class_type": "NewBieLoraLoader", "inputs": {"model": model, "lora_name": name,
                                                                    "strength": strength}}
            g[str(40 + i)] = {"class_type": "PreviewAny", "inputs": {"source": [node, 1]}}
        model = [node, 0]
    g["5"]["inputs"]["model"] = model
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return g


def _latent(server, entry):
    from safetensors.torch import load_file

    item = next(i for out in entry["outputs"].values() for i in out.get("latents", []))
    return load_file(str(server.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"].numpy()


def _run(server, graph):
    entry = server.run(graph)
    reports = ["".join(out.get("text", [])) for out in entry["outputs"].values() if out.get("text")]
    return _latent(server, entry), reports


def _close(a, b, tol=1e-4):
    return float(np.abs(a - b).max() / np.abs(b).max()) < tol


def test_trainer_loras_through_the_node_equal_the_library_merges(server, trainer_loras):
    lane = server.lane
    base, _ = _run(server, _graph(prefix=f"nl-base-{lane}"))
    peft, reports = _run(server, _graph([(PEFT, 1.0)], prefix=f"nl-peft-{lane}"))
    peft_ref, _ = _run(server, _graph(dit=MERGED_PEFT, prefix=f"nl-peft-ref-{lane}"))
    assert _close(peft, peft_ref) and not _close(peft, base, 1e-3)
    assert "14 modules patched" in reports[0] and "attention.qkv: 4" in reports[0], reports
    assert "scale 0.5" in reports[0] and "every tensor of the file was applied" in reports[0]
    lokr, _ = _run(server, _graph([(LOKR, 1.0)], prefix=f"nl-lokr-{lane}"))
    lokr_ref, _ = _run(server, _graph(dit=MERGED_LOKR, prefix=f"nl-lokr-ref-{lane}"))
    assert _close(lokr, lokr_ref)


def test_two_nodes_stack_and_strength_zero_is_the_base(server, trainer_loras):
    lane = server.lane
    both, reports = _run(server, _graph([(PEFT, 1.0), (LOKR, 1.0)], prefix=f"nl-both-{lane}"))
    both_ref, _ = _run(server, _graph(dit=MERGED_BOTH, prefix=f"nl-both-ref-{lane}"))
    assert _close(both, both_ref) and len(reports) == 2
    # Mixed with upstream's LoRA node, in either order: the same patches on the same weights.
    ours_first, _ = _run(server, _graph([(PEFT, 1.0), (COMFY_FORMAT, 1.0, "upstream")], prefix=f"nl-mix1-{lane}"))
    theirs_first, _ = _run(server, _graph([(COMFY_FORMAT, 1.0, "upstream"), (PEFT, 1.0)], prefix=f"nl-mix2-{lane}"))
    peft_only, _ = _run(server, _graph([(PEFT, 1.0)], prefix=f"nl-mix0-{lane}"))
    assert _close(ours_first, theirs_first, 1e-5) and not _close(ours_first, peft_only, 1e-3)
    base, _ = _run(server, _graph(prefix=f"nl-base0-{lane}"))
    zero, _ = _run(server, _graph([(PEFT, 0.0)], prefix=f"nl-zero-{lane}"))
    assert np.allclose(base, zero, atol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("sdxl-style.safetensors", "looks like an SDXL LoRA (keys lora_unet_input_blocks_4_1_proj_in"),
    ("pickled-adapter.bin", "pickle file, and loading a pickle can run code"),
])
def test_wrong_files_fail_the_prompt_saying_why(server, trainer_loras, name, expected):
    from devkit import harness

    with pytest.raises(harness.PromptFailed) as err:
        server.run(_graph([(name, 1.0)], prefix=f"nl-bad-{server.lane}"))
    assert name in str(err.value) and expected in str(err.value)


def _not_loaded(server, graph) -> tuple[np.ndarray, list[str]]:
    """Run `graph`; the tensor names upstream's loader logged as 'lora key not loaded' during that run."""
    before = len(server.log_path.read_text(errors="replace").splitlines())
    latent, _ = _run(server, graph)
    lines = server.log_path.read_text(errors="replace").splitlines()[before:]
    return latent, sorted(line.split("lora key not loaded: ", 1)[1].strip() for line in lines
                          if "lora key not loaded: " in line)


def test_upstream_loader_skips_every_tensor_of_the_trainers_peft_lora(server, trainer_loras):
    """Finding (v0.8.0 and v0.33.0): model_lora_keys_unet has no `base_model.model.*` names for Lumina-2 models,
    so LoraLoaderModelOnly skips all of the PEFT LoRA's tensors, with a log line each, and the image is the base."""
    from safetensors import safe_open

    lane = server.lane
    base, _ = _run(server, _graph(prefix=f"up-base-{lane}"))
    latent, skipped = _not_loaded(server, _graph([(PEFT, 1.0)], prefix=f"up-peft-{lane}", upstream=True))
    with safe_open(str(trainer_loras / "loras" / PEFT), "pt") as f:
        keys = sorted(f.keys())
    assert skipped == keys
    assert np.allclose(latent, base, atol=1e-6)


def test_upstream_loader_applies_only_the_feed_forward_part_of_the_trainers_lokr(server, trainer_loras):
    """Finding (v0.8.0 and v0.33.0): for LyCORIS's `lycoris_<module_>` names upstream maps Lumina-2's diffusers
    names, which equal NextDiT's only for `feed_forward.w2`: the LoKr's qkv, out, time_text_embed and
    clip_text_pooled_proj tensors are skipped (logged) and its feed_forward.w2 ones applied: a partial LoRA."""
    from safetensors import safe_open

    latent, skipped = _not_loaded(server, _graph([(LOKR, 1.0)], prefix=f"up-lokr-{server.lane}", upstream=True))
    with safe_open(str(trainer_loras / "loras" / LOKR), "pt") as f:
        keys = sorted(f.keys())
    assert skipped == [k for k in keys if "feed_forward_w2" not in k]
    assert not any("feed_forward_w2" in k for k in skipped)
    print(json.dumps({"lane": server.lane, "skipped": len(skipped), "of": len(keys)}))
