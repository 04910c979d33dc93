"""The host-sigmas sampler run (pipeline/host_sigmas.py) against ComfyUI's own, on a GPU: the tiny DiT through
ComfyUI's sampler (euler_ancestral, CFG 5), once with the sigmas handed to it on the host and once on the GPU as
ComfyUI gives them. The two latents must be bit-identical, and the host run must wait for the GPU fewer times
(the stream and device synchronisations the profiler records; torch.cuda's sync debug mode is no count of these:
it also flags the host's own 0-dim tensors taking part in GPU operations, which wait for nothing). `python3 -m devkit.host_sigmas_check`
prints a JSON verdict and exits non-zero where one of those fails; the CUDA test in tests/unit/test_host_sigmas.py
runs the same."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

from . import cfg_batch_errors, tiny_models

STEPS = 6
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


@contextlib.contextmanager
def host_sigmas(on: bool):
    old = os.environ.get("NEWBIE_HOST_SIGMAS")
    os.environ["NEWBIE_HOST_SIGMAS"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NEWBIE_HOST_SIGMAS", None)
        else:
            os.environ["NEWBIE_HOST_SIGMAS"] = old


def run(patcher, cond, uncond, on: bool, sampler: str = "euler_ancestral") -> tuple[torch.Tensor, int, dict]:
    """(latent, host waits for the GPU, where they were) of one sampling run with host sigmas `on` or off."""
    from .profile_summary import read_sites

    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 1)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    stacks = dict(with_stack=True, experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True))
    with host_sigmas(on), torch.profiler.profile(activities=activities, **stacks) as prof:
        out = comfy.sample.sample(patcher, noise, STEPS, 5.0, sampler, "simple", cond, uncond, latent, seed=1,
                                  disable_pbar=True)
        torch.cuda.synchronize()
    events = prof.events()
    waits = [e for e in events if e.name in SYNCS]
    return out, len(waits), dict(list(read_sites(waits).items())[:6])


def compare(precision: str = "bf16") -> dict:
    from pipeline import loader

    parts = tiny_models.in_memory_parts()
    patcher, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    verdict = {"precision": precision, "steps": STEPS}
    for sampler in ("euler_ancestral", "euler"):
        on, syncs_on, sites_on = run(patcher, cond, uncond, True, sampler)
        off, syncs_off, sites_off = run(patcher, cond, uncond, False, sampler)
        verdict[sampler] = {"bit_identical": torch.equal(on, off), "syncs_host_sigmas": syncs_on,
                            "syncs_gpu_sigmas": syncs_off, "sites_host_sigmas": sites_on,
                            "sites_gpu_sigmas": sites_off}
    ea = verdict["euler_ancestral"]
    # euler is left to ComfyUI (its loop reshapes sigmas against the latent): the same syncs either way
    verdict["ok"] = (ea["bit_identical"] and ea["syncs_gpu_sigmas"] - ea["syncs_host_sigmas"] >= STEPS - 1
                     and verdict["euler"]["bit_identical"]
                     and verdict["euler"]["syncs_host_sigmas"] == verdict["euler"]["syncs_gpu_sigmas"])
    return verdict


def main() -> int:
    verdicts = [compare(p) for p in ("bf16", "fp16")]
    print(json.dumps(verdicts, indent=1))
    return 0 if all(v["ok"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
