"""The arithmetic of bench/profile_sampling.py, whose figures decide what the next GPU session tries: busy time
and idle gaps from kernel intervals, and the unprofiled call timeline (CPU issue time against GPU time)."""
from __future__ import annotations

import pytest

import bench_scripts

ps = bench_scripts.load("profile_sampling")


class Event:
    """A CUDA event's stand-in: a time on the GPU's clock, in ms."""

    def __init__(self, t_ms):
        self.t = t_ms

    def elapsed_time(self, later):
        return later.t - self.t


def test_busy_time_merges_overlaps_and_counts_only_long_gaps():
    r = ps.busy_and_gaps([(0, 100), (50, 150), (160, 200), (1000, 1100)])  # us
    assert r["busy_ms"] == pytest.approx(0.29) and r["span_ms"] == pytest.approx(1.1)
    assert r["gaps_over_50us"] == 1 and r["gap_ms"] == pytest.approx(0.8), "the 10 us gap is launch jitter"


def test_gap_neighbours_name_the_work_on_either_side_of_each_long_gap():
    from devkit.profile_summary import gap_neighbours

    ops = [(0, 100, "gemm"), (20, 120, "norm"),             # overlapping: the gap after them follows "norm"
           (300, 400, "attention"), (410, 500, "Memset (Device)"),  # a 180 us gap, then a 10 us one
           (700, 800, "gemm"), (1000, 1100, "attention"),   # two more long gaps
           (1100, 1110, "Memcpy HtoD (Pageable -> Device)")]
    r = gap_neighbours(ops, steps=2)
    pairs = r["gap_pairs_per_step"]
    assert list(pairs) == ["Memset (Device) -> gemm", "gemm -> attention", "norm -> attention"], pairs
    assert pairs["norm -> attention"] == {"count": 0.5, "ms": 0.09}
    assert r["idle_ms_per_step_all_gaps"] == pytest.approx((180 + 10 + 200 + 200) / 1e3 / 2)
    assert r["gpu_ops_per_step"] == {"kernel": 2.5, "memset": 0.5, "Memcpy HtoD (Pageable -> Device)": 0.5}
    assert r["small_ops_between"] == {"attention -> Memset (Device) -> gemm": 0.5}
    assert gap_neighbours([], steps=1) == {}


def test_small_op_neighbours_name_what_each_memset_and_device_copy_sits_between():
    from devkit.profile_summary import small_op_neighbours

    ops = [(0, 1, "Memset (Device)"), (2, 50, "nvjet_gemm"), (60, 61, "Memset (Device)"), (62, 90, "nvjet_gemm"),
           (100, 101, "Memcpy DtoD (Device -> Device)"), (102, 150, "flash_fwd"),
           (160, 161, "Memcpy HtoD (Pageable -> Device)"), (170, 171, "Memset (Device)")]
    r = small_op_neighbours(ops, steps=2)
    assert r == {"nvjet_gemm -> Memset (Device) -> nvjet_gemm": 0.5,
                 "(start) -> Memset (Device) -> nvjet_gemm": 0.5,
                 "nvjet_gemm -> Memcpy DtoD (Device -> Device) -> flash_fwd": 0.5,
                 "Memcpy HtoD (Pageable -> Device) -> Memset (Device) -> (end)": 0.5}, r


def test_wait_sites_rank_where_the_host_waited_longest():
    """Each sync or host read grouped by where it was made (the op with a Python stack, else the ops around it),
    with the copy's direction where the profile linked it, ranked by the CPU time it waited."""
    from types import SimpleNamespace as NS

    from devkit.profile_summary import wait_sites

    sampler = NS(name="aten::to", stack=["comfy/samplers.py(100): step", "torch/nn/x.py(1): f"], cpu_parent=None)
    copy = NS(name="aten::copy_", stack=[], cpu_parent=sampler)
    loose = NS(name="aten::item", stack=[], cpu_parent=None)
    events = [NS(name="cudaMemcpyAsync", cpu_parent=copy, self_cpu_time_total=4000.0,
                 kernels=[NS(name="Memcpy DtoH (Device -> Pageable)")]),
              NS(name="cudaMemcpyAsync", cpu_parent=copy, self_cpu_time_total=2000.0,
                 kernels=[NS(name="Memcpy DtoH (Device -> Pageable)")]),
              NS(name="cudaStreamSynchronize", cpu_parent=NS(name="aten::_local_scalar_dense", stack=[],
                                                               cpu_parent=loose), self_cpu_time_total=10.0),
              NS(name="cudaLaunchKernel", cpu_parent=copy, self_cpu_time_total=9e9)]  # not a wait
    r = wait_sites(events, steps=2)
    assert list(r) == ["cudaMemcpyAsync [Memcpy DtoH (Device -> Pageable)] in aten::to: comfy/samplers.py(100): step",
                       "cudaStreamSynchronize in aten::_local_scalar_dense <- aten::item"]
    first = r["cudaMemcpyAsync [Memcpy DtoH (Device -> Pageable)] in aten::to: comfy/samplers.py(100): step"]
    assert first == {"per_step": 1.0, "wait_ms_per_step": 3.0}


