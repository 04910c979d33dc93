"""A bench-only ComfyUI node that profiles one sampling run inside a real server. Not part of the pack: bench/run.py
links this folder into a server's custom_nodes under `--profile` (harness.ComfyServer(extra_nodes=[PROFILE_NODES]))
and puts the node between the model and KSampler, for upstream's graph and the pack's alike.

Why: bench/profile_sampling.py profiles ComfyUI's sampler in a plain process, and runs 48 and 49 showed the server differs:
the pack's fp16 sampled 3.33 s in-process and under `--gpu-only`, 3.56 s in a default server, where bf16 took the
same in both. Only a profile taken in the server says what the server adds.

The node clones the model and adds an OUTER_SAMPLE wrapper (ComfyUI's hook around one whole sampling run) that
counts the runs through it and profiles the `run`-th (1-based), writing devkit/profile_summary's summary of it
(GPU busy and idle per step, host synchronisations, the top kernels and CPU ops) to `out`, with a snapshot of the
GPU's memory before and after every run up to it (`memory_snapshot`: what is loaded where, how much of each model
ComfyUI counts as on the GPU, what comfy-aimdo holds). Every other run samples untouched.""" 
import json
import sys
import time
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

_CHECKOUT = str(Path(__file__).resolve().parents[2])
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)  # last, so nothing of ComfyUI's is shadowed

from devkit import profile_summary  # noqa: E402


def memory_snapshot() -> dict:
    """The GPU's memory as ComfyUI and comfy-aimdo see it now (MiB): free on the device, PyTorch's allocator,
    aimdo's total and reclaimable, and for each loaded model its patcher, whether it is dynamic, and its loaded
    and full sizes. Empty on a CPU; a failure is recorded, not raised (bench diagnostics)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    try:
        return _memory_snapshot()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _memory_snapshot() -> dict:
    import torch
    import comfy.model_management as mm

    mib = 2 ** 20
    free, total = torch.cuda.mem_get_info()
    snap = {"free": free // mib, "total": total // mib, "torch_allocated": torch.cuda.memory_allocated() // mib,
            "torch_reserved": torch.cuda.memory_reserved() // mib,
            "torch_peak_allocated": torch.cuda.max_memory_allocated() // mib, "models": []}
    try:
        import comfy_aimdo.control
        import comfy_aimdo.model_vbar

        snap["aimdo_usage"] = int(comfy_aimdo.control.get_total_vram_usage()) // mib
        snap["aimdo_reclaimable"] = int(comfy_aimdo.model_vbar.vbars_analyze(torch.cuda.current_device())) // mib
    except Exception as e:  # a host without comfy-aimdo, or aimdo off
        snap["aimdo"] = f"{type(e).__name__}: {e}"
    for loaded in mm.current_loaded_models:
        patcher = loaded.model
        if patcher is None:
            continue
        entry = {"model": type(patcher.model).__name__, "patcher": type(patcher).__name__,
                 "dynamic": bool(getattr(patcher, "is_dynamic", lambda: False)()),
                 "loaded": int(patcher.loaded_size()) // mib, "size": int(patcher.model_size()) // mib}
        vbar = getattr(patcher, "_vbar_get", lambda: None)()
        if vbar is not None:
            pages = vbar.get_residency()
            entry.update(vbar_loaded=int(vbar.loaded_size()) // mib, vbar_pages=len(pages),
                         vbar_resident_pages=sum(1 for p in pages if p & 1))
        snap["models"].append(entry)
    return snap


def profiling_wrapper(run: int, out: Path, top: int = 25):
    """An OUTER_SAMPLE wrapper that profiles the run-th sampling run through it and writes `out` (JSON)."""
    import torch

    seen = [0]
    snapshots = []

    def wrapper(executor, *args, **kwargs):
        seen[0] += 1
        if seen[0] != run:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            before = memory_snapshot()
            t = time.perf_counter()
            result = executor(*args, **kwargs)
            snapshots.append({"run": seen[0], "wall_s": round(time.perf_counter() - t, 3), "before": before,
                              "after": memory_snapshot()})
            return result
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        steps = int(sigmas.shape[0]) - 1
        cuda = torch.cuda.is_available()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = memory_snapshot()
        with torch.profiler.profile(activities=acts) as prof:
            t = time.perf_counter()
            result = executor(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
        summary = profile_summary.summarise(prof, steps, wall)
        summary.update(profile_summary.tables(prof, top, cuda))
        summary["memory"] = snapshots + [{"run": run, "profiled": True, "before": before, "after": memory_snapshot()}]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        print(f"[bench profile] run {run}: {steps} steps in {wall:.3f} s, written to {out}", file=sys.stderr,
              flush=True)
        return result

    return wrapper


class NewBieBenchProfile(io.ComfyNode):
    """Bench only: profiles the run-th sampling run of the model it returns."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="NewBieBenchProfile", display_name="Profile a sampling run (bench)",
                         category="NewBie/devkit",
                         inputs=[io.Model.Input("model"),
                                 io.Int.Input("run", default=2, min=1, tooltip="which sampling run, from 1"),
                                 io.String.Input("out", tooltip="the JSON file to write")],
                         outputs=[io.Model.Output(display_name="MODEL")])

    @classmethod
    def execute(cls, model, run, out) -> io.NodeOutput:
        import comfy.patcher_extension

        clone = model.clone()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "newbie_bench_profile",
                                   profiling_wrapper(run, Path(out)))
        return io.NodeOutput(clone)


class BenchProfileExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [NewBieBenchProfile]


async def comfy_entrypoint():
    return BenchProfileExtension()
