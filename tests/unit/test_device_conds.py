"""The sampling run's conditioning goes to the GPU once a run (pipeline/device_conds.py). On a CPU the tests use
PyTorch's 'meta' device as the run's device: the copies, the classes ComfyUI's batching relies on, the originals
left alone and put back, and the cases left as they were. The CUDA test runs ComfyUI's sampler on the tiny DiT
with and without it and requires the same latent, with fewer host-to-device copies."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from devkit import cfg_batch_errors

pytestmark = pytest.mark.host
META = torch.device("meta")


def _conds():
    """ComfyUI's processed conditionings for a prompt pair: the caption tensor shared by both, as a repeated
    prompt would have it, a pooled text, a constant and a key that is not a list."""
    import comfy.conds

    caption, pooled = torch.randn(1, 7, 16), torch.randn(1, 8)
    positive = {"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(caption),
                                "clip_text_pooled": comfy.conds.CONDRegular(pooled),
                                "num_tokens": comfy.conds.CONDConstant(7)}, "uuid": "p", "strength": 1.0}
    negative = {"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(caption)}, "uuid": "n"}
    return {"positive": [positive], "negative": [negative], "note": "not a list"}, caption, pooled


def test_on_device_copies_each_tensor_once_keeps_the_classes_and_leaves_the_originals(comfy_import_path):
    import comfy.conds

    from pipeline import device_conds

    conds, caption, pooled = _conds()
    assert device_conds.bytes_to_move(conds, META) == (caption.numel() + pooled.numel()) * 4
    out = device_conds.on_device(conds, META)
    pos, neg = out["positive"][0], out["negative"][0]
    assert type(pos["model_conds"]["c_crossattn"]) is comfy.conds.CONDCrossAttn
    assert pos["model_conds"]["c_crossattn"].cond.device == META
    assert pos["model_conds"]["clip_text_pooled"].cond.device == META
    assert neg["model_conds"]["c_crossattn"].cond is pos["model_conds"]["c_crossattn"].cond, "one copy a tensor"
    assert pos["model_conds"]["num_tokens"] is conds["positive"][0]["model_conds"]["num_tokens"]
    assert (pos["uuid"], pos["strength"], out["note"]) == ("p", 1.0, "not a list")
    assert conds["positive"][0]["model_conds"]["c_crossattn"].cond is caption, "the originals are left alone"
    assert device_conds.bytes_to_move(out, META) == 0


def test_the_wrapper_hands_the_run_device_conds_and_puts_the_originals_back(comfy_import_path, monkeypatch):
    from pipeline import device_conds

    conds, _, _ = _conds()
    guider = SimpleNamespace(conds=conds)
    seen = []

    class Executor:  # ComfyUI's WrapperExecutor as the wrapper uses it
        fail = False

        def __call__(self, guider, *args):
            seen.append(guider.conds)
            if self.fail:
                raise RuntimeError("a failed run")
            return "samples"

    run = Executor()

    def sample(noise, extra_args=None):
        return device_conds._sample(run, guider, None, extra_args or {"model_options": {}}, None, noise)

    assert sample(torch.zeros(1, device=META)) == "samples"
    assert seen[-1]["positive"][0]["model_conds"]["c_crossattn"].cond.device == META and guider.conds is conds
    run.fail = True
    with pytest.raises(RuntimeError):
        sample(torch.zeros(1, device=META))
    assert guider.conds is conds, "put back after a failed run too"
    run.fail = False

    left_alone = [lambda: sample(torch.zeros(1)),  # a run on the CPU
                  lambda: sample(torch.zeros(1, device=META), {"model_options": {"multigpu_clones": {"x": 1}}})]
    for case in left_alone:
        case()
        assert seen[-1] is conds
    monkeypatch.setattr(device_conds, "MAX_BYTES", 100)  # the caption alone is 448 bytes
    sample(torch.zeros(1, device=META))
    assert seen[-1] is conds
    monkeypatch.undo()
    monkeypatch.setenv("NEWBIE_DEVICE_CONDS", "0")
    sample(torch.zeros(1, device=META))
    assert seen[-1] is conds


def test_the_loader_attaches_it(tiny_dit):
    import comfy.patcher_extension as pe

    from pipeline import device_conds

    patcher, _ = cfg_batch_errors.model(tiny_dit)
    assert device_conds.WRAPPER_KEY in patcher.wrappers[pe.WrappersMP.SAMPLER_SAMPLE]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_latent_is_the_same_with_fewer_host_to_device_copies(comfy_import_path):
    import comfy.sample

    from devkit import tiny_models
    from pipeline import loader

    patcher, cfg, _, _ = loader.build_model(tiny_models.in_memory_parts(), "bf16", dynamic=False)
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)  # on the CPU, as ComfyUI's text encoders leave them
    latent = torch.zeros(1, 16, 8, 8)

    def run(on: bool):
        with cfg_batch_errors.environ("NEWBIE_DEVICE_CONDS", "1" if on else "0"), \
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, 1), 4, 5.0, "euler_ancestral",
                                      "simple", cond, uncond, latent, seed=1, disable_pbar=True)
            torch.cuda.synchronize()
        return out, sum(1 for e in prof.events() if e.name.startswith("Memcpy HtoD"))

    run(False)  # loads the model
    off, copies_off = run(False)
    on, copies_on = run(True)
    assert torch.equal(on, off)
    assert copies_on < copies_off, (copies_on, copies_off)
