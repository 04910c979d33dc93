"""Does the fp16 path run more work than bf16 in its blocks? On the CPU, the tiny DiT with 36 main layers: the
nodes of each compiled block graph after AOTAutograd (the graphs Inductor would get), and the aten ops one eager
DiT call dispatches, for bf16 and the pack's fp16 (bench/results/NOTES.md, eighth session).

    COMFYUI_PATH=~/comfy/ComfyUI python bench/fp16_ops_cpu.py
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def counts(precision: str) -> tuple[list[int], int]:
    """(nodes of each compiled block graph, aten ops of one eager call)."""
    import torch
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch.utils._python_dispatch import TorchDispatchMode

    from devkit import tiny_models
    from devkit.dit_calls import dit_call
    from pipeline import block_compile, loader

    tiny_models._comfy_cpu_safe()
    spec = dataclasses.replace(tiny_models.TINY, dit=dataclasses.replace(tiny_models.TINY.dit, n_layers=36))
    dit = tiny_models.random_dit(torch.float32, spec, seed=spec.seed)
    parts = loader.NewBieParts(dit, {}, {}, {}, None, None, {"dit": "tiny"})

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[str(func)] += 1
            return func(*args, **(kwargs or {}))

    eager, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    dit_call(eager, cfg)
    with Count() as mode:
        dit_call(eager, cfg)

    graphs = []

    def keep(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: graphs.append(g) or g)

    compiled, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    torch._dynamo.reset()
    block_compile.apply(compiled, backend=keep)
    dit_call(compiled, cfg)
    torch._dynamo.reset()
    nodes = [sum(n.op == "call_function" for n in g.graph.nodes) for g in graphs]
    return nodes, sum(mode.n.values())


if __name__ == "__main__":
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    for precision in ("bf16", "fp16"):
        nodes, ops = counts(precision)
        print(f"{precision}: block graph nodes {nodes}; one eager call dispatches {ops} aten ops", flush=True)
