"""The sampler run gets its sigmas on the host where every use accepts them (pipeline/host_sigmas.py): through
ComfyUI's own sampling on the tiny model, which runs the wrapper with ComfyUI's real guider and samplers. On a CPU
the sigmas are on the host already, so the CPU tests check the decision and that the wrapper leaves a run as it
was; the CUDA test (devkit/host_sigmas_check.py) checks the bit-identical latent and that the host run waits for
the GPU less often."""
from __future__ import annotations

import pytest
import torch

from devkit import cfg_batch_errors

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu")]


@pytest.fixture
def decisions(monkeypatch):
    """Each sampler run's `eligible` verdict, in order (the real function, recorded)."""
    from pipeline import host_sigmas

    seen = []
    real = host_sigmas.eligible

    def spy(sampler, guider, denoise_mask, extra_args):
        seen.append(real(sampler, guider, denoise_mask, extra_args))
        return seen[-1]

    monkeypatch.setattr(host_sigmas, "eligible", spy)
    return seen


def _sample(patcher, cond, uncond, sampler, denoise_mask=None):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    return comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, 1), 3, 5.0, sampler, "simple", cond,
                               uncond, latent, seed=1, noise_mask=denoise_mask, disable_pbar=True)


def test_eager_and_compiled_flow_euler_ancestral_runs_are_eligible(tiny_dit, decisions):
    """Through ComfyUI's sampling: an eager run and a compiled one (the pack's block compile, here with Dynamo's
    eager backend) both get host sigmas (until run74 eager runs were left alone, on a check that had charged the
    model's load to the host run)."""
    import comfy.patcher_extension as pe

    from pipeline import block_compile, host_sigmas

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    assert host_sigmas.WRAPPER_KEY in patcher.wrappers[pe.WrappersMP.SAMPLER_SAMPLE]
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    _sample(patcher, cond, uncond, "euler_ancestral")
    block_compile.apply(patcher, backend="eager")
    _sample(patcher, cond, uncond, "euler_ancestral")
    assert decisions == [True, True]


def test_the_loader_attaches_it_and_flow_euler_ancestral_runs_are_eligible(tiny_dit, decisions, monkeypatch):
    import comfy.patcher_extension as pe
    import comfy.samplers

    from pipeline import host_sigmas, sampling

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    assert host_sigmas.WRAPPER_KEY in patcher.wrappers[pe.WrappersMP.SAMPLER_SAMPLE]
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    _sample(patcher, cond, uncond, "euler_ancestral")
    _sample(patcher, cond, uncond, "euler")  # reshapes sigmas against the latent: left to ComfyUI
    _sample(patcher, cond, uncond, "euler_ancestral", denoise_mask=torch.ones(1, 1, 8, 8))  # inpainting
    assert decisions == [True, False, False]

    # the pack's sampler node's function, as SamplerCustomAdvanced runs it
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(cond, uncond)
    guider.set_cfg(5.0)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 3)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    guider.sample(noise, torch.zeros(1, 16, 8, 8), comfy.samplers.KSAMPLER(sampling.sample_euler_ancestral_rf),
                  sigmas, seed=1, disable_pbar=True)
    assert decisions[-1] is True

    monkeypatch.setenv("NEWBIE_HOST_SIGMAS", "0")
    before = len(decisions)
    _sample(patcher, cond, uncond, "euler_ancestral")
    assert len(decisions) == before, "switched off: not even asked"


def test_a_model_that_does_not_sample_a_flow_is_not_eligible(comfy_import_path):
    from types import SimpleNamespace

    import comfy.k_diffusion.sampling as kd
    import comfy.model_sampling
    import comfy.samplers

    from pipeline import host_sigmas

    sampler = comfy.samplers.KSAMPLER(kd.sample_euler_ancestral)
    eps = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=comfy.model_sampling.EPS()))
    flow = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=comfy.model_sampling.CONST()))
    compiled = {"torch_compile_kwargs": {"backend": "inductor"}}
    assert host_sigmas.eligible(sampler, flow, None, {"model_options": compiled})
    assert host_sigmas.eligible(sampler, flow, None, {"model_options": {}}), "eager runs too"
    assert not host_sigmas.eligible(sampler, eps, None, {"model_options": compiled}), "SD's loop reshapes sigmas"
    masked = {**compiled, "denoise_mask_function": print}
    assert not host_sigmas.eligible(sampler, flow, None, {"model_options": masked})


def test_the_wrapper_hands_the_sampler_host_sigmas_only_from_a_device(comfy_import_path, monkeypatch):
    """Sigmas on another device (here 'meta', which the CPU has) are copied to the host once; CPU sigmas and an
    ineligible run pass through as the same object."""
    from pipeline import host_sigmas

    got = []

    class Executor:  # ComfyUI's WrapperExecutor as the wrapper uses it: the sampler, and the rest of the chain
        class_obj = None

        def __call__(self, *args):
            got.append(args[1])

    executor = Executor()
    monkeypatch.setattr(host_sigmas, "eligible", lambda *a: True)
    cpu = torch.ones(4)
    host_sigmas._sample(executor, None, cpu, {}, None, None)
    assert got[-1] is cpu
    moved = []
    meta = torch.ones(4, device="meta")
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: moved.append(self) or torch.ones(4))
    host_sigmas._sample(executor, None, meta, {}, None, None)
    assert moved == [meta] and got[-1].device.type == "cpu"
    monkeypatch.setattr(host_sigmas, "eligible", lambda *a: False)
    host_sigmas._sample(executor, None, meta, {}, None, None)
    assert got[-1] is meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_latent_is_bit_identical():
    from devkit import host_sigmas_check

    for precision in ("bf16", "fp16"):
        verdict = host_sigmas_check.compare(precision)
        assert verdict["ok"], verdict
