"""The CPU figures quoted for batched CFG (pipeline/cfg_batch.py, README, bench/results/NOTES.md): a sampling run
(ComfyUI's sampler, 3 steps, tiny model) with a positive and a negative caption of 12 and 5 tokens, batched into
one call against two separate calls, in fp32 and on the pack's fp16 path, and the control with the padding
attended (devkit/cfg_batch_errors.py, which tests/unit/test_cfg_batch.py bounds).

    COMFYUI_PATH=~/comfy/ComfyUI python bench/cfg_batch_cpu_errors.py      # seconds on a CPU
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    sys.path[:0] = [os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI")), str(REPO)]
    import torch

    from devkit import cfg_batch_errors, tiny_models

    tiny_models._comfy_cpu_safe()
    dit = tiny_models.random_dit(torch.float32)
    for precision in ("fp32", "fp16"):
        print(f"batched vs separate, {precision}:", json.dumps(cfg_batch_errors.batched_vs_separate(dit, precision)),
              flush=True)
    print("control, padding attended (fp32):", cfg_batch_errors.padding_attended_error(dit), flush=True)


if __name__ == "__main__":
    main()