def test_call_timeline_splits_gpu_time_into_calls_and_between():
    # two steps of two calls: each call issued in 3 ms of CPU, run in 5 ms of GPU, 1 ms apart within a step
    # and 4 ms apart across the step boundary
    starts = [0.0, 6.0, 15.0, 21.0]
    marks = [[10.0 * i, 10.0 * i + 0.003, Event(s), Event(s + 5.0)] for i, s in enumerate(starts)]
    r = ps.call_timeline(marks, steps=2, run_s=0.030)
    assert r["cpu_issue_ms_per_call"] == pytest.approx(3.0)
    assert r["cpu_in_calls_ms_per_step"] == pytest.approx(6.0)
    assert r["cpu_outside_calls_ms_per_step"] == pytest.approx(15.0 - 6.0), "a 30 ms run of 2 steps"
    assert r["gpu_ms_per_call"] == pytest.approx(5.0)
    assert r["gpu_in_calls_ms_per_step"] == pytest.approx(10.0)
    assert r["gpu_between_calls_ms_per_step"] == pytest.approx((1 + 4 + 1) / 2)


def test_call_timeline_on_a_cpu_has_only_the_issue_time():
    assert ps.call_timeline([[0.0, 0.002], [1.0, 1.004]], steps=1) == {"cpu_issue_ms_per_call": 3.0,
                                                                      "cpu_in_calls_ms_per_step": 6.0}
    assert ps.call_timeline([], steps=1) == {}


def test_brief_gives_one_line_a_variant_with_its_run_and_step_figures():
    results = {"fp8+compile": {"warm_run_s": 2.466, "warm_runs_s": [2.466, 2.458, 2.467], "warm_step_ms": 98.64,
                               "cpu_issue_ms_per_call": 46.23, "gpu_busy_ms_per_step": 94.72, "top_cuda": "..."},
               "fp8+compile+graphs": {"warm_run_s": 2.416, "dit_calls_per_step": 2.0}}
    lines = ps.brief(results)
    assert lines == ["fp8+compile: warm_run_s=2.466 warm_runs_s=[2.466, 2.458, 2.467] warm_step_ms=98.64 "
                     "cpu_issue_ms_per_call=46.23 gpu_busy_ms_per_step=94.72",
                     "fp8+compile+graphs: warm_run_s=2.416 dit_calls_per_step=2.0"]


def test_a_graphs_variant_profiles_a_run_as_long_as_the_warm_ones():
    """Its calls' signatures hold the run's host sigmas by value: a shorter profiled run would record graphs of its
    own and replay none (run98), so the profile would show no replay."""
    assert ps.profiled_step_count(["compile", "graphs"], 25, 2) == 25
    assert ps.profiled_step_count(["compile"], 25, 2) == 2


def test_small_op_sites_name_the_ops_that_launched_memsets_and_device_copies():
    from types import SimpleNamespace as NS

    from devkit.profile_summary import small_op_sites

    gemm = NS(name="aten::_scaled_mm", stack=[], cpu_parent=NS(name="newbie::linear", stack=[], cpu_parent=None))
    clone = NS(name="aten::copy_", stack=[], cpu_parent=NS(name="aten::clone", stack=[], cpu_parent=None))
    events = [NS(name="cudaMemsetAsync", cpu_parent=gemm, kernels=[]),
              NS(name="cudaMemsetAsync", cpu_parent=gemm, kernels=[]),
              NS(name="cudaMemcpyAsync", cpu_parent=clone, kernels=[NS(name="Memcpy DtoD (Device -> Device)")]),
              NS(name="cudaMemcpyAsync", cpu_parent=clone, kernels=[NS(name="Memcpy HtoD (Pageable -> Device)")]),
              NS(name="cudaLaunchKernel", cpu_parent=gemm, kernels=[])]
    assert small_op_sites(events, steps=2) == {"memset in aten::_scaled_mm <- newbie::linear": 1.0,
                                               "DtoD copy in aten::copy_ <- aten::clone": 0.5}
