"""Regenerate docs/BENCHMARKS.md (tables) and docs/images/bench-*.png (plots) from the JSON that the device
runs wrote (bench/results/<run>-results.json, <run>-fp16_accuracy.json, <run>-oom.json).

    python bench/report.py     # needs matplotlib for the plots
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
IMAGES = REPO / "docs" / "images"
sys.path.insert(0, str(REPO / "bench"))

from ratios import ratio_table  # noqa: E402

COMMANDS = {
    "run2": "python3 bench/run.py --configs pack-fp16@16,upstream-bf16@16,pack-bf16@16,upstream-fp32@16 "
            "--timeout 200 && python3 bench/fp16_accuracy.py",
    "run3": "python3 bench/run.py --configs pack-fp16@16,pack-fp16-warmup@16,pack-fp16-gpu-only@none,"
            "pack-bf16-gpu-only@none --timeout 200 && python3 bench/fp16_accuracy.py",
    "run4": "python3 bench/run.py --configs pack-fp16-gpu-only@none,pack-fp16-legacy@none,pack-fp16@16,"
            "upstream-gpu-only@none,upstream-legacy@none --timeout 200 && python3 bench/fp16_accuracy.py",
    "run5": "python3 bench/run.py --configs pack-bf16@8,upstream-bf16@8,pack-fp16@8,pack-bf16@12 --timeout 200; "
            "python3 bench/oom_recovery.py --weights-dir /tmp/models --precision fp16 --budget-gib 16 "
            "--grab-at-step 0 --unguarded-too",
    "run6": "python3 bench/run.py --configs upstream-bf16@12,pack-bf16@6,upstream-bf16@6,pack-bf16@4,"
            "upstream-bf16@4 --timeout 200; python3 bench/oom_recovery.py --weights-dir /tmp/models --precision fp16 "
            "--budget-gib 16 --grab-at-step 0 --leave-gib 0.3 --unguarded-too --server-arg=--disable-dynamic-vram",
    "run7": "python3 bench/oom_recovery.py --weights-dir /tmp/models --precision fp16 --budget-gib 16 "
            "--grab-at-call 0 --leave-gib 0.2 --unguarded-too --server-arg=--disable-dynamic-vram (run7b: the same "
            "without --server-arg, i.e. dynamic VRAM)",
    "run8": "python3 bench/run.py --size 1024x1536 --configs pack-fp16@16,pack-bf16@16,upstream-bf16@16 && "
            "python3 bench/run.py --size 768x768 --configs pack-fp16@16,upstream-bf16@16",
    "run10": "COMFYUI_PATH=<ComfyUI v0.8.0, 618b803d> python3 bench/run.py --configs pack-fp16@16,pack-bf16@16",
    "run11": "(experiment, reverted) python3 bench/run.py --configs pack-fp16-gpu-only@none,pack-fp16@16 && "
             "python3 bench/fp16_accuracy.py",
    "run12": "(H200) python3 bench/profile_dit.py --variants bf16,bf16+compile,fp16_pack,fp16_pack+compile && "
             "python3 bench/run.py --configs upstream-gpu-only@none,pack-bf16@none,pack-fp16@none,upstream-bf16@8,"
             "pack-bf16@8 --warm 3",
    "run13": "(H200) python3 bench/run.py --configs upstream-gpu-only@none,pack-bf16@none,pack-fp16@none,"
             "upstream-bf16@16,pack-fp16@16,pack-bf16@16 --warm 3 --timeout 200; python3 bench/profile_dit.py "
             "--variants bf16,bf16+compile,fp16_pack+compile,bf16+compile:reduce-overhead --calls 5 --top 25",
    "run14": "(H200, the next call on the same machine) python3 bench/run.py --configs upstream-compile@none,"
             "pack-bf16@none --warm 3 --timeout 200",
    "run15": "(H200, torch 2.11 cu130, with rope_fusion) python3 bench/run.py --configs upstream-gpu-only@none,"
             "pack-bf16@none,pack-bf16-eager@none,pack-fp16@none,upstream-bf16@16,pack-fp16@16 --warm 3 --timeout 200; "
             "(the next call on the same machine) python3 bench/profile_dit.py --variants "
             "bf16+compile,fp16_pack+compile,fp16_pack --calls 5 --top 25",
    "run16": "(H200, a new machine) python3 bench/vae_memory.py --sizes 512,1024,1536,2048; python3 bench/run.py "
             "--configs pack-fp16@none,pack-bf16@none,upstream-bf16@8,pack-bf16@8 --warm 3 --timeout 200; "
             "python3 bench/fp16_accuracy.py",
    "run17": "(H200, the next call on the same machine, with the measured VAE estimate) python3 bench/run.py "
             "--configs upstream-bf16@8,pack-bf16@8,upstream-bf16@12,pack-bf16@12,upstream-bf16@4,pack-bf16@4 "
             "--warm 3 --timeout 150",
    "run18": "(H200, a new machine; the pack at abcc16c: quantized DiTs eager under dynamic VRAM) python3 "
             "bench/quant_accuracy.py --models /tmp/models --out $OUT; python3 bench/run.py --configs pack-fp8@8,"
             "upstream-bf16@8,pack-int8@8,pack-fp8@none,upstream-fp8@none,pack-bf16@none,pack-fp8-compiled@none "
             "--warm 3 --timeout 200",
    "run19": "(H200, a new machine; resident weights on the non-dynamic patcher, eager too) python3 "
             "bench/profile_dit.py --variants bf16,fp8,int8,fp8+compile --calls 5 --top 20 (fp8+compile failed in "
             "Dynamo, see NOTES); python3 bench/run.py --configs upstream-gpu-only@none,pack-bf16@none,pack-fp8@none,"
             "pack-bf16-eager@none,pack-fp8@8,upstream-bf16@8,pack-int8@none --warm 3 --timeout 120",
    "run20": "(H200, the next call on the same machine) python3 bench/run.py --configs upstream-bf16@12,pack-bf16@12,"
             "upstream-bf16@6,pack-bf16@6,pack-fp8@6,upstream-bf16@4,pack-bf16@4,pack-fp8@4 --warm 3 --timeout 110",
    "run21": "(H200, a new machine; int8 layers dequantised on Hopper) python3 bench/profile_dit.py --variants "
             "bf16,int8 --calls 5 --top 12; python3 bench/run.py --configs pack-int8@8,upstream-bf16@8 --warm 3 "
             "--timeout 45 (the call's time ran out before upstream-bf16@8)",
    "run22": "(H200, a new machine; the pack at d46a911, plain-op fp8 layers; warm times include about 0.5 s of the "
             "client's polling) python3 bench/profile_dit.py --variants bf16+compile,fp8,fp8+compile --calls 5 --top 20; "
             "python3 bench/run.py --configs pack-fp8-compiled@none,pack-bf16@none,upstream-gpu-only@none --warm 3 "
             "--timeout 150",
    "run23": "(H200, the next call on the same machine, polled warm times as run22) python3 bench/run.py --configs "
             "pack-fp8-compiled@8,upstream-bf16@8,pack-bf16@8,pack-int8@8 --warm 3 --timeout 150",
    "run24": "(H200, a new machine; compile auto compiles plain-op fp8/int8; w2 in fp8 with a dynamic input scale, "
             "reverted after this run; warm times from the websocket's end event from here on) python3 "
             "bench/profile_dit.py --variants fp32,fp8,fp8+compile,int8+compile,bf16+compile --calls 5 --top 15; "
             "python3 bench/run.py --configs pack-fp8@none,pack-bf16@none,upstream-gpu-only@none --warm 3 --timeout 150",
    "run25": "(H200, the next call on the same machine) python3 bench/run.py --configs pack-fp8@8,upstream-bf16@8,"
             "pack-int8@8,pack-fp8@6,upstream-bf16@6 --warm 3 --timeout 150",
    "run26": "(H200, the next call on the same machine) python3 bench/run.py --configs pack-fp16@none,pack-bf16@none,"
             "pack-fp8@4,upstream-bf16@4 --warm 3 --timeout 120",
    "run27": "(H200, a new machine, the pack at 7a81337: prompt pairs batched always, block prefetch; the first call, "
             "profile_sampling with stacks over 25 steps, timed out at 570 s with nothing written) python3 bench/run.py "
             "--configs upstream-gpu-only@none,pack-bf16@none,pack-fp16@none --warm 3 --timeout 120",
    "run28": "(H200, the next call on the same machine; -separate: NEWBIE_CFG_BATCH off, -noprefetch: "
             "NEWBIE_BLOCK_PREFETCH=0) python3 bench/run.py --configs pack-bf16-separate@none,pack-bf16@none,"
             "pack-bf16@4,pack-bf16-noprefetch@4 --warm 3 --timeout 120",
    "run29": "(H200, the next call on the same machine) python3 bench/run.py --configs upstream-bf16@4,pack-bf16@4,"
             "upstream-bf16@8,pack-bf16@8 --warm 3 --timeout 100",
    "run30": "(H200, a new machine, the pack at fda6e31; the same call's profile_sampling failed: the first form of "
             "pipeline/sdpa.py broke the compiled trace) python3 bench/attention_backends.py",
    "run31": "(H200, the next call on the same machine) python3 bench/profile_sampling.py --variants "
             "bf16+compile,fp16+compile+batched,bf16+compile+batched,fp16+compile",
    "run32": "(H200, a new machine) python3 bench/profile_sampling.py --variants bf16+compile --steps 6 "
             "--profile-steps 2 --stacks --top 8 && python3 bench/run.py --configs upstream-bf16@8,pack-bf16@8,"
             "pack-fp8@8 --warm 3 --timeout 120",
    "run33": "(H200, a new machine; the pack at b7392ad: a streaming DiT always batched) python3 bench/run.py "
             "--configs upstream-gpu-only@none,pack-bf16@none,pack-fp16@none,upstream-bf16@8,pack-bf16-separate@8,"
             "pack-bf16@8,pack-fp16-separate@none --warm 3 --timeout 120",
    "run34": "(H200, a new machine, noisy: it/s swung 3.6-5.5 within single runs; the pack batching a streamed DiT "
             "only from a quarter of its weights streamed) python3 bench/run.py --configs pack-bf16@8,"
             "upstream-bf16@8,pack-bf16@4 --warm 3 --timeout 100",
    "run35": "(H200, a new machine; the pack at 0a6fbc6 + CUDA graphs on by default) python3 bench/sampling_accuracy.py "
             "--variants bf16+compile,bf16+compile+graphs --steps 25; python3 bench/run.py --configs "
             "upstream-gpu-only@none,pack-bf16@none,pack-bf16-nographs@none,pack-fp16@none --warm 3 --timeout 150 "
             "(pack-bf16 and pack-fp16: the recording failed under ComfyUI's cudaMallocAsync allocator and the server "
             "aborted)",
    "run36": "(H200, a new machine; graphs only with PyTorch's native allocator) python3 bench/run.py --configs "
             "upstream-gpu-only@none,upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-native@none,"
             "pack-bf16-native-nographs@none,pack-fp16-native@none --warm 3 --timeout 150",
    "run37": "(H200, same machine as run36) python3 bench/run.py --configs pack-fp8@none,pack-fp8-native@none,"
             "upstream-bf16@8,pack-bf16@8,pack-fp8@8,pack-bf16-eager@none,pack-bf16-eager-native@none --warm 3 "
             "--timeout 150 (pack-fp8-native: every recording failed, Dynamo compiling inside it)",
    "run38": "(H200, a new machine; graphs opt-in, Dynamo kept from compiling while recording) python3 bench/run.py "
             "--configs pack-fp8-native-graphs@none,pack-fp8-native@none,upstream-bf16@8,pack-fp8-native-graphs@8 "
             "--warm 3 --timeout 110",
    "run39": "(H200, a new machine) python3 bench/run.py --configs upstream-gpu-only-native@none,pack-bf16@none,"
             "pack-fp16@none,pack-fp16-native-graphs@none,pack-bf16-native-graphs@none --warm 3 --timeout 150",
    "run40": "(H200, the next call on the same machine after one that stashed .fa4a; flash-attn-4 failed to import, "
             "its DSL's path from a .pth file missing, so every pack configuration used cuDNN) an inline form "
             "of bench/fa4_install.sh; python3 bench/attention_backends.py; python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-cudnn@none,pack-fp16@none --warm 3 --timeout 140",
    "run41": "(H200, the next call on the same machine; flash-attn-4 still failed to import, nvidia-cutlass-dsl-"
             "libs-core missing: cuDNN everywhere) python3 bench/attention_backends.py; python3 bench/run.py "
             "--configs upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-cudnn@none,pack-fp16@none,"
             "pack-fp8@none --warm 3 --timeout 140",
    "run42": "(H200, the next call on the same machine; flash-attn-4 4.0.0b40 loaded, so pack-bf16 ran it and "
             "pack-bf16-cudnn PyTorch's cuDNN attention) python3 bench/attention_backends.py --backends cudnn,fa4; "
             "python3 bench/run.py --configs upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-cudnn@none "
             "--warm 3 --timeout 140",
    "run43": "(H200, the next call on the same machine, flash-attn-4 loaded) python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-cudnn@none,pack-fp16@none,pack-fp8@none "
             "--warm 3 --timeout 120",
    "run44": "(H200, a new machine, the pack at bf15697) python3 bench/run.py --configs upstream-bf16@4,pack-fp8@4,"
             "pack-int8@4,upstream-bf16@6,pack-fp8@6,pack-int8@6 --warm 3 --timeout 110",
    "run45": "(H200, a new machine; the pack at 8ddd54b: fp16 reads its overflow flag once a step and keeps two calls "
             "a step; flash-attn-4 not installed, so pack-bf16 and pack-bf16-cudnn are the same configuration, the "
             "second with Inductor's cache filled by the first) python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-bf16@none,pack-fp16@none,pack-fp16-batched@none,"
             "pack-bf16-cudnn@none --warm 3 --timeout 120",
    "run46": "(H200, the next call on the same machine; a plain-op quantized DiT tolerates 2 GiB of decode eviction) "
             "python3 bench/run.py --configs upstream-bf16@6,pack-fp8@6,pack-int8@6,upstream-bf16@8,pack-fp8@8 "
             "--warm 3 --timeout 100",
    "run47": "(H200, a new machine with the session's last 244 s; the pack at 152856e: the cast layers' own cast "
             "state, the compile line's cache counters; no upstream in this call) python3 bench/run.py --configs "
             "pack-fp8@6 --warm 2 --timeout 90",
    "run48": "(H200, a new machine; the pack at 19652ca) python3 bench/profile_sampling.py --variants "
             "bf16+compile,fp16+compile --steps 25 --profile-steps 2 (PyTorch's native allocator); run48b: the same "
             "with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (ComfyUI's default allocator)",
    "run48b": "(H200, run48's call) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python3 bench/profile_sampling.py "
              "--variants bf16+compile,fp16+compile --steps 25 --profile-steps 2",
    "run49": "(H200, the next call on the same machine) python3 bench/run.py --configs upstream-gpu-only-native@none,"
             "pack-bf16@none,pack-fp16@none,pack-fp16-gpu-only@none,upstream-bf16@8,pack-bf16@8 --warm 3 --timeout 100",
    "run50": "(H200, a new machine; the call ran out of its 590 s after four servers, each profiled image summarising "
             "25 steps for 28-88 s) python3 bench/run.py --profile --configs upstream-gpu-only-native@none,"
             "pack-bf16@none,pack-fp16@none,pack-fp16-nodynamic@none,pack-fp16-gpu-only@none,pack-bf16-gpu-only@none "
             "--warm 3 --timeout 100",
    "run51": "(H200, a new machine) python3 bench/run.py --configs upstream-bf16@16,pack-bf16@16,pack-fp16@16,"
             "upstream-bf16@12,pack-bf16@12 --warm 3 --timeout 100",
    "run52": "(H200, a new machine; the pack at 68ccabf, the fp16 weight-dtype fix) python3 bench/run.py --configs "
             "pack-bf16@none,upstream-gpu-only-native@none,pack-fp16@none,pack-bf16-eager@none,pack-bf16@16,"
             "pack-fp16@16 --warm 3 --timeout 100",
    "run53": "(H200, the next call on the same machine) python3 bench/run.py --configs upstream-bf16@8,pack-bf16@8,"
             "pack-bf16-blocks@8,pack-fp8@8,pack-int8@8 --warm 3 --timeout 100",
    "run54": "(H200, a new machine, torch 2.11 on the device; the pack at c027d03: a resident DiT tolerates 3 GiB of "
             "decode eviction) python3 bench/run.py --configs upstream-bf16@8,pack-bf16@8,pack-bf16-nopin@8,"
             "pack-fp16@8,pack-fp8@8,pack-int8@8 --warm 3 --timeout 100",
    "run55": "(H200, another machine; the pack at 51251c3: a decode's eviction left unpinned) python3 bench/run.py "
             "--configs upstream-bf16@8,pack-bf16@8,pack-fp16@8,pack-bf16-nopin@8,upstream-gpu-only-native@none,"
             "pack-fp8@none --warm 3 --timeout 100",
    "run56": "(H100 80GB HBM3, torch 2.11; the pack at ec0f662: a decode's eviction hands back kept host copies, "
             "pipeline/host_copies.py) PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m devkit.eviction_cycles; "
             "python3 bench/run.py --configs upstream-bf16@8,pack-bf16@8,pack-bf16-nocopies@8,pack-fp16@8 --warm 3 "
             "--timeout 100",
    "run57": "(the next call on the same H100) python3 bench/run.py --configs pack-bf16-nocopies@8,pack-bf16@8,"
             "upstream-bf16@8 --warm 3 --timeout 100",
    "run58": "(the next call on the same H100) python3 bench/run.py --configs upstream-bf16@6,pack-bf16@6,pack-fp8@6 "
             "--warm 3 --timeout 120",
    "run59": "(the next call on the same H100) python3 bench/run.py --configs pack-bf16-noprefetch@6,"
             "pack-bf16-separate@6,pack-bf16@6 --warm 3 --timeout 120",
    "run60": "(H100, a new machine, the last 240 s of the session's device time) python3 bench/run.py --configs "
             "pack-bf16-flash@6,pack-bf16@6 --warm 2 --timeout 100",
    "run61": "(H100 80GB HBM3, torch 2.11; the pack at e834f67) python3 bench/run.py --configs upstream-bf16@6,"
             "pack-bf16-noprefetch@6,pack-bf16@6,pack-bf16-nodynamic@6 --warm 3 --timeout 120 --profile "
             "--profile-steps 4",
    "run62": "(the next call on the same H100) python3 bench/run.py --configs pack-bf16@6,upstream-bf16@6 --warm 3 "
             "--timeout 120 --profile --profile-steps 4",
    "run63": "(the same H100; the pack at e750015: the block streamer) PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m "
             "devkit.stream_check; python3 bench/run.py --configs upstream-bf16@6,pack-bf16@6,pack-bf16-nostream@6,"
             "pack-bf16@4,upstream-bf16@4 --warm 3 --timeout 120",
    "run64": "(the next call on the same H100) python3 bench/run.py --configs pack-bf16@6,upstream-bf16@6,"
             "upstream-bf16@8,pack-bf16@8 --warm 3 --timeout 100",
    "run65": "(the next call on the same H100, a profile probe) python3 bench/run.py --configs pack-bf16@6 --warm 3 "
             "--timeout 100 --profile --profile-steps 4",
    "run66": "(H100 80GB HBM3, torch 2.11, a new machine; the pack with pipeline/host_sigmas.py) "
             "PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m devkit.host_sigmas_check; python3 "
             "bench/profile_sampling.py --variants bf16+compile+gpusigmas,bf16+compile,fp8+compile+gpusigmas,"
             "fp8+compile,bf16+compile+cppwrapper --steps 25 --profile-steps 2 --warm 3",
    "run67": "(H100, a new machine) python3 bench/attention_backends.py --backends cudnn,cudnn-pad128,"
             "cudnn-pad128-prepared,flash,flash-pad128-prepared; python3 bench/profile_sampling.py --variants "
             "bf16+compile --steps 25 --profile-steps 1 --stacks --warm 1",
    "run68": "(H100, a new machine; host sigmas then applied to eager runs too) "
             "PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m devkit.host_sigmas_check; python3 bench/run.py "
             "--configs upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-gpusigmas@none,pack-fp8@none,"
             "pack-fp8-gpusigmas@none --warm 3 --timeout 100",
    "run69": "(H100, a new machine, after two refused starts; host sigmas then applied to eager runs too, as they are "
             "again since run74; the check with the profiler's stacks ran out of its 90 s) "
             "PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m devkit.host_sigmas_check; python3 bench/run.py "
             "--configs pack-bf16@none,pack-bf16-gpusigmas@none,upstream-gpu-only-native@none,"
             "pack-bf16-gpusigmas@6,pack-bf16@6 --warm 3 --timeout 90",
    "run70": "(H100 80GB HBM3, torch 2.11, a new machine; flash-attn-4 not installed) python3 "
             "bench/profile_sampling.py --variants bf16+compile --steps 25 --profile-steps 2 --warm 3; python3 "
             "bench/run.py --configs upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-cdtune@none --warm 3 --timeout 100",
    "run71": "(the same H100, two calls later: bash bench/fa4_install.sh stash, then source bench/fa4_install.sh; "
             "flash-attn-4 4.0.0b40) python3 bench/run.py --configs upstream-gpu-only-native@none,pack-bf16@none,"
             "pack-bf16-cudnn@none,pack-fp8@none --warm 3 --timeout 100 --restart",
    "run72": "(H100, a new machine) PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m devkit.host_sigmas_check --stacks "
             "(the check as of 14f9e55: the host run first, the model not loaded before it)",
    "run73": "(the same H100, two calls later, flash-attn-4 installed as in run71) python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-bf16@none --warm 5 --rounds 2 --timeout 100; python3 "
             "bench/profile_sampling.py --variants bf16+compile --steps 25 --profile-steps 2 --warm 3",
    "run74": "(H100, a new machine; the check loads the model first) PYTHONPATH=$PYTHONPATH:$COMFYUI_PATH python3 -m "
             "devkit.host_sigmas_check; python3 bench/profile_sampling.py --variants "
             "bf16+compile,bf16+compile+cppwrapper --steps 25 --profile-steps 2 --warm 3",
    "run75": "(the same H100, the next call) NEWBIE_CUDA_GRAPHS=1 python3 bench/profile_sampling.py --variants "
             "bf16+compile --steps 25 --profile-steps 2 --warm 3 (no graph replayed: the script's call counter sat "
             "inside the graphs' wrapper; since fixed, `+graphs`)",
    "run76": "(H100, a new machine, cuDNN attention) python3 bench/profile_sampling.py --variants "
             "bf16+compile,bf16+compile+hostconds,bf16+compile+graphs --steps 25 --profile-steps 2 --warm 3",
    "run77": "(the same H100, the next call) python3 bench/run.py --configs upstream-gpu-only-native@none,"
             "pack-bf16@none,pack-bf16-hostconds@none --warm 5 --rounds 2 --timeout 100",
    "run78": "(the same H100, three calls later, flash-attn-4 installed as in run71) python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-cudnn@none --warm 5 --rounds 2 --timeout 100",
    "run79": "(the same H100, the next call; flash-attn-4's on-disk cache off, as it then was) "
             "TORCH_LOGS=dynamo,aot,inductor python3 bench/run.py --configs pack-bf16@none,pack-fp8@none --warm 3 "
             "--timeout 100 --restart",
    "run80": "(the same H100, the next call) python3 bench/profile_sampling.py --variants fp8+compile,bf16+compile "
             "--steps 25 --profile-steps 2 --warm 3",
    "run81": "(the same H100, the next call; nvidia-smi logged clocks beside it) python3 bench/run.py --configs "
             "pack-fp8@none --warm 5 --timeout 100",
    "run82": "(H100, a new machine, flash-attn-4 installed as in run71; c90dbbd: its on-disk kernel cache on) "
             "python3 bench/run.py --configs pack-bf16@none,pack-bf16-fa4nocache@none --warm 3 --restart --timeout 100",
    "run83": "(the same call, after run82) python3 bench/run.py --configs pack-fp8@none,pack-fp8-cudnn@none --warm 3 "
             "--timeout 100 (the call's time ran out in pack-fp8-cudnn: pack-fp8 only)",
    "run84": "(H100, a new machine, cuDNN attention; fad60de: one graph fewer, w2's row-wise GEMM in _scaled_mm's "
             "row-wise form) python3 bench/run.py --configs pack-bf16@none,pack-fp8@none,pack-fp8-w2rowwise@none "
             "--warm 3 --restart --timeout 100",
    "run85": "(the same H100, the next call) python3 bench/quant_accuracy.py",
    "run85r": "(the same call, after run85) NEWBIE_FP8_W2=rowwise python3 bench/quant_accuracy.py (w2 in "
              "_scaled_mm's row-wise form, as in run84)",
    "run86": "(the same H100, the next call, flash-attn-4 installed as in run71) python3 bench/profile_sampling.py "
             "--variants fp8+compile,fp8+compile+w2rowwise,fp8+compile+w2rowwise+graphs --steps 25 --profile-steps 2 "
             "--warm 3; python3 bench/run.py --configs pack-bf16@none,pack-fp8-w2rowwise@none --warm 3 --restart "
             "--timeout 100",
    "run87": "(H100, a new machine, flash-attn-4 installed as in run71; a02db7d: the row-wise w2 as a per-tensor GEMM with "
             "its scales applied after) python3 bench/profile_sampling.py --variants fp8+compile,fp8+compile+w2rowwise "
             "--steps 25 --profile-steps 2 --warm 3; python3 bench/run.py --configs pack-fp8@none,"
             "pack-fp8-w2rowwise@none,upstream-gpu-only-native@none --warm 3 --timeout 100",
    "run88": "(the same H100, the next call) python3 bench/profile_sampling.py --variants "
             "fp8+compile+w2rowwise+graphs,fp8+compile+w2rowwise --steps 25 --profile-steps 2 --warm 5",
    "run89": "(H100, a new machine, cuDNN attention; 68d0ca7) python3 bench/profile_sampling.py --variants "
             "fp8+compile,fp8+compile+multikernel,fp8+compile+multikernel+graphs,fp8+compile+graphs,"
             "fp8+compile+persistent,bf16+compile,bf16+compile+multikernel --steps 25 --profile-steps 2 --warm 5 "
             "(the third variant failed loading its multi-kernel graph from the FX graph cache, which ended the "
             "script: the first two only)",
    "run90": "(the same H100, two calls later, flash-attn-4 installed as in run71) python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-fp8-native@none,pack-fp8-native-graphs@none --warm 5 --timeout 100 "
             "(before it, in the same call, python3 -m pytest tests/unit/test_quantized_ops.py "
             "tests/unit/test_cuda_graphs.py: run90-pytest.log)",
    "run91": "(the same H100, the next call) python3 bench/run.py --configs upstream-bf16@8,pack-fp8@8,"
             "pack-fp8-tefp8@8,pack-fp8-teint8@8 --warm 3 --timeout 150",
    "run92": "(H100, a new machine, cuDNN attention; 6d9cb22) python3 bench/run.py --configs pack-fp8@none,pack-fp8@8 "
             "--warm 3 --profile --timeout 150 (the profiles' summaries in the results)",
    "run92b": "(the same call, after run92) python3 bench/run.py --configs pack-bf16-native@none,"
              "pack-bf16-native-graphs@none --warm 3 --timeout 100",
    "run93": "(the same H100, the next call) python3 bench/run.py --configs upstream-bf16@8,pack-fp8@8,"
             "pack-fp8-tefp8@8,pack-int8@8 --warm 3 --timeout 120",
    "run94": "(H100, a new machine, cuDNN attention; 0882676) source bench/device_env.sh && python3 -m pytest -q "
             "tests/unit/test_swiglu_fp8.py tests/unit/test_quantized_ops.py; python3 bench/swiglu_kernel.py; "
             "python3 bench/profile_sampling.py --variants fp8+compile,fp8+compile+w2kernel,fp8+compile+fastaccum,"
             "fp8+compile+w2kernel+fastaccum --steps 25 --profile-steps 2 --warm 3 --swiglu-launch "
             "$OUT/swiglu_kernel.json (the w2kernel variants recompiled every block, one callable object a "
             "feed-forward, and ran eagerly: mended after)",
    "run95": "(H100, a new machine, cuDNN attention; 250e900, the SwiGLU kernel one function bound to each "
             "feed-forward, launched 4 programs an SM, block 2048, 8 warps) source bench/device_env.sh; python3 "
             "bench/quant_accuracy.py --fp8-only --models /tmp/models; python3 bench/profile_sampling.py --variants "
             "fp8+compile+fastaccum,fp8+compile+w2kernel+fastaccum --steps 25 --profile-steps 2 --warm 3",
    "run96": "(H100, a new machine, cuDNN attention; df0c959) source bench/device_env.sh && python3 -m pytest -q "
             "tests/unit/test_swiglu_fp8.py tests/unit/test_quantized_ops.py tests/unit/test_cuda_graphs.py "
             "(run96-pytest.log); python3 bench/swiglu_kernel.py; python3 bench/profile_sampling.py --variants "
             "fp8+compile,fp8+compile+w2kernel,fp8+compile+batched,fp8+compile+w2kernel+graphs,"
             "fp8+compile+cppwrapper --steps 25 --profile-steps 2 --warm 3",
    "run97": "(the same H100, two calls later, flash-attn-4 installed as in run71) python3 bench/run.py --configs "
             "upstream-gpu-only-native@none,pack-fp8@none,pack-fp8-w2kernel@none,"
             "pack-fp8-native-graphs-w2kernel@none,pack-fp8-batched-w2kernel@none --warm 3 --timeout 120",
    "run98": "(the same H100, the next call, flash-attn-4) python3 bench/profile_sampling.py --variants "
             "fp8+compile,fp8+compile+w2kernel,fp8+compile+w2kernel+graphs,fp8+compile+w2kernel+batched+graphs "
             "--steps 25 --profile-steps 2 --warm 3",
    "run99": "(H100, a new machine, cuDNN attention; b3505b2) source bench/device_env.sh && python3 -m pytest -q "
             "tests/unit/test_grouped_attention_gpu.py (run99-pytest.log); python3 bench/profile_sampling.py "
             "--variants bf16+compile,bf16+compile+sdpagqa,fp8+compile,fp8+compile+sdpagqa --steps 25 "
             "--profile-steps 2 --warm 3",
    "run100": "(the same H100, the next call, cuDNN attention) python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-sdpagqa@none --warm 3 --timeout 100",
    "run101": "(the same H100, the next call, flash-attn-4 installed: source bench/fa4_install.sh) python3 -m pytest "
              "-q tests/unit/test_grouped_attention_gpu.py (run101-pytest.log); python3 bench/profile_sampling.py "
              "--variants fp8+compile,fp8+compile+kvcopies,bf16+compile,bf16+compile+kvcopies,"
              "fp8+compile+w2kernel+graphs --steps 25 --profile-steps 2 --warm 3",
    "run102": "(the same H100, the next call, flash-attn-4) python3 bench/run.py --configs upstream-gpu-only-native@none,"
              "pack-fp8@none,pack-fp8-native-graphs-w2kernel@none,pack-bf16@none,pack-fp8-kvcopies@none --warm 3 "
              "--timeout 120",
    "run103": "(the same H100, the next call, flash-attn-4) TORCH_LOGS=recompiles,graph_breaks python3 bench/run.py "
              "--configs pack-fp8@none,pack-fp8-kvcopies@none,pack-fp8@none --warm 3 --timeout 120 (a new server "
              "each; no upstream in this call)",
    "run104": "(H100, a new machine, flash-attn-4 by the two calls of bench/README.md: bash bench/fa4_install.sh stash "
              "carrying .fa4a, then, carrying .whl without av, .carry and .fa4b, source bench/device_env.sh && source "
              "bench/fa4_install.sh; 3891ced) python3 -m pytest -q tests/unit/test_grouped_attention_gpu.py -k "
              "'fa4 or flash_attn4' (run104-pytest.log); python3 bench/profile_sampling.py --variants "
              "fp8+compile,fp8+compile+guards+fa4launch,fp8+compile+fa4launch,bf16+compile,"
              "bf16+compile+guards+fa4launch --steps 25 --profile-steps 3 --warm 3",
    "run105": "(the same H100, the next call, flash-attn-4; the fp8 variants in the reverse order) python3 "
              "bench/profile_sampling.py --variants fp8+compile+guards+fa4launch,fp8+compile+guards,"
              "fp8+compile+fa4launch,fp8+compile --steps 25 --profile-steps 2 --warm 3",
    "run106": "(the same H100, the next call, flash-attn-4) python3 -m pytest -q tests/unit/test_guard_skip.py "
              "(run106-pytest.log); python3 bench/profile_sampling.py --variants fp8+compile,"
              "fp8+compile+guards+fa4launch --steps 25 --profile-steps 2 --warm 5",
    "run107": "(H100, a new machine, cuDNN attention; 742949e) source bench/device_env.sh carrying .whl, .whl-av and "
              ".carry; python3 -m pytest -q tests/unit/test_guard_skip.py (run107-pytest.log); python3 "
              "bench/profile_sampling.py --variants fp8+compile,fp8+compile+inner,fp8+compile+guards --steps 25 "
              "--profile-steps 2 --warm 5",
    "run108": "(the same H100, flash-attn-4 by bash bench/fa4_install.sh stash carrying .fa4a, then source "
              "bench/fa4_install.sh carrying .fa4b) python3 bench/run.py --configs upstream-gpu-only-native@none,"
              "pack-fp8-native@none,pack-fp8-native-graphs-w2kernel@none,pack-bf16-native@none --warm 3 --timeout 120 "
              "(the servers' check of ComfyUI's key/value copies failed under dynamic VRAM: copies kept)",
    "run109": "(the same H100, the next call, flash-attn-4) python3 bench/profile_sampling.py --variants fp8+compile,"
              "fp8+compile+inner --steps 25 --profile-steps 2 --warm 5",
    "run110": "(H100, a new machine, 025d06a) source bench/device_env.sh carrying .whl, .whl-av and .carry; python3 -m "
              "pytest -q tests/unit/test_swiglu_fp8.py (run110-pytest.log); python3 bench/swiglu_kernel.py --out $OUT",
    "run111": "(the same H100, flash-attn-4 by bash bench/fa4_install.sh stash carrying .fa4a, then source "
              "bench/fa4_install.sh carrying .fa4b) python3 bench/profile_sampling.py --variants "
              "fp8+compile+w2kernel+graphs,fp8+compile+w2kernel1+graphs,fp8+compile --steps 25 --profile-steps 2 "
              "--warm 5",
    "run112": "(the same H100, the next call, flash-attn-4) python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-fp8@none,pack-fp8-kvcopies@none,pack-fp8-native-graphs-w2kernel@none,"
              "pack-fp8-native-graphs-w2kernel1@none,pack-bf16@none --warm 3 --timeout 120",
    "run113": "(the same H100, the next call, flash-attn-4) python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-fp8-native-graphs-w2kernel1@none,pack-fp8-native-graphs-w2kernel@none "
              "--warm 5 --timeout 120",
    "run114": "(H100, a new machine after 14 calls that got none or lost it, cuDNN attention; 14631ec) source "
              "bench/device_env.sh carrying .whl, .whl-av and .carry; python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-fp8-native-graphs-w2kernel1-adaln@none,"
              "pack-fp8-native-graphs-w2kernel1@none --warm 3 --timeout 120; python3 bench/profile_sampling.py "
              "--variants fp8+compile+w2kernel1+graphs+adaln,fp8+compile+w2kernel1+graphs --steps 25 --profile-steps 2 "
              "--warm 3 (NEWBIE_ADALN=reduce patched no layer of the fp8 DiT: its modulation Linear is no "
              "torch.nn.Linear; mended after)",
    "run115": "(the same H100, the next call) python3 bench/profile_sampling.py --variants fp8+compile --steps 25 "
              "--profile-steps 2 --warm 1 (small_op_sites: where the memsets come from)",
    "run116": "(the same H100, the next call) CUBLASLT_WORKSPACE_SIZE=0 python3 bench/profile_sampling.py --variants "
              "fp8+compile+w2kernel1+graphs --steps 25 --profile-steps 2 --warm 3",
    "run117": "(the same H100, the next call) python3 bench/profile_sampling.py --variants "
              "fp8+compile+w2kernel1+graphs --steps 25 --profile-steps 2 --warm 3 (run116's baseline)",
    "run118": "(H100, a new machine, flash-attn-4; cefcf83) source bench/device_env.sh carrying .whl, .whl-av and "
              ".carry; bash bench/fa4_install.sh stash carrying .fa4a; source bench/fa4_install.sh carrying .fa4b; "
              "python3 bench/run.py --configs upstream-gpu-only-native@none,"
              "pack-fp8-native-graphs-w2kernel1-adaln-nows@none,pack-fp8-native-graphs-w2kernel1-nows@none,"
              "pack-fp8-native-graphs-w2kernel1-adaln@none,pack-fp8-native-graphs-w2kernel1@none --warm 5 "
              "--timeout 120",
    "run119": "(the same H100, the next call) CUBLASLT_WORKSPACE_SIZE=0 python3 bench/profile_sampling.py --variants "
              "fp8+compile+w2kernel1+graphs+adaln,fp8+compile+w2kernel1+graphs --steps 25 --profile-steps 2 --warm 5",
    "run120": "(H100, a new machine, cuDNN attention; b9e308d) source bench/device_env.sh; python3 -m pytest -q "
              "tests/unit/test_qkv_rope.py (run120-pytest.log: the fp8 test's loader asked the CPU for fp8 compute on "
              "a GPU's machine, mended after); CUBLASLT_WORKSPACE_SIZE=0 python3 bench/profile_sampling.py "
              "--variants fp8+compile+w2kernel1+graphs+qkvrope,fp8+compile+w2kernel1+graphs --steps 25 "
              "--profile-steps 2 --warm 5 (the kernel ran in no layer: fp8's q/k norms are ComfyUI's cast layers, "
              "which the first form refused; mended after)",
    "run121": "(H100, a new machine, cuDNN attention) the same commands as run120 with --warm 3 (the kernel's first "
              "form, a program a token: 199 us a call, the run 2.543 against 2.324 s)",
    "run122": "(H100, a new machine) source bench/device_env.sh; python3 bench/qkv_rope_kernel.py --out $OUT (the "
              "first two forms: a program a token, a program a head)",
    "run123": "(H100, a new machine) the same, with the rows form (whole head rows, pairs split in registers), the "
              "form the pack keeps",
    "run124": "(the same H100, flash-attn-4; its rows form, opt-in then) bash bench/fa4_install.sh stash carrying "
              ".fa4a; source bench/fa4_install.sh carrying .fa4b; python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-fp8-native-graphs-w2kernel1-nows-qkvrope@none,"
              "pack-fp8-native-graphs-w2kernel1-nows@none,pack-bf16-qkvrope@none,pack-bf16@none --warm 3 "
              "--timeout 120",
    "run125": "(the same H100, the next call, flash-attn-4) CUBLASLT_WORKSPACE_SIZE=0 python3 "
              "bench/profile_sampling.py --variants fp8+compile+w2kernel1+graphs+qkvrope,fp8+compile+w2kernel1+graphs,"
              "bf16+compile+qkvrope,bf16+compile --steps 25 --profile-steps 2 --warm 5 (variants without +qkvrope "
              "ran without the kernel then)",
    "run126": "(H100, a new machine, cuDNN attention; bb879ee) source bench/device_env.sh; python3 -m pytest -q "
              "tests/unit/test_qkv_rope.py (run126-pytest.log); python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-noqkvrope@none,pack-fp8@none,"
              "pack-fp8-noqkvrope@none,pack-fp8-w2kernel1@none --warm 3 --timeout 120",
    "run127": "(H100, a new machine, cuDNN attention; a2ad573, grouped heads to SDPA by default) source "
              "bench/device_env.sh; python3 -m pytest -q tests/unit/test_grouped_attention_gpu.py "
              "tests/unit/test_qkv_rope.py (run127-pytest.log); python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-nosdpagqa@none,pack-fp8@none --warm 5 "
              "--timeout 120",
    "run128": "(the same H100, the next call, cuDNN attention) python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-bf16@none --rounds 2 --warm 5 --timeout 120",
    "run129": "(H100, a new machine, cuDNN attention; 3bfa5f1, its pack-bf16 with the VAE in ComfyUI's non-dynamic "
              "patcher, removed after: pack-bf16-dynvae is the code that stays) source bench/device_env.sh; python3 "
              "bench/run.py --configs upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-dynvae@none --rounds 2 "
              "--warm 5 --timeout 120",
    "run130": "(H100, a new machine, cuDNN attention; 9c30562) source bench/device_env.sh; python3 "
              "bench/attention_backends.py --backends cudnn,cudnn-bhnd,cudnn-gqa,cudnn-gqa-bhnd,flash,flash-gqa; "
              "python3 bench/vae_decode.py (its first form: nchw, channels_last, benchmark); python3 "
              "bench/profile_sampling.py --variants bf16+compile,bf16+compile+graphs --steps 25 --profile-steps 2 "
              "--warm 5",
    "run131": "(H100, a new machine, cuDNN attention; c246e9d, the pack's VAE GroupNorms) source bench/device_env.sh; "
              "python3 -m pytest -q tests/unit/test_group_norm.py (run131-pytest.log); python3 bench/run.py --configs "
              "upstream-gpu-only-native@none,pack-bf16@none,pack-bf16-nogn@none --rounds 2 --warm 5 --timeout 120; "
              "python3 bench/vae_decode.py",
    "run132": "(the same H100, the next call) python3 -m pytest -q tests/unit/test_group_norm.py (run132-pytest.log); "
              "python3 bench/run.py --configs upstream-gpu-only-native@none,pack-bf16@none,pack-fp16@none --rounds 2 "
              "--warm 5 --timeout 120; python3 bench/vae_decode.py",
    "run133": "(the same H100, the next call) python3 bench/vae_decode.py --accuracy",
    "run9": "python3 bench/seed_claims.py; for s in euler_ancestral dpmpp_2m; do python3 bench/run.py --sampler $s "
            "--steps 10 --configs pack-bf16-gpu-only@none; done",
}


def _is_median_run(results: list) -> bool:
    """Runs from bench/run.py with several warm runs per server (median and spread), H200 runs from run12 on."""
    return any("n" in (r.get("warm") or {}) for r in results)


def profile_table(profiles: dict) -> list[str]:
    lines = _head("run", "variant", "DiT call s (mean of 5)", "first call s", "GEMM ms", "attention ms",
                  "fused Triton ms", "other ms", "rel. error vs first variant")
    for run, variants in profiles.items():
        for name, v in variants.items():
            if "error" in v:
                lines.append(f"| {run} | {name} | failed: {v['error'][:160]} | | | | | | |")
                continue
            k = v.get("kernel_ms_by_kind") or {}
            lines.append(f"| {run} | {name} | {v['call_s']:.4f} | {v['first_call_s']:.1f} | {_fmt(k.get('gemm'))} | "
                         f"{_fmt(k.get('attention'))} | {_fmt(k.get('triton (fused)'))} | {_fmt(k.get('other'))} | "
                         f"{v['rel_error_vs_first_variant']:.1e} |")
    return lines


def sampling_table(runs: dict) -> list[str]:
    out = _head("run", "variant", "DiT calls a step (batch)", "warm step ms", "GPU busy ms a step",
                "GPU idle ms a step", "stream syncs a step")
    for run, variants in runs.items():
        for name, r in variants.items():
            out.append(f"| {run} | {name} | {r['dit_calls_per_step']} ({r['dit_call_batch_sizes']}) | "
                       f"{r['warm_step_ms']} | {r['gpu_busy_ms_per_step']} | {r['gpu_idle_ms_per_step']} | "
                       f"{r['host_syncs_per_step'].get('cudaStreamSynchronize', 0)} |")
    return out


def attention_table(runs: dict) -> list[str]:
    out = _head("run", "dtype", "backend", "joint, batch 1 ms", "joint, batch 2 ms", "attention ms a CFG step",
                "largest error vs fp32", "first call s")
    for run, d in runs.items():
        rows = [r for r in d["results"] if "backend" in r and "ms" in r]
        steps = {r["dtype"]: r["step_ms"] for r in d["results"] if "step_ms" in r}
        for (dtype, backend) in dict.fromkeys((r["dtype"], r["backend"]) for r in rows):
            ms = {r["batch"]: r["ms"] for r in rows if (r["dtype"], r["backend"], r["shape"]) == (dtype, backend, "joint")}
            err = max(r["max_err"] for r in rows if (r["dtype"], r["backend"]) == (dtype, backend))
            first = max((r["first_call_s"] for r in rows if (r["dtype"], r["backend"]) == (dtype, backend)
                         and "first_call_s" in r), default=None)
            out.append(f"| {run} | {dtype} | {backend} | {ms.get(1)} | {ms.get(2)} | "
                       f"{steps.get(dtype, {}).get(backend, 0):.1f} | {err:.1e} | {_fmt(first)} |")
    return out


def _head(*columns: str) -> list[str]:
    """A markdown table's header row and separator."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _load(kind: str) -> dict[str, object]:
    return {p.name.rsplit("-", 1)[0]: json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"*-{kind}.json"))}


