"""The block streamer (pipeline/block_stream.py) against ComfyUI's own casts, on a GPU: the tiny DiT loaded in part by
the pack's non-dynamic patcher, one DiT call with the streamer, the same call with ComfyUI casting each host-held
layer itself, and the call with every weight loaded. The three outputs must be bit-identical, the streamer must have
had something to stream, and every streamed parameter must be back on the host after the call.
`python3 -m devkit.stream_check` prints a JSON verdict and exits non-zero where one of those fails; the CUDA test in
tests/unit/test_block_stream.py runs the same."""
from __future__ import annotations

import json
import sys

import torch

from . import tiny_models
from .dit_calls import dit_call, dit_inputs


def compare(device: torch.device, precision: str = "bf16", share: float = 0.9) -> dict:
    """The verdict for the tiny DiT with `share` of its weights offered to ComfyUI's partial load."""
    from pipeline import block_stream, loader

    parts = tiny_models.in_memory_parts()
    patcher, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    assert patcher.load_device == device, f"the model loads on {patcher.load_device}, not {device}"
    assert block_stream.attached(patcher), "the loader attaches the streamer to its non-dynamic patcher"
    inputs = dit_inputs(cfg, device)
    dm = patcher.model.diffusion_model

    patcher.load(device, lowvram_model_memory=int(patcher.model_size() * share))
    blocks = block_stream.planned(dm)
    streamed = [p for b in blocks for p, _, _ in b.params]
    seen_on_gpu = []
    probes = [b.block.register_forward_hook(
        lambda m, a, o, b=b: seen_on_gpu.append(all(p.data.is_cuda for p, _, _ in b.params))) for b in blocks]
    try:
        out_streamed = dit_call(patcher, cfg, inputs)
    finally:
        for h in probes:
            h.remove()
    restored = all(p.data.device.type == "cpu" for p in streamed)
    block_stream.detach(patcher)
    out_comfy = dit_call(patcher, cfg, inputs)
    patcher.unpatch_model(patcher.offload_device)
    patcher.load(device, full_load=True)
    out_resident = dit_call(patcher, cfg, inputs)
    verdict = {
        "device": str(device), "precision": precision, "streamed_blocks": len(blocks),
        "streamed_params": len(streamed), "blocks_total": len(block_stream.blocks_in_order(dm)),
        "each_streamed_block_ran_on_gpu_weights": bool(seen_on_gpu) and all(seen_on_gpu),
        "restored_to_host": restored,
        "equal_to_comfy_casts": torch.equal(out_streamed, out_comfy),
        "equal_to_resident": torch.equal(out_streamed, out_resident),
    }
    verdict["ok"] = bool(streamed) and all(verdict[k] for k in (
        "each_streamed_block_ran_on_gpu_weights", "restored_to_host", "equal_to_comfy_casts", "equal_to_resident"))
    return verdict


def main() -> int:
    verdicts = [compare(torch.device("cuda", torch.cuda.current_device()), p) for p in ("bf16", "fp16")]
    print(json.dumps(verdicts, indent=1))
    return 0 if all(v["ok"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
