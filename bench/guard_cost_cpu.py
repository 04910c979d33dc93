"""What Dynamo's guard check costs a compiled block call, bf16 against fp8 weights, and what dropping the guards on
the metadata of ComfyUI's QuantizedTensor weights would save (a `guard_filter_fn`; the pack does not use one: see
bench/results/NOTES.md, sixteenth session), and what the pack's skipping of the weights' guards for calls met before
saves (`skip_guard_eval_unsafe`, pipeline/guard_skip.py). One main-layer block of the tiny DiT compiled with
Dynamo's eager backend, called 200 times under the profiler, five times; prints the profiler's `TorchDynamo Cache
Lookup` per call. CPU only: the figures are this CPU's, to compare with one another.

    COMFYUI_PATH=~/comfy/ComfyUI python bench/guard_cost_cpu.py
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALLS, REPEATS = 200, 5


def drop_quantized_metadata(entries) -> list[bool]:
    """guard_filter_fn: every guard but those on a tensor subclass's metadata (`__tensor_flatten__`'s context and
    its list of inner tensors), which Dynamo evaluates in Python at every call."""
    return [not (e.guard_type == "TENSOR_SUBCLASS_METADATA_MATCH"
                 or (e.guard_type == "EQUALS_MATCH" and e.name.endswith("__tensor_flatten__()[0]"))) for e in entries]


def main() -> None:
    sys.path[:0] = [os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI")), str(REPO)]
    import torch

    from devkit import cfg_batch_errors, tiny_models

    tiny_models._comfy_cpu_safe()
    from pipeline import block_compile, guard_skip

    dit = tiny_models.random_dit(torch.bfloat16)
    for precision in ("bf16", "fp8"):  # the loader quantizes the 16-bit weights for fp8
        patcher, cfg = cfg_batch_errors.model(dit, precision)
        block_compile.own_cast_state(patcher.model.diffusion_model)
        block = patcher.model.diffusion_model.layers[0]
        seen = {}

        def keep(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs

        hook = block.register_forward_pre_hook(keep, with_kwargs=True)
        cfg_batch_errors.sample(patcher, *cfg_batch_errors.prompts(cfg, 12, 5), steps=1, mode="off")
        hook.remove()
        for name, options, stance in (
                ("all guards", None, contextlib.nullcontext),
                ("metadata guards dropped", {"guard_filter_fn": drop_quantized_metadata}, contextlib.nullcontext),
                ("weights' guards skipped (pipeline/guard_skip.py)", None, guard_skip._skipping)):
            torch._dynamo.reset()
            compiled = torch.compile(block, backend="eager", options=options)
            per_call = []
            with torch.no_grad():
                for _ in range(5):  # compiles, with every guard
                    compiled(*seen["args"], **seen["kwargs"])
                for _ in range(REPEATS):
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, stance():
                        for _ in range(CALLS):
                            compiled(*seen["args"], **seen["kwargs"])
                    per_call += [e.cpu_time_total / e.count for e in prof.key_averages()
                                 if "Cache Lookup" in e.key]
            entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(type(block).forward.__code__)
            diff = len(entries[0].guard_manager.diff_guard_sources) if entries else "?"
            print(f"{precision}, {name}: cache lookup {sorted(round(v) for v in per_call)} us a call; "
                  f"differentiating guard sources {diff}", flush=True)


if __name__ == "__main__":
    main()
