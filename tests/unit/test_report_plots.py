"""What bench/report.py plots: for each budget, the newest device call that timed the pack's default bf16 graph and
an upstream configuration together, never a pack figure from one call against upstream's from another."""
from __future__ import annotations

import bench_scripts

report = bench_scripts.load("report")


def _r(config, budget, wall, peak=5.0):
    return {"config": config, "budget_gib": budget, "warm": {"wall_s": wall, "peak_gib": peak}}


def test_each_budget_takes_the_newest_call_that_has_both_sides():
    runs = {
        "run9": [_r("pack-bf16", 6.0, 8.0), _r("upstream-bf16", 6.0, 6.0)],
        "run10": [_r("pack-bf16", 6.0, 5.0)],  # newer, numerically, but no upstream in that call
        "run8": [_r("pack-bf16", 4.0, 5.0), _r("upstream-bf16", 4.0, 9.0), _r("upstream-gpu-only", 4.0, 7.0),
                 _r("pack-fp8", 4.0, 3.0)],
        "run2": [_r("pack-bf16-native", None, 3.0), _r("upstream-gpu-only-native", None, 4.0)],
    }
    pairs = {p["budget"]: p for p in report.budget_pairs(runs)}
    assert set(pairs) == {None, 6.0, 4.0}
    assert pairs[6.0]["run"] == "run9" and (pairs[6.0]["pack"], pairs[6.0]["upstream"]) == (8.0, 6.0)
    assert pairs[4.0]["upstream"] == 7.0 and pairs[4.0]["upstream_config"] == "upstream-gpu-only", "upstream's best"
    assert pairs[4.0]["pack"] == 5.0, "the pack's default bf16 graph, not another precision"
    assert pairs[None]["run"] == "run2"
