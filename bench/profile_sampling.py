"""Where a whole sampling run spends its time: ComfyUI's own sampler (comfy.sample.sample, euler_ancestral, CFG),
in-process, on the pack's DiT, with one warm run profiled. The server samples slower than back-to-back DiT calls
(run24: 0.136 s a step for bf16 against 0.119 s a call), and this says why: how busy
the GPU is over the run, the gaps between kernels, the host synchronisations per step (who reads a GPU value on
the CPU) and the CPU ops that fill the gaps.

    python3 bench/profile_sampling.py --out $OUT --variants bf16+compile,fp16+compile,fp8+compile   # GPU
    python3 bench/profile_sampling.py --tiny --steps 3 --out /tmp/ps                                   # CPU smoke
    python3 bench/profile_sampling.py --brief $OUT/profile_sampling.json                              # a line each

A variant is PRECISION[+compile][+batched|+separate]: the loader's precision (bf16, fp16, fp32, fp8, int8);
+compile: the blocks compiled (pipeline/block_compile.py, as `compile: auto` does where the weights stay resident);
+cppwrapper: the blocks' launchers in C++ (NEWBIE_CPP_WRAPPER);
+multikernel and +persistent (run89): Inductor's multi_kernel, a switch since removed (pipeline/block_compile.py);
+gpusigmas: the sampler compares its sigmas on the GPU every step, as ComfyUI has it (pipeline/host_sigmas.py off);
+hostconds: the conditioning copied to the GPU at every DiT call, as ComfyUI has it (pipeline/device_conds.py off;
this script's conditioning is on the CPU, as a server's text encoders leave it);
+w2bf16: fp8's w2 multiplied in bf16 (NEWBIE_FP8_W2=bf16; by default it multiplies in fp8 with its input scaled per
row, pipeline/quantized_ops.py, the `+w2rowwise` of runs 84-88);
+w2kernel: that row-scaled input made by the pack's SwiGLU kernel (NEWBIE_FP8_W2=kernel, pipeline/swiglu_fp8.py);
+w2kernel1: by its one-pass form (NEWBIE_FP8_W2=kernel1; 75 against 106 us a call, run110);
+adaln (runs 114 and 119): the blocks' adaLN modulation as a product and a sum in compiled blocks (NEWBIE_ADALN=reduce,
pipeline/adaln_reduce.py, removed after run119: its reduction kernel took as long as cuBLAS's product);
+noqkvrope: q/k RMSNorm + RoPE and v from ComfyUI's ops (fused by Inductor where compiled), not from the pack's
kernel (NEWBIE_QKV_ROPE=0, pipeline/qkv_rope.py); until run125 the kernel was opt-in (+qkvrope), and a variant
without it ran without the kernel;
+fastaccum: fp8 GEMMs accumulating in the tensor cores' accumulator (NEWBIE_FP8_ACCUM=fast, use_fast_accum; the
default since run94-95, before which `fp8+compile` promoted their partial sums to fp32); +fp32accum: promoted again
(NEWBIE_FP8_ACCUM=fp32);
+graphs: the DiT's calls replayed as CUDA graphs (NEWBIE_CUDA_GRAPHS=1, pipeline/cuda_graphs.py; this process
runs PyTorch's own allocator, as the graphs need); their log lines are kept in `cuda_graphs`. Until run75 this
script's call counter sat inside the graphs' wrapper, which then declined every run (run75 replayed none);
+kvcopies: flash-attn-4 given ComfyUI's repeated key/value heads (NEWBIE_FA4_GQA=0; by default one of each,
pipeline/kv_repeat.py); +nosdpagqa: PyTorch SDPA (cuDNN) given the copies (NEWBIE_SDPA_GQA=0; by default one of
each with enable_gqa where its backend takes that, since run126; until then +sdpagqa switched that on);
+guards: every Dynamo guard checked at every compiled block call (NEWBIE_GUARD_SKIP=0; by default a call met before
in the run skips the weights' guards, pipeline/guard_skip.py);
+fa4launch: flash-attn-4's own Python finds and launches its kernel at every call (NEWBIE_FA4_REPLAY=0; by default a
signature met before is launched directly, pipeline/fa4_replay.py);
+batched: the pack's batching of prompts of different lengths (pipeline/cfg_batch.py) forced on (by default it
batches only a streamed DiT, and these models are resident); +separate: its wrapper removed.
The warm run is timed unprofiled over --steps; the profile covers a run of --profile-steps (default 3; with +graphs
--steps, so that it replays the warm runs' graphs), with Python stacks only under --stacks (over 25 full-size
steps they took more than 9 minutes on an H200, run27). Conditioning is random with the caption lengths of the
bench's graph: --tokens for the XML positive (259 with the system prompt), --neg-tokens for the tag negative
(about 50). The lengths matter: ComfyUI batches the positive and the
negative into one DiT call only when their captions have the same length (Lumina-2's `c_crossattn` is a
CONDRegular and `num_tokens` a CONDConstant, neither concatenates across lengths), so a real prompt pair costs two
batch-1 calls a step, where bench/profile_dit.py times one batch-2 call; the pack pads them into one
(pipeline/cfg_batch.py) unless +separate. Writes OUT/profile_sampling.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit.profile_summary import busy_and_gaps, read_sites, summarise, tables  # noqa: E402,F401 (tests use them)


def call_timeline(marks: list, steps: int, run_s: float | None = None) -> dict:
    """The unprofiled warm run's DiT calls: how long the CPU takes to issue a call (Python to the last kernel
    launch) against how long the GPU takes to run it (CUDA events around the call), and the GPU time between the
    calls (the sampler's own work, and idle). A CPU that issues a call about as fast as the GPU runs it keeps
    the GPU waiting inside the call; GPU time between calls that exceeds the sampler's few small kernels is idle
    after a host sync. With the run's time (`run_s`), also the CPU's time a step outside the calls: where a CPU
    that issues calls faster than the GPU runs them yet spends as long a step as the GPU does waits for it (a host
    sync outside the calls; run74: 43 ms a call in, 45 ms a step out). Each entry: [cpu start, cpu end] or, on
    CUDA, [cpu start, cpu end, event start, event end]."""
    import statistics

    if not marks:
        return {}
    issue = [(m[1] - m[0]) * 1e3 for m in marks]
    out = {"cpu_issue_ms_per_call": round(statistics.median(issue), 2),
           "cpu_in_calls_ms_per_step": round(sum(issue) / steps, 2)}
    if run_s is not None:
        out["cpu_outside_calls_ms_per_step"] = round(run_s * 1e3 / steps - sum(issue) / steps, 2)
    if len(marks[0]) == 4:
        gpu = [m[2].elapsed_time(m[3]) for m in marks]
        between = [a[3].elapsed_time(b[2]) for a, b in zip(marks, marks[1:])]
        out.update(gpu_ms_per_call=round(statistics.median(gpu), 2),
                   gpu_in_calls_ms_per_step=round(sum(gpu) / steps, 2),
                   gpu_between_calls_ms_per_step=round(sum(between) / steps, 2))
    return out


def profiled_step_count(extras: list, steps: int, profile_steps: int) -> int:
    """The profiled run's steps: --profile-steps, or the warm runs' steps where the calls replay CUDA graphs."""
    return steps if "graphs" in extras else profile_steps


BRIEF_KEYS = ("warm_run_s", "warm_runs_s", "warm_step_ms", "cpu_issue_ms_per_call", "gpu_ms_per_call",
              "gpu_busy_ms_per_step", "dit_calls_per_step", "first_run_s", "fa4_launches_kept")


def brief(results: dict) -> list[str]:
    """One line a variant of a profile_sampling.json: the figures a device call's short output needs (`--brief`)."""
    return [f"{variant}: " + " ".join(f"{k}={r[k]}" for k in BRIEF_KEYS if k in r)
            for variant, r in results.items() if isinstance(r, dict)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--tokens", type=int, default=259)
    ap.add_argument("--neg-tokens", type=int, default=50)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--variants", default="bf16+compile,fp16+compile")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps of the profiled run")
    ap.add_argument("--warm", type=int, default=3, help="unprofiled warm runs (their median is reported)")
    ap.add_argument("--stacks", action="store_true", help="record Python stacks (host_read_sites; slow)")
    ap.add_argument("--swiglu-launch", type=Path,
                    help="bench/swiglu_kernel.py's json: +w2kernel launches the kernel as its fastest row there "
                         "(its programs an SM as rows a program)")
    ap.add_argument("--brief", type=Path, help="print one line a variant of this profile_sampling.json and stop")
    args = ap.parse_args()
    if args.brief:
        print("\n".join(brief(json.loads(args.brief.read_text()))))
        return
    sys.path[:0] = [os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI")), str(REPO)]
    import torch

    from devkit import tiny_models

    tiny_models._comfy_cpu_safe()
    import comfy.model_management as mm
    import comfy.patcher_extension
    import comfy.sample

    from pipeline import block_compile, cfg_batch, cuda_graphs, flash_attn4, guard_skip, loader, swiglu_fp8

    if args.swiglu_launch:
        sweep = json.loads(args.swiglu_launch.read_text())
        best = sweep["best"]
        programs = best["programs_per_sm"] * torch.cuda.get_device_properties(0).multi_processor_count
        swiglu_fp8.ROWS_PER_PROGRAM, swiglu_fp8.BLOCK, swiglu_fp8.NUM_WARPS = (
            -(-sweep["rows"] // programs), best["block"], best["num_warps"])
        print(f"+w2kernel launches: {best}", flush=True)

    spec = tiny_models.TINY if args.tiny else tiny_models.FULL
    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    shapes = tiny_models._meta_state_shapes(spec)["dit"]
    base_sd = tiny_models.random_state_dict(shapes, spec.seed, torch.bfloat16, "cuda" if cuda else "cpu")
    hw = (8, 8) if args.tiny else (128, 128)
    tokens = (min(args.tokens, 12), min(args.neg_tokens, 5)) if args.tiny else (args.tokens, args.neg_tokens)
    results = {}
    graph_lines = []  # what pipeline/cuda_graphs.py and guard_skip.py log (replays or skips per run, a failure)

    class GraphLog(logging.Handler):
        def emit(self, record):
            graph_lines.append(record.getMessage())

    for module in (cuda_graphs, guard_skip):
        graph_log = logging.getLogger(module.__name__)
        graph_log.setLevel(logging.INFO)
        graph_log.addHandler(GraphLog())
    for variant in args.variants.split(","):
        prec, *extras = variant.split("+")
        os.environ["NEWBIE_FP8_W2"] = ("bf16" if "w2bf16" in extras else "kernel" if "w2kernel" in extras
                                        else "kernel1" if "w2kernel1" in extras
                                        else "")  # read when the model is built, as is
        os.environ["NEWBIE_FP8_ACCUM"] = "fp32" if "fp32accum" in extras else "fast" if "fastaccum" in extras else ""
        os.environ["NEWBIE_FA4_GQA"] = "0" if "kvcopies" in extras else "1"
        os.environ["NEWBIE_SDPA_GQA"] = "0" if "nosdpagqa" in extras else "1"
        os.environ["NEWBIE_GUARD_SKIP"] = "0" if "guards" in extras else "1"
        os.environ["NEWBIE_FA4_REPLAY"] = "0" if "fa4launch" in extras else "1"
        os.environ["NEWBIE_QKV_ROPE"] = "0" if "noqkvrope" in extras else "1"
        parts = loader.NewBieParts(dict(base_sd), {}, {}, {}, None, None, {"dit": "random"})
        patcher, cfg, _, _ = loader.build_model(parts, prec, dynamic=False)
        if "compile" in extras:  # +cppwrapper: Inductor's C++ launchers (block_compile.inductor_options)
            os.environ["NEWBIE_CPP_WRAPPER"] = "1" if "cppwrapper" in extras else "0"
            block_compile.apply(patcher)
        # the pack's batching of the prompt pair: by default (auto) only where the weights stream, and these
        # models are resident; +batched forces it, +separate removes it
        os.environ["NEWBIE_CFG_BATCH"] = "always" if "batched" in extras else "auto"
        os.environ["NEWBIE_HOST_SIGMAS"] = "0" if "gpusigmas" in extras else "1"
        os.environ["NEWBIE_CUDA_GRAPHS"] = "1" if "graphs" in extras else "0"
        os.environ["NEWBIE_DEVICE_CONDS"] = "0" if "hostconds" in extras else "1"
        if "separate" in extras:
            patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, cfg_batch.WRAPPER_KEY)
        g = torch.Generator().manual_seed(5)
        cond, uncond = ([[torch.randn(1, n, cfg["cap_feat_dim"], generator=g),
                          {"pooled_output": torch.randn(1, cfg["clip_text_dim"], generator=g)}]] for n in tokens)
        latent = torch.zeros(1, 16, *hw)

        def sample(seed: int, steps: int = args.steps):
            noise = comfy.sample.prepare_noise(latent, seed)
            return comfy.sample.sample(patcher, noise, steps, 5.0, "euler_ancestral", "simple", cond, uncond,
                                       latent, seed=seed, disable_pbar=True)

        calls, timeline = [], None

        def count_calls(executor, *a, **k):  # DIFFUSION_MODEL wrapper: one entry per DiT call, its batch size
            calls.append(int(a[0].shape[0]))
            if timeline is None:
                return executor(*a, **k)
            marks = [time.perf_counter()] + ([torch.cuda.Event(enable_timing=True)] if cuda else [])
            if cuda:
                marks[1].record()
            out = executor(*a, **k)
            marks.insert(1, time.perf_counter())
            if cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            timeline.append(marks)
            return out

        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_count", count_calls)
        # attached again, so that the counter is outside them: with it inside, the guard skipping and the graphs
        # would decline (the graphs' wrapper stays the innermost)
        if "compile" in extras:
            guard_skip.attach(patcher)
        cuda_graphs.attach(patcher)
        graph_lines.clear()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        t = time.perf_counter()
        sample(1)  # loads the model, compiles the blocks
        sync()
        r = {"first_run_s": round(time.perf_counter() - t, 2)}
        warm = []
        for seed in range(2, 2 + args.warm):  # the last run's DiT calls give the call timeline
            timeline = []
            t = time.perf_counter()
            sample(seed)
            sync()
            warm.append(round(time.perf_counter() - t, 3))
        r["warm_runs_s"] = warm
        r["warm_run_s"] = sorted(warm)[len(warm) // 2]
        r["warm_step_ms"] = round(r["warm_run_s"] * 1e3 / args.steps, 2)
        r.update(call_timeline(timeline, args.steps, warm[-1]))  # the timeline is the last warm run's
        timeline = None
        print(f"[sampling] {variant}: warm runs {warm} s", flush=True)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        # Python stacks on the ops (torch 2.9+) are costly: over a whole 25-step run on the full model the profile
        # did not finish in 9 minutes (run27), hence --stacks and a short profiled run (--profile-steps).
        stacks = dict(with_stack=True, experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True)) \
            if args.stacks else {}
        # +graphs: the profiled run takes the warm runs' steps, so that it replays their graphs (a call's signature
        # holds the run's host sigmas by value: run98's 2-step profile recorded graphs of its own and replayed none)
        profiled_steps = profiled_step_count(extras, args.steps, args.profile_steps)
        with torch.profiler.profile(activities=acts, **stacks) as prof:
            t = time.perf_counter()
            sample(99, profiled_steps)
            sync()
            wall = time.perf_counter() - t
        r.update(summarise(prof, profiled_steps, wall))
        r["profiled_steps"] = profiled_steps
        r["dit_calls_per_step"] = round(len(calls) / ((1 + args.warm) * args.steps + profiled_steps), 2)
        r["dit_call_batch_sizes"] = sorted(set(calls))
        if "graphs" in extras:
            r["cuda_graphs"] = [line for line in graph_lines if "CUDA graphs" in line]
        if "compile" in extras:  # the last run's line: how many of its calls skipped the weights' guards
            r["guard_skip"] = [line for line in graph_lines if "Dynamo's weight guards" in line][-1:]
        if flash_attn4.installed():  # signatures whose flash-attn-4 launch is kept (pipeline/fa4_replay.py) / watched
            launches = flash_attn4.replays().launches
            r["fa4_launches_kept"] = f"{sum(v is not None for v in launches.values())}/{len(launches)}"
        r.update(tables(prof, args.top, cuda))
        figures = {k: v for k, v in r.items() if not k.startswith("top_")}
        print(f"[sampling] {variant}: {json.dumps(figures)}\n{r['top_cpu']}", flush=True)
        results[variant] = r
        args.out.mkdir(parents=True, exist_ok=True)  # after each variant: a call cut short keeps what it measured
        (args.out / "profile_sampling.json").write_text(json.dumps(results, indent=1))
        mm.unload_all_models()
        del patcher
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if "compile" in extras:
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