def _section(kind: str, intro: list[str], table) -> list[str]:
    """The lines of one results section: its intro and `table` of the runs' `kind` results, or none without any."""
    runs = _load(kind)
    return intro + table(runs) if runs else []


def _sci(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def _fmt(v, unit=""):
    return "—" if v is None else (f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}")


def results_table(runs: dict) -> list[str]:
    lines = _head("run", "configuration", "size", "sampler, steps", "budget GiB", "flags", "cold s", "warm s",
                  "warm it/s", "text encode s (cold)", "sampling s (warm)", "decode s (warm)",
                  "peak GiB (cold/warm)")
    for run, results in runs.items():
        for r in results:
            cold, warm = r.get("cold", {}), r.get("warm", {})
            err = cold.get("error") or warm.get("error")
            if err:
                lines.append(f"| {run} | {r['config']} | {r.get('size')} | {r.get('sampler', 'euler_ancestral')}, "
                             f"{r.get('steps')} | {_fmt(r['budget_gib'])} | "
                             f"{' '.join(r['flags'])} | failed: {err[:80]} | | | | | | |")
                continue
            lines.append(
                f"| {run} | {r['config']} | {r.get('size')} | {r.get('sampler', 'euler_ancestral')}, {r.get('steps')} | "
                f"{_fmt(r['budget_gib']) if r['budget_gib'] is not None else 'none'} | "
                f"{' '.join(r['flags']) or 'default'} | {_fmt(cold.get('wall_s'))} | {_fmt(warm.get('wall_s'))} | "
                f"{_fmt(warm.get('it_per_s'))} | {_fmt(cold.get('text_encode'))} | {_fmt(warm.get('sampling'))} | "
                f"{_fmt(warm.get('decode'))} | {_fmt(cold.get('peak_gib'))} / {_fmt(warm.get('peak_gib'))} |")
    return lines


def sampling_accuracy_table(runs: dict) -> list[str]:
    lines = _head("run", "variant", "sampling s", "latent rel. error vs first", "call rel. error vs first",
                  "latent bit-equal without graphs", "graphs")
    for run, variants in runs.items():
        for name, v in variants.items():
            lat = next((x for k, x in v.items() if k.startswith("latent_rel_error_vs_") and "eager" not in k
                        and "without" not in k), None)
            call = next((x for k, x in v.items() if k.startswith("call_rel_error_vs_") and "eager" not in k), None)
            equal = v.get("latent_bit_equal_without_graphs")
            lines.append(f"| {run} | {name} | {v['sampling_s']:.2f} | {_sci(lat)} | {_sci(call)} | "
                         f"{'' if equal is None else ('yes' if equal else 'no')} | {v.get('graphs') or ''} |")
    return lines


def accuracy_table(acc: dict) -> list[str]:
    lines = _head("run", "weights", "precision", "rel. error vs fp32", "non-finite values", "DiT call s",
                  "recomputations")
    for run, data in acc.items():
        for weights, per in data.items():
            for label, v in per.items():
                err = v.get("rel_error_vs_fp32")
                err_s = "reference" if label == "fp32" else ("inf (NaN/inf output)" if err in (None, float("inf"))
                                                             else f"{err:.2e}")
                lines.append(f"| {run} | {weights} | {label} | {err_s} | {v['nonfinite']} | {v['call_s']:.3f} | "
                             f"{v['fp32_recomputations']} |")
    return lines


def quant_table(quant: dict) -> list[str]:
    lines = _head("run", "DiT", "rel. error vs fp32", "DiT call s", "DiT bytes (GB)", "load s")
    for run, data in quant.items():
        for label, v in data.items():
            if not isinstance(v, dict):
                continue
            err = v.get("rel_error_vs_fp32")
            lines.append(f"| {run} | {label} | {'reference' if err is None else f'{err:.2e}'} | {v['call_s']:.3f} | "
                         f"{v['dit_bytes'] / 1e9:.2f} | {v['load_s']:.1f} |")
    return lines


PLOT_BUDGETS = (None, 16.0, 12.0, 8.0, 6.0, 4.0)
PACK_DEFAULTS = ("pack-bf16", "pack-bf16-native")  # the pack's default graph at precision bf16


def _run_number(run: str) -> int:
    digits = "".join(ch for ch in run if ch.isdigit())
    return int(digits) if digits else -1


def budget_pairs(runs: dict) -> list[dict]:
    """For each budget of PLOT_BUDGETS, the newest run that timed the pack's default bf16 graph and an upstream
    configuration in the same call: the pack's and upstream's best warm image there, and their peaks."""
    pairs = []
    for budget in PLOT_BUDGETS:
        for run in sorted(runs, key=_run_number, reverse=True):
            here = [r for r in runs[run] if r.get("budget_gib") == budget and (r.get("warm") or {}).get("wall_s")]
            pack = [r for r in here if r["config"] in PACK_DEFAULTS]
            upstream = [r for r in here if r["config"].startswith("upstream")]
            if pack and upstream:
                p = min(pack, key=lambda r: r["warm"]["wall_s"])
                u = min(upstream, key=lambda r: r["warm"]["wall_s"])
                pairs.append({"budget": budget, "run": run, "pack": p["warm"]["wall_s"],
                              "upstream": u["warm"]["wall_s"],
                              "upstream_config": u["config"], "pack_peak": p["warm"].get("peak_gib"),
                              "upstream_peak": u["warm"].get("peak_gib")})
                break
    return pairs


def plots(runs: dict) -> list[str]:
    """Two bar charts of budget_pairs: the warm image's time, and the peak GPU memory, pack against upstream."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(plots skipped: matplotlib not installed)"]
    pairs = budget_pairs(runs)
    if not pairs:
        return []
    IMAGES.mkdir(parents=True, exist_ok=True)
    labels = [("none" if q["budget"] is None else f"{q['budget']:g} GiB") + f"\n{q['run']}" for q in pairs]
    x = range(len(pairs))
    out = []
    for key, ylabel, title, image in (
            ("", "warm image, s", "Warm 1024² image (25 steps, CFG 5), the pack's default bf16 graph against "
             "upstream's best in the same call", "bench-warm-time.png"),
            ("_peak", "peak GPU memory, GiB", "Peak GPU memory of the server (nvidia-smi), same runs",
             "bench-memory.png")):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        pack = [q["pack" + key] or 0 for q in pairs]
        upstream = [q["upstream" + key] or 0 for q in pairs]
        ax.bar([i - 0.2 for i in x], pack, width=0.4, color="tab:orange", label="pack, bf16")
        ax.bar([i + 0.2 for i in x], upstream, width=0.4, color="tab:gray", label="upstream ComfyUI")
        if not key:
            for i, q in enumerate(pairs):
                ax.annotate(f"{q['pack'] / q['upstream']:.2f}x", (i - 0.2, q["pack"]), ha="center", va="bottom",
                            fontsize=8)
        else:
            for i, q in enumerate(pairs):
                if q["budget"] is not None:
                    ax.hlines(q["budget"] + 0.6, i - 0.45, i + 0.45, colors="black", linestyles="dotted")
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_xlabel("memory budget (a second process holds the rest; dotted: the budget + 0.6 GiB left free)"
                      if key else "memory budget, and the run that measured it")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(IMAGES / image, dpi=110)
        plt.close(fig)
        out.append(f"![{title}](images/{image})")
    return out


def main():
    runs, acc = _load("results"), _load("fp16_accuracy")
    current = {k: v for k, v in runs.items() if _is_median_run(v)}
    history = {k: v for k, v in runs.items() if k not in current}
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python bench/report.py` from the JSON in `bench/results/`, which the device runs wrote.",
        "Every figure below comes from one of these commands, run after `source bench/device_env.sh` (wheels + host",
        "carried; see bench/README.md), with ComfyUI v0.33.0 `0f1fa67a` unless the command says otherwise:",
        "",
    ]
    others = sorted({p.name.split("-", 1)[0] for p in RESULTS.glob("run*-*.json")} - set(runs),
                    key=lambda r: (_run_number(r), r))  # runs with profiles or checks only
    for run in list(current) + list(history) + others:
        parts.append(f"- **{run}**: `{COMMANDS.get(run, 'see bench/README.md')}`")
    parts += ["", "Weights: full-size random NewBie weights (`devkit/tiny_models.FULL`, bf16 files in ComfyUI's layout).",
              "Graph: loader → CLIPTextEncode ×2 (XML positive, tag negative) → EmptySD3LatentImage 1024×1024 → KSampler "
              "(euler_ancestral, simple, 25 steps, CFG 5) → VAEDecode → SaveImage. Pack = `NewBieLoader` with its defaults "
              "unless the configuration says otherwise; upstream = UNETLoader + DualCLIPLoader(newbie) + VAELoader "
              "(+ TorchCompileModel for `upstream-compile`). A budget of B GiB: a second process holds all free GPU "
              "memory but B + 0.6 GiB. Peak = the server process's `used_memory` from nvidia-smi every 50 ms. Stage "
              "times come from the websocket's `executing` events; it/s from its `progress` events, which arrive in "
              "bursts when the sampler keeps the server's CPU busy: for fp8 at about 10 it/s (sampling 2.51–2.65 s) the "
              "column read 5.9–8.7 it/s (run81), so for fast configurations the sampling seconds are the witness; "
              "`steps / sampling s` is the sampling node's own rate (its work before the first step included).", ""]
    if current:
        parts += ["## NVIDIA H200: the pack against upstream in the same call", "",
                  "Each configuration on a fresh server: one cold image, then warm images with new seeds; the table "
                  "gives the median of the warm runs with [min, max], and the ratio to the fastest upstream "
                  "configuration measured at the same budget in the same call (machines differ by 10-30 % between "
                  "calls, so only ratios within one call are compared).", ""]
        for run, results in current.items():
            parts += [f"### {run}", "", ratio_table(results), ""]
    parts += _section("profile", [
        "## One DiT call, in-process (CFG batch of 2 at 1024², everything resident)", "",
        "`bench/profile_dit.py`: mean of 5 calls after warm-up; CUDA kernel time of one profiled call by kind.", ""],
        profile_table)
    parts += _section("profile_sampling", [
        "", "## A whole sampling run, in-process (ComfyUI's sampler, euler_ancestral, CFG 5, resident DiT)", "",
        "`bench/profile_sampling.py`: the warm run timed unprofiled; GPU busy and idle (gaps over 50 µs) and host "
        "synchronisations per step from a profiled run of 2-3 steps (the profiler adds to them).", ""],
        sampling_table)
    parts += _section("attention_backends", [
        "", "## Attention backends at NewBie's shapes (bench/attention_backends.py)", "",
        "24 heads of 96; joint = 4096 image + 259 caption tokens (36 layers), image = 4096 tokens (the 2 noise "
        "refiners); median of 30 calls timed by CUDA events around each call on an otherwise idle GPU (so a "
        "backend's host-side launch time counts where the GPU waits for it); a CFG step = two batch-1 DiT calls. "
        "From run40 on, q, k and v are [B, H, N, D] views of [B, N, H, D] memory, as Next-DiT hands them over "
        "(run30: contiguous [B, H, N, D]). `fa4`: flash-attn-4 through the pack's route (pipeline/flash_attn4.py); "
        "its first call compiles the kernel.", ""],
        attention_table)
    parts += _section("sampling_accuracy", [
        "", "## Accelerated sampling against eager (bench/sampling_accuracy.py: ComfyUI's sampler in-process, "
        "full-size random weights, 1024², 25 steps, fixed seed)", "",
        "The final latent and one DiT call of each variant against the first variant of the run; a `+graphs` "
        "variant also against the same variant without CUDA graphs. `sampling s` includes the compilation of the "
        "first compiled variant.", ""],
        sampling_accuracy_table)
    parts += _section("quant_accuracy", [
        "", "## Quantized DiT accuracy (bench/quant_accuracy.py: one DiT call at 1024², CFG batch of 2, full-size "
        "random weights, vs fp32)", "",
        "`pack_*`: the loader's precisions (pipeline/quantize.py); `upstream_fp8_cast`: upstream's `UNETLoader "
        "weight_dtype fp8_e4m3fn` through its own loader (every weight cast to fp8 without a scale); "
        "`upstream_reads_pack_fp8_file`: upstream's loader reading the pack's saved fp8 file. Random weights show "
        "the numeric error, not image quality. Call times are in-process and eager.", ""],
        quant_table)
    parts += ["", "## fp16 accuracy (one DiT call at 1024², CFG batch of 2, vs fp32)", ""]
    parts += accuracy_table(acc)
    vae = _load("vae_memory")
    if vae:
        parts += ["", "## FLUX VAE decode memory (bench/vae_memory.py)", "",
                  "Peak allocation above the weights for one decode, against the estimate ComfyUI plans with "
                  "(AutoencoderKL's 2178·64 bytes per latent pixel and dtype byte). The pack's VAE plans with the "
                  "measurement + 20 % (pipeline/vae_memory.py).", "", "| run | dtype | image px | measured GiB | ComfyUI plans GiB | measured / plan |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for run, rows in vae.items():
            for r in rows:
                parts.append(f"| {run} | {r['dtype']} | {r['size']}² | {r['peak_above_weights_gib']:.2f} | "
                             f"{r['comfy_estimate_gib']:.2f} | {r['peak_above_weights_gib'] / r['comfy_estimate_gib']:.2f} |")
    oom = _load("oom")
    if oom:
        parts += ["", "## OOM Guard on the GPU", "", "| run | verdict | latent identical | pixels identical | guard log |",
                  "| --- | --- | --- | --- | --- |"]
        for run, d in oom.items():
            c = d.get("comparison") or {}
            log = "<br>".join(line.split("NewBie OOM guard: ")[-1][:160] for line in
                              (d.get("disturbed") or {}).get("guard_log", [])[:4])
            parts.append(f"| {run} | {d.get('verdict')} | {c.get('latent_identical')} | {c.get('pixels_identical')} | "
                         f"{log or '—'} |")
    parts += ["", "## Plots", "",
              "For each budget, the newest device call that timed the pack's default bf16 graph and upstream side by "
              "side (medians of the warm images; the ratio above the pack's bar). Each pair is from one call; runs "
              "56-65 ran on an H100 80GB, the earlier ones on an H200.", ""]
    parts += plots(current or runs)
    if history:
        parts += ["", "## Earlier runs (NVIDIA H100, one warm run each, before compile was on by default)", ""]
        parts += results_table(history)
    extra = REPO / "bench" / "results" / "NOTES.md"
    if extra.exists():
        parts += ["", extra.read_text().strip()]
    DOC.write_text("\n".join(parts) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
