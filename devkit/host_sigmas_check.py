"""The host-sigmas sampler run (pipeline/host_sigmas.py) against ComfyUI's own, on a GPU: the tiny DiT through
ComfyUI's sampler (euler_ancestral, CFG 5), once with the sigmas handed to it on the host and once on the GPU as
ComfyUI gives them (NEWBIE_HOST_SIGMAS=0; the tiny DiT runs eager). The two latents must be bit-identical, and
the host run must wait for the GPU less often (the stream and device synchronisations the profiler records; with
`--stacks` also where each run made them, over 2 steps). An unprofiled run loads the model first: until run74 the
host run came first and was charged the model's load, 127 of its 136 synchronisations (runs 66 and 68 read that
as host sigmas syncing more in eager runs; run72's stacks showed ComfyUI's `ModelPatcher.load`).
`python3 -m devkit.host_sigmas_check` prints a JSON verdict and exits non-zero where it fails; the CUDA test in
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
    """Host sigmas (the pack's default) or off."""
    return cfg_batch_errors.environ("NEWBIE_HOST_SIGMAS", "1" if on else "0")


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
    _load(patcher, cond, uncond)
    for sampler in ("euler_ancestral", "euler"):
        on, syncs_on, sites_on = run(patcher, cond, uncond, True, sampler, stacks)
        off, syncs_off, sites_off = run(patcher, cond, uncond, False, sampler, stacks)
        verdict[sampler] = {"bit_identical": torch.equal(on, off), "syncs_host_sigmas": syncs_on,
                            "syncs_gpu_sigmas": syncs_off, "sites_host_sigmas": sites_on,
                            "sites_gpu_sigmas": sites_off}
    # euler is left to ComfyUI (its loop reshapes sigmas against the latent): the same run either way
    ancestral = verdict["euler_ancestral"]
    verdict["ok"] = (ancestral["bit_identical"] and verdict["euler"]["bit_identical"]
                     and ancestral["syncs_host_sigmas"] < ancestral["syncs_gpu_sigmas"])
    return verdict


def _load(patcher, cond, uncond) -> None:
    """One unprofiled step: ComfyUI loads the model onto the GPU and the first call's work is done, so that neither
    is charged to the first profiled run."""
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, 1), 1, 5.0, "euler_ancestral", "simple", cond,
                        uncond, latent, seed=1, disable_pbar=True)
    torch.cuda.synchronize()


def main() -> int:
    """`--stacks`: also where each run waited (the profiler's Python stacks; slow)."""
    verdicts = [compare(p, "--stacks" in sys.argv) for p in ("bf16", "fp16")]
    print(json.dumps(verdicts, indent=1))
    return 0 if all(v["ok"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
