"""The host-sigmas sampler run (pipeline/host_sigmas.py) against ComfyUI's own, on a GPU: the tiny DiT through
ComfyUI's sampler (euler_ancestral, CFG 5), once with the sigmas handed to it on the host and once on the GPU as
ComfyUI gives them (NEWBIE_HOST_SIGMAS=always: the tiny DiT runs eager). The two latents must be bit-identical. The
stream and device synchronisations the profiler records are reported, with where the host run made them, but not
judged: on an H100 the tiny eager run recorded more with host sigmas (136 against 21 over 6 steps, runs 66 and 68),
where the compiled full-size DiT recorded one a step fewer (run66); why is open (the sites need the profiler's
stacks; with them the check took more than 90 s in run69 and was cut off). `python3 -m devkit.host_sigmas_check`
prints a JSON verdict and exits non-zero where the latents differ (`--stacks`: with the sites); the CUDA test in
tests/unit/test_host_sigmas.py runs the same."""
from __future__ import annotations

import json
import sys

import torch

from . import cfg_batch_errors, tiny_models

STEPS = 6
STACK_STEPS = 2  # with the profiler's Python stacks 6 steps took more than 90 s on an H100 (run69)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


def host_sigmas(on: bool):
    """Host sigmas for eager runs too (`always`: the tiny DiT runs eager), or off."""
    return cfg_batch_errors.environ("NEWBIE_HOST_SIGMAS", "always" if on else "0")


def run(patcher, cond, uncond, on: bool, sampler: str = "euler_ancestral",
        stacks: bool = False) -> tuple[torch.Tensor, int, dict]:
    """(latent, host waits for the GPU, where they were) of one sampling run with host sigmas `on` or off."""
    from .profile_summary import read_sites

    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 1)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    extra = dict(with_stack=True, experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True)) \
        if stacks else {}
    with host_sigmas(on), torch.profiler.profile(activities=activities, **extra) as prof:
        out = comfy.sample.sample(patcher, noise, STACK_STEPS if stacks else STEPS, 5.0, sampler, "simple", cond,
                                  uncond, latent, seed=1, disable_pbar=True)
        torch.cuda.synchronize()
    events = prof.events()
    waits = [e for e in events if e.name in SYNCS]
    return out, len(waits), dict(list(read_sites(waits).items())[:6]) if stacks else {}


def compare(precision: str = "bf16", stacks: bool = False) -> dict:
    from pipeline import loader

    parts = tiny_models.in_memory_parts()
    patcher, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    verdict = {"precision": precision, "steps": STACK_STEPS if stacks else STEPS}
    for sampler in ("euler_ancestral", "euler"):
        on, syncs_on, sites_on = run(patcher, cond, uncond, True, sampler, stacks)
        off, syncs_off, sites_off = run(patcher, cond, uncond, False, sampler, stacks)
        verdict[sampler] = {"bit_identical": torch.equal(on, off), "syncs_host_sigmas": syncs_on,
                            "syncs_gpu_sigmas": syncs_off, "sites_host_sigmas": sites_on,
                            "sites_gpu_sigmas": sites_off}
    # euler is left to ComfyUI (its loop reshapes sigmas against the latent): the same run either way
    verdict["ok"] = verdict["euler_ancestral"]["bit_identical"] and verdict["euler"]["bit_identical"]
    return verdict


def main() -> int:
    """`--stacks`: also where each run waited (the profiler's Python stacks; slow)."""
    verdicts = [compare(p, "--stacks" in sys.argv) for p in ("bf16", "fp16")]
    print(json.dumps(verdicts, indent=1))
    return 0 if all(v["ok"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
