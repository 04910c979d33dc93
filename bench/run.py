"""Side-by-side benchmark on a CUDA machine: the pack's graph vs upstream ComfyUI's native NewBie graph, in one
run, on the same full-size random weights (the same graphs, weights and budgets for both).

For each configuration: a fresh ComfyUI server (optionally under a memory budget: a second process holds all
free GPU memory but BUDGET + 0.6 GiB), one cold prompt and then --warm warm prompts (a new seed each), recording
wall time, per-stage times (from the websocket), sampling it/s (from progress events), and the server process's
peak GPU memory (nvidia-smi, every 50 ms) with its trace. The warm runs are summarised as median and spread
(min, max). --rounds R runs the whole list R times, alternating the configurations, so that a drift of the
machine hits pack and upstream alike. Results go to OUT/results.json as each configuration ends.

    python3 bench/run.py --out $OUT --configs upstream-gpu-only@none,pack-bf16@none [--warm 3] [--rounds 1]

A configuration is NAME@BUDGET (BUDGET in GiB, or 'none'); NAMEs are listed in CONFIGS below.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from devkit import harness  # noqa: E402
from ratios import ratio_table  # noqa: E402

XML = ("<character_1><n>$character_1$</n><gender>1girl</gender><appearance>blue_hair, long_twintails, teal_eyes"
       "</appearance><clothing>white_shirt, black_skirt</clothing><expression>smile</expression><position>"
       "center_left</position></character_1>\n<general_tags><count>1girl</count><style>anime_style, digital_art"
       "</style><background>night_sky</background><quality>high_quality, masterpiece</quality></general_tags>")
NEG = "lowres, bad_anatomy, worst_quality, low_quality"

# name -> (graph kind, precision for the pack loader (for upstream: UNETLoader's weight_dtype, None = default),
#          extra server flags, the pack loader's `compile`)
CONFIGS = {
    "upstream-bf16": ("upstream", None, [], None),
    "upstream-gpu-only": ("upstream", None, ["--gpu-only"], None),
    "upstream-legacy": ("upstream", None, ["--disable-dynamic-vram"], None),
    "upstream-fp32": ("upstream", None, ["--fp32-unet"], None),
    "upstream-fp16-forced": ("upstream", None, ["--fp16-unet"], None),
    # upstream's TorchCompileModel (whole DiT, non-dynamic clone) before KSampler
    "upstream-compile": ("upstream", None, [], None),
    # upstream's fp8: UNETLoader weight_dtype fp8_e4m3fn, a plain cast of every weight without a scale
    "upstream-fp8": ("upstream", "fp8_e4m3fn", [], None),
    # the pack with its defaults (compile auto = blocks on CUDA), and eager for comparison
    "pack-fp16": ("pack", "fp16", [], "auto"),
    "pack-bf16": ("pack", "bf16", [], "auto"),
    # quantized DiT weights (pipeline/quantize.py), quantized from the 16-bit file at load; on an H200 auto compiles
    # the pack's plain-op fp8/int8 layers (pipeline/quantized_ops.py) where they stay resident; -eager turns it off
    "pack-fp8": ("pack", "fp8", [], "auto"),
    "pack-int8": ("pack", "int8", [], "auto"),
    "pack-fp8-compiled": ("pack", "fp8", [], "blocks"),
    "pack-fp8-eager": ("pack", "fp8", [], "off"),
    "pack-int8-eager": ("pack", "int8", [], "off"),
    "pack-fp16-eager": ("pack", "fp16", [], "off"),
    "pack-bf16-eager": ("pack", "bf16", [], "off"),
    "pack-fp16-gpu-only": ("pack", "fp16", ["--gpu-only"], "auto"),
    "pack-bf16-gpu-only": ("pack", "bf16", ["--gpu-only"], "auto"),
    "pack-fp16-legacy": ("pack", "fp16", ["--disable-dynamic-vram"], "off"),
    "pack-bf16-legacy": ("pack", "bf16", ["--disable-dynamic-vram"], "off"),
    # compiled whatever the room (`compile: blocks`): at 8 GiB the bf16 DiT then stays in the non-dynamic patcher,
    # loaded as far as it fits, and each VAE decode evicts part of it (the default there streams it eager)
    "pack-bf16-blocks": ("pack", "bf16", [], "blocks"),
    # ComfyUI's --disable-pinned-memory: at 8 GiB each decode unloads about 2 GB of the resident DiT, and ComfyUI
    # pins every weight it offloads (cudaHostRegister) and unpins it when the next image loads it back; how much
    # of the eviction's cost (about 1.6 s an image, run53) is that pinning?
    "pack-bf16-nopin": ("pack", "bf16", ["--disable-pinned-memory"], "auto"),
    # compiled as by default, with ComfyUI's dynamic VRAM (comfy-aimdo) off: run49's fp16 sampled 3.56 s in a
    # default server and 3.36 s under --gpu-only (which also leaves dynamic VRAM off)
    "pack-fp16-nodynamic": ("pack", "fp16", ["--disable-dynamic-vram"], "auto"),
    "pack-bf16-nodynamic": ("pack", "bf16", ["--disable-dynamic-vram"], "auto"),
    # PyTorch's own CUDA allocator instead of ComfyUI's default cudaMallocAsync (--disable-cuda-malloc): the pack's
    # CUDA graphs (pipeline/cuda_graphs.py) need it; upstream with it too, for a fair ratio
    "upstream-gpu-only-native": ("upstream", None, ["--gpu-only", "--disable-cuda-malloc"], None),
    "upstream-bf16-native": ("upstream", None, ["--disable-cuda-malloc"], None),
    "pack-bf16-native": ("pack", "bf16", ["--disable-cuda-malloc"], "auto"),
    "pack-fp16-native": ("pack", "fp16", ["--disable-cuda-malloc"], "auto"),
    "pack-fp8-native": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-bf16-native-nographs": ("pack", "bf16", ["--disable-cuda-malloc"], "auto"),
    "pack-bf16-eager-native": ("pack", "bf16", ["--disable-cuda-malloc"], "off"),
    "pack-fp8-native-graphs": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-bf16-native-graphs": ("pack", "bf16", ["--disable-cuda-malloc"], "auto"),
    "pack-fp16-native-graphs": ("pack", "fp16", ["--disable-cuda-malloc"], "auto"),
    # fp8's w2 input from the pack's SwiGLU kernel (NEWBIE_FP8_W2=kernel, pipeline/swiglu_fp8.py), without and with
    # the kept CUDA graphs
    "pack-fp8-native-w2kernel": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-fp8-native-graphs-w2kernel": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-fp8-native-graphs-w2kernel1": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-fp8-w2kernel1": ("pack", "fp8", [], "auto"),  # the one-pass kernel alone, against pack-fp8: a default?
    "pack-fp8-native-graphs-w2kernel1-adaln": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-fp8-native-graphs-w2kernel1-nows": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    "pack-fp8-native-graphs-w2kernel1-adaln-nows": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    # ... with q, k and v from the pack's one kernel (NEWBIE_QKV_ROPE=1, pipeline/qkv_rope.py; the default since
    # run124, so that the configuration without `-qkvrope` has it too from then on)
    "pack-fp8-native-graphs-w2kernel1-nows-qkvrope": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    # the prompt pair batched into one DiT call a step (pipeline/cfg_batch.py; by default only a streamed DiT is),
    # half the calls for the CPU-bound resident fp8 step, with the SwiGLU kernel (run97: no faster; the GPU's work
    # grows by the padding, run96)
    "pack-fp8-batched-w2kernel": ("pack", "fp8", [], "auto"),
    "pack-fp8-native-graphs-batched-w2kernel": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    # fp8's GEMMs with their partial sums promoted to fp32, the default before fast accumulation (run94-95)
    "pack-fp8-native-fp32accum": ("pack", "fp8", ["--disable-cuda-malloc"], "auto"),
    # A fresh server that first runs a NewBieVRAMWarmup graph (timed separately), then the real job.
    "pack-fp16-warmup": ("pack", "fp16", [], "auto"),
}
# pack-PRECISION-SWITCH: the pack's defaults with one switch set in its server's environment: the block prefetch of a
# streamed DiT (pipeline/block_prefetch.py) off, or the batching of a prompt pair of different lengths
# (pipeline/cfg_batch.py; by default where a quarter or more of the DiT streams) off or always on.
SWITCHES = {"noprefetch": {"NEWBIE_BLOCK_PREFETCH": "0"}, "separate": {"NEWBIE_CFG_BATCH": "off"},
            "batched": {"NEWBIE_CFG_BATCH": "always"}, "flash": {"NEWBIE_SDPA": "flash"},
            "cppwrapper": {"NEWBIE_CPP_WRAPPER": "1"}, "nographs": {"NEWBIE_CUDA_GRAPHS": "0"},
            "cudnn": {"NEWBIE_SDPA": "cudnn"},
            # a DiT that does not fit streamed under ComfyUI's dynamic VRAM (with the block prefetch), as before the
            # block streamer of its non-dynamic patcher (pipeline/block_stream.py)
            "nostream": {"NEWBIE_BLOCK_STREAM": "0"},
            # a decode's eviction of a resident DiT copied out and back every image (pipeline/host_copies.py off)
            "nocopies": {"NEWBIE_HOST_COPIES": "0"},
            # the sampler compares its sigmas on the GPU every step, as ComfyUI has it (pipeline/host_sigmas.py off)
            "gpusigmas": {"NEWBIE_HOST_SIGMAS": "0"},
            # Inductor without its pool of compile worker processes: does starting that pool make the 6 s of
            # "Inductor" a first image pays with the cache filled (run45)? Compare a second server's cold image.
            "compile1": {"TORCHINDUCTOR_COMPILE_THREADS": "1"},
            # Inductor's coordinate-descent tuning of its Triton kernels' block sizes (the norms, SwiGLU, q/k norm +
            # RoPE: about 17 ms of a resident bf16 step, run66): does it pay for its longer first compile?
            "cdtune": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"},
            # the conditioning copied to the GPU at every DiT call, as ComfyUI has it (pipeline/device_conds.py off)
            "hostconds": {"NEWBIE_DEVICE_CONDS": "0"},
            # flash-attn-4 without its on-disk kernel cache, as before the pack switched it on (pipeline/flash_attn4.py)
            "fa4nocache": {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0"},
            # fp8's w2 multiplied in fp8, its input scaled per row (pipeline/quantized_ops.py fp8_linear_rowwise; the
            # default since run87), or in bf16 as before
            "w2rowwise": {"NEWBIE_FP8_W2": "rowwise"}, "w2bf16": {"NEWBIE_FP8_W2": "bf16"},
            "w2kernel": {"NEWBIE_FP8_W2": "kernel"},
            # ... by its one-pass form (75 against 106 us a call, run110)
            "w2kernel1": {"NEWBIE_FP8_W2": "kernel1"},
            # the blocks' adaLN modulation as a product and a sum in compiled blocks (pipeline/adaln_reduce.py, runs
            # 114 and 118; removed after them, no gain: the variable is no longer read)
            "adaln": {"NEWBIE_ADALN": "reduce"},
            # cuBLASLt without a workspace (PyTorch reads CUBLASLT_WORKSPACE_SIZE, in KiB, once a process): its fp8
            # GEMMs then choose kernels that need no zeroed workspace, without the 228 memsets a step (run115-117)
            "nows": {"CUBLASLT_WORKSPACE_SIZE": "0"},
            # q/k RMSNorm + RoPE and v from the pack's one kernel a layer (pipeline/qkv_rope.py; opt-in until run124,
            # on by default since), or from ComfyUI's ops as Inductor fuses them
            "qkvrope": {"NEWBIE_QKV_ROPE": "1"}, "noqkvrope": {"NEWBIE_QKV_ROPE": "0"},
            # fp8 GEMMs with their partial sums promoted to fp32, as before fast accumulation became the default
            # (use_fast_accum, pipeline/quantized_ops.py, run94-95)
            "fp32accum": {"NEWBIE_FP8_ACCUM": "fp32"},
            # flash-attn-4 given ComfyUI's repeated key/value heads, as before pipeline/kv_repeat.py
            "kvcopies": {"NEWBIE_FA4_GQA": "0"},
            # PyTorch SDPA (cuDNN first) given NewBie's 8 key/value heads with enable_gqa where its backend takes
            # them (opt-in until run126, the default since), or ComfyUI's copies
            "sdpagqa": {"NEWBIE_SDPA_GQA": "1"}, "nosdpagqa": {"NEWBIE_SDPA_GQA": "0"},
            # the VAE beside a resident DiT under ComfyUI's dynamic VRAM: the default again since run129, where
            # ComfyUI's non-dynamic patcher for it (pipeline/vae_resident.py, then removed) gained nothing; the
            # variable is no longer read
            "dynvae": {"NEWBIE_VAE_RESIDENT": "0"},
            # the VAE's GroupNorms by PyTorch's kernel, as before pipeline/group_norm.py (run130 on)
            "nogn": {"NEWBIE_VAE_GROUP_NORM": "0"},
            # every Dynamo guard checked at every compiled block call, as before pipeline/guard_skip.py
            "guards": {"NEWBIE_GUARD_SKIP": "0"},
            # flash-attn-4's own Python finds and launches its kernel at every call, as before pipeline/fa4_replay.py
            "fa4launch": {"NEWBIE_FA4_REPLAY": "0"}}
CONFIG_ENV = {f"pack-{p}-{switch}": env for p in ("fp16", "bf16", "fp8", "int8") for switch, env in SWITCHES.items()}
CONFIGS.update({name: ("pack", name.split("-")[1], [], "auto") for name in CONFIG_ENV})
CONFIG_ENV["pack-bf16-native-nographs"] = SWITCHES["nographs"]
# the CPU's share of a step as before runs 104-106: every Dynamo guard checked and flash-attn-4's own Python at each call
CONFIG_ENV.update({f"pack-{p}-guards-fa4launch": {**SWITCHES["guards"], **SWITCHES["fa4launch"]} for p in ("fp8", "bf16")})
CONFIGS.update({f"pack-{p}-guards-fa4launch": ("pack", p, [], "auto") for p in ("fp8", "bf16")})
# CUDA graphs on (opt-in), with Dynamo's recompile reasons in the server log
CONFIG_ENV.update({f"pack-{p}-native-graphs": {"NEWBIE_CUDA_GRAPHS": "1", "TORCH_LOGS": "recompiles"}
                   for p in ("fp8", "bf16", "fp16")})
CONFIG_ENV["pack-fp8-native-w2kernel"] = SWITCHES["w2kernel"]
CONFIG_ENV["pack-fp8-native-graphs-w2kernel"] = {**CONFIG_ENV["pack-fp8-native-graphs"], **SWITCHES["w2kernel"]}
CONFIG_ENV["pack-fp8-native-graphs-w2kernel1"] = {**CONFIG_ENV["pack-fp8-native-graphs"], **SWITCHES["w2kernel1"]}
CONFIG_ENV["pack-fp8-w2kernel1"] = SWITCHES["w2kernel1"]
CONFIG_ENV["pack-fp8-native-graphs-w2kernel1-adaln"] = {**CONFIG_ENV["pack-fp8-native-graphs-w2kernel1"],
                                                         **SWITCHES["adaln"]}
CONFIG_ENV["pack-fp8-native-graphs-w2kernel1-nows"] = {**CONFIG_ENV["pack-fp8-native-graphs-w2kernel1"],
                                                        **SWITCHES["nows"]}
CONFIG_ENV["pack-fp8-native-graphs-w2kernel1-adaln-nows"] = {**CONFIG_ENV["pack-fp8-native-graphs-w2kernel1-adaln"],
                                                              **SWITCHES["nows"]}
CONFIG_ENV["pack-fp8-native-graphs-w2kernel1-nows-qkvrope"] = {**CONFIG_ENV["pack-fp8-native-graphs-w2kernel1-nows"],
                                                                **SWITCHES["qkvrope"]}
CONFIG_ENV["pack-fp8-native-fp32accum"] = SWITCHES["fp32accum"]
CONFIG_ENV["pack-fp8-batched-w2kernel"] = {**SWITCHES["batched"], **SWITCHES["w2kernel"]}
CONFIG_ENV["pack-fp8-native-graphs-batched-w2kernel"] = {**CONFIG_ENV["pack-fp8-native-graphs-w2kernel"],
                                                        **SWITCHES["batched"]}
# pack-PRECISION-teFORMAT: Gemma-3's decoder layers quantized too (the loader's text_encoder_precision), for the text
# encoders' stage and the peak at a budget
TE_PRECISIONS = {f"pack-{p}-te{te}": te for p in ("fp16", "bf16", "fp8", "int8") for te in ("fp8", "int8")}
CONFIGS.update({name: ("pack", name.split("-")[1], [], "auto") for name in TE_PRECISIONS})


def graph(kind: str, precision: str | None, names: dict, seed: int, width: int, height: int, steps: int,
          sampler: str = "euler_ancestral", compiled: bool = False, compile_mode: str = "auto",
          profile: dict | None = None, te_precision: str = "auto") -> dict:
    if kind == "pack":
        nodes = {"1": {"class_type": "NewBieLoader", "inputs": {
            "diffusion_model": names["dit"], "gemma": names["gemma"], "jina": names["jina"], "vae": names["vae"],
            "precision": precision, "text_encoder_precision": te_precision, "compile": compile_mode}}}
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    else:
        nodes = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["dit"],
                                                         "weight_dtype": precision or "default"}},
            "8": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": names["gemma"], "clip_name2": names["jina"],
                                                            "type": "newbie", "device": "default"}},
            "9": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
        }
        model, clip, vae = ["1", 0], ["8", 0], ["9", 0]
        if compiled:
            nodes["11"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": "inductor"}}
            model = ["11", 0]
    if profile:  # --profile: devkit/profile_nodes between the model and KSampler ({"run": N, "out": path})
        nodes["12"] = {"class_type": "NewBieBenchProfile", "inputs": {"model": model, **profile}}
        model = ["12", 0]
    nodes.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": XML, "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEG, "clip": clip}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": sampler, "scheduler": "simple",
                                                   "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": vae}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench"}},
    })
    return nodes


class GpuMemoryTrace:
    """nvidia-smi streaming per-process used memory every 50 ms; keeps (t, MiB) for one pid."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.t0 = pid, [], time.perf_counter()
        self.proc = subprocess.Popen(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits", "-lms", "50"],
                                     stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                pid, used = (int(x) for x in line.strip().split(","))
            except ValueError:
                continue
            if pid == self.pid:
                self.samples.append((round(time.perf_counter() - self.t0, 3), used))

    def mark(self) -> float:
        return time.perf_counter() - self.t0

    def stop(self):
        self.proc.terminate()
        self.proc.wait()

    def peak_between(self, a: float, b: float) -> float:
        vals = [m for t, m in self.samples if a <= t <= b]
        return max(vals) / 1024 if vals else 0.0


def image_wall(events: list, queued_at: float) -> float:
    """Seconds from posting the graph to the websocket's end-of-prompt event (`executing` with no node, or
    `execution_success`): the image's latency without the client's /history polling and its 0.3 s listening tail
    (runs before 22 included both, about 0.5 s on every configuration alike)."""
    ends = [e["_t"] for e in events if e.get("type") == "execution_success"
            or (e.get("type") == "executing" and e.get("data", {}).get("node") is None)]
    return (min(ends) if ends else time.perf_counter()) - queued_at


def stage_times(graph_: dict, events: list) -> dict:
    starts = [(e["data"]["node"], e["_t"]) for e in events if e.get("type") == "executing"]
    out = {}
    for (node, t), (_, t_next) in zip(starts, starts[1:]):
        if node is None:
            continue
        cls = graph_[node]["class_type"]
        key = {"CLIPTextEncode": "text_encode", "KSampler": "sampling", "VAEDecode": "decode"}.get(cls, cls)
        out[key] = round(out.get(key, 0.0) + t_next - t, 3)
    prog = [e["_t"] for e in events if e.get("type") == "progress" and e["data"].get("node") == "5"]
    if len(prog) > 2:
        out["it_per_s"] = round((len(prog) - 1) / (prog[-1] - prog[0]), 3)
    return out


def run_config(name: str, budget, names: dict, models: Path, work: Path, args) -> dict:
    kind, precision, flags, compile_mode = CONFIGS[name]
    te_precision = TE_PRECISIONS.get(name, "auto")
    hog = None
    result = {"config": name, "budget_gib": budget, "flags": flags, "kind": kind, "precision": precision,
              "compile": compile_mode}
    if budget is not None:
        hog = subprocess.Popen([sys.executable, str(REPO / "bench" / "budget.py"), str(budget)],
                               stdout=subprocess.PIPE, text=True)
        result["budget_note"] = hog.stdout.readline().strip()
    server = harness.ComfyServer(Path(os.environ["COMFYUI_PATH"]), work / f"{name}-{budget}", models,
                                 extra_args=flags, cpu=False, env=CONFIG_ENV.get(name),
                                 extra_nodes=[harness.PROFILE_NODES] if args.profile else [])
    # --profile: one more image after the warm ones, its sampling run profiled inside the server
    profile = {"run": args.warm + 2, "out": str(work / f"{name}-{budget}" / "profile.json")} if args.profile else None
    try:
        t = time.perf_counter()
        server.start()
        result["server_start_s"] = round(time.perf_counter() - t, 2)
        trace = GpuMemoryTrace(server.proc.pid)
        if name.endswith("-warmup"):
            g = graph(kind, precision, names, 1, args.width, args.height, args.steps, te_precision=te_precision)
            warm_graph = {k: g[k] for k in ("1", "2", "3")}
            warm_graph["10"] = {"class_type": "NewBieVRAMWarmup", "inputs": {
                "model": ["1", 0], "width": args.width, "height": args.height, "batch_size": 1, "steps": 2,
                "clip": ["1", 1], "vae": ["1", 2]}}
            warm_graph["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
            t = time.perf_counter()
            entry = server.run(warm_graph, timeout=args.timeout)
            result["warmup"] = {"wall_s": round(time.perf_counter() - t, 3),
                                "report": json.dumps(entry.get("outputs", {}))[:1500]}
        runs = [("cold", 1)] + [(f"warm{i}", 2 + i) for i in range(args.warm)]
        for run, seed in runs + ([("profiled", 50)] if profile else []):
            # the profiled image samples --profile-steps: summarising a profile of 25 steps took 28-88 s (run50)
            steps = args.profile_steps if run == "profiled" else args.steps
            g = graph(kind, precision, names, seed, args.width, args.height, steps, args.sampler,
                      compiled=name == "upstream-compile", compile_mode=compile_mode or "off", profile=profile,
                      te_precision=te_precision)
            a = trace.mark()
            t = time.perf_counter()
            try:
                entry, events = server.run_with_events(g, timeout=args.timeout)
            except Exception as e:  # a failed configuration is a result too
                result[run] = {"error": str(e)[:2000]}
                break
            result[run] = {"wall_s": round(image_wall(events, t), 3),
                           "peak_gib": round(trace.peak_between(a, trace.mark()), 3),
                           **stage_times(g, events), "image": str(server.output_images(entry)[0])}
            result[run]["image_sha256"] = hashlib.sha256(Path(result[run]["image"]).read_bytes()).hexdigest()
        trace.stop()
        if profile and Path(profile["out"]).exists():
            result["profile"] = json.loads(Path(profile["out"]).read_text())
        result["trace"] = trace.samples[::4]
        result["warm"] = summarise([result[r] for r, _ in runs[1:] if r in result and "wall_s" in result[r]])
        if args.restart:
            result["restarted"] = restarted_image(server, kind, precision, names, compile_mode, args, name,
                                                  te_precision)
    finally:
        server.stop()
        result["log_events"] = log_events(server.log_path, args.out / "logs" / f"{name}-{budget}.log")
        if hog:
            hog.kill()
            hog.wait()
    return result


def restarted_image(server, kind, precision, names, compile_mode, args, name, te_precision="auto") -> dict:
    """A second server on the same machine (same user caches: Inductor's FX-graph and autotuning caches, kept under
    /tmp by default), one image with a new seed: what a restarted ComfyUI pays before its first image."""
    server.stop()
    t = time.perf_counter()
    server.start()
    out = {"server_start_s": round(time.perf_counter() - t, 2)}
    g = graph(kind, precision, names, 99, args.width, args.height, args.steps, args.sampler,
              compiled=name == "upstream-compile", compile_mode=compile_mode or "off", te_precision=te_precision)
    t = time.perf_counter()
    try:
        entry, events = server.run_with_events(g, timeout=args.timeout)
    except Exception as e:
        return {**out, "error": str(e)[:2000]}
    return {**out, "wall_s": round(image_wall(events, t), 3), **stage_times(g, events)}


LOG_EVENTS = {  # what the server log says about memory, compile and the fp16 path; counted per configuration
    "fp16_recompute": "recomputing it in",
    "model_load": "Requested to load",
    "partial_load": "loaded partially",
    "unload": "Unloaded partially",
    "full_unload": "Unloaded ",
    "recompile": "Recompiling",
    "graph_break": "Graph break",
    "oom": "out of memory",
    "graph_runs": "NewBie CUDA graphs: ",  # one line per sampling run that could record
    "graph_failed": "recording a DiT call failed",
    "fa4": "attention: FlashAttention-4",  # the loader chose flash-attn-4 (pipeline/sdpa.py)
    "fa4_unloadable": "flash-attn-4 is installed but does not load",
    "swiglu_kernel": "make w2's input with the pack's SwiGLU kernel",  # one line per model built with it
    # flash-attn-4 kept ComfyUI's 24 key/value copies (pipeline/kv_repeat.py): until its fix every server did (run108)
    "kv_copies_kept": "key/value copies are not side by side here; they stay repeated",
}
# events that say a part of the pack did not run as it should: printed with each configuration's line
WARNING_EVENTS = ("oom", "graph_failed", "fa4_unloadable", "kv_copies_kept")


def warnings_of(events: dict) -> dict:
    """The WARNING_EVENTS a configuration's log has, with their counts."""
    return {k: events[k] for k in WARNING_EVENTS if events.get(k)}


def log_events(log_path: Path, copy_to: Path) -> dict:
    """Counts of LOG_EVENTS in the server log, and a copy of the log under OUT/logs/."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return {}
    copy_to.parent.mkdir(parents=True, exist_ok=True)
    copy_to.write_text(text[-200_000:])
    return {k: text.count(v) for k, v in LOG_EVENTS.items()}


def summarise(warm_runs: list[dict]) -> dict:
    """Median and spread (min, max) of each warm figure; the median run's image."""
    if not warm_runs:
        return {"error": "no warm run completed"}
    out = {"n": len(warm_runs), "image": warm_runs[0].get("image")}
    for key in ("wall_s", "sampling", "it_per_s", "peak_gib", "text_encode", "decode"):
        vals = [r[key] for r in warm_runs if key in r]
        if vals:
            out[key] = round(statistics.median(vals), 3)
            out[key + "_range"] = [min(vals), max(vals)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--models", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--configs", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--warm", type=int, default=3, help="warm runs per server (median and spread reported)")
    ap.add_argument("--rounds", type=int, default=1, help="run the configuration list this many times, alternating")
    ap.add_argument("--sampler", default="euler_ancestral", help="KSampler sampler_name")
    ap.add_argument("--tiny", action="store_true", help="use the tiny model (smoke test)")
    ap.add_argument("--profile", action="store_true",
                    help="after the warm runs, one more image whose sampling run is profiled inside the server "
                         "(devkit/profile_nodes; its summary is the configuration's `profile` in results.json)")
    ap.add_argument("--profile-steps", type=int, default=4, help="steps of the profiled image")
    ap.add_argument("--restart", action="store_true",
                    help="after the warm runs, restart the server and time one more image (compile caches kept)")
    args = ap.parse_args()
    args.width, args.height = (int(v) for v in args.size.split("x"))
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from devkit import tiny_models

    spec = tiny_models.TINY if args.tiny else tiny_models.FULL
    t = time.perf_counter()
    paths = tiny_models.write_single_files(args.models, spec, device="cuda")
    names = {k: p.name for k, p in paths.items()}
    print(f"[bench] weights ready in {time.perf_counter() - t:.1f} s: {names}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    work = Path("/tmp/bench-work")
    this_call = []
    for rnd, item in ((r, item) for r in range(args.rounds) for item in args.configs.split(",")):
        name, _, budget = item.partition("@")
        budget = None if budget in ("", "none") else float(budget)
        t = time.perf_counter()
        r = run_config(name, budget, names, args.models, work, args)
        r.update(steps=args.steps, size=args.size, model=spec.name, sampler=args.sampler, round=rnd)
        results.append(r)
        this_call.append(r)
        results_path.write_text(json.dumps(results, indent=1))
        brief = {"cold": r.get("cold"), "warm": {k: v for k, v in r.get("warm", {}).items() if k != "image"},
                 "log_warnings": warnings_of(r.get("log_events", {}))}
        print(f"[bench] {item} ({time.perf_counter() - t:.0f} s): {json.dumps(brief)}", flush=True)

    print(ratio_table(this_call), flush=True)


if __name__ == "__main__":
    main()
