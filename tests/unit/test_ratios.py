"""bench/ratios.py: each configuration's warm median against upstream's best at its budget in the same call, with
the sampling node's own rate beside the progress events' it/s."""
from __future__ import annotations

import bench_scripts

ratios = bench_scripts.load("ratios")


def _r(config, kind, budget, wall, sampling, it_per_s, steps=25):
    return {"config": config, "kind": kind, "budget_gib": budget, "round": 0, "steps": steps,
            "cold": {"wall_s": 20.0},
            "warm": {"wall_s": wall, "wall_s_range": [wall, wall + 0.1], "sampling": sampling, "it_per_s": it_per_s,
                     "peak_gib": 15.0}}


def test_ratio_to_upstreams_best_and_the_sampling_nodes_rate():
    table = ratios.ratio_table([_r("upstream-bf16", "upstream", None, 5.0, 4.7, 5.4),
                                _r("upstream-gpu-only", "upstream", None, 4.0, 3.7, 6.8),
                                _r("pack-fp8", "pack", None, 2.8, 2.5, 6.7),  # bursts: 6.7 it/s, 25 / 2.5 = 10
                                _r("pack-bf16", "pack", 8.0, 3.0, 2.6, 8.0)])
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["pack-fp8"][5:7] == ["6.70", "10.00"]
    assert rows["pack-fp8"][-1] == "0.70x |", "against upstream's best at the same budget (4.0 s)"
    assert rows["upstream-gpu-only"][-1] == "1.00x |"
    assert rows["pack-bf16"][-1] == "n/a |", "no upstream at 8 GiB in this call"
