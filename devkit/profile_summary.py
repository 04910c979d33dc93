"""What a profiled sampling run says, per step: GPU busy time and its idle gaps, host synchronisations and reads,
and the top kernels and CPU ops. Shared by bench/profile_sampling.py (a plain process) and devkit/profile_nodes (a
sampling run inside a ComfyUI server, `bench/run.py --profile`)."""
from __future__ import annotations

SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")
# Calls that may wait for the GPU without being a sync by name (ComfyUI asks for the free memory at every batch).
MAYBE_WAITS = ("cudaMemGetInfo",)
GAP_US = 50.0  # gaps between kernels shorter than this are launch jitter, not starvation


def busy_and_gaps(intervals: list[tuple[float, float]]) -> dict:
    """The union of kernel [start, end] intervals (us): busy time, span, and the idle gaps longer than GAP_US."""
    if not intervals:
        return {"span_ms": 0.0, "busy_ms": 0.0, "busy_fraction": None, "gaps_over_50us": 0, "gap_ms": 0.0}
    intervals = sorted(intervals)
    busy, gaps, (cur_s, cur_e) = 0.0, [], intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e > GAP_US:
                gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e in intervals) - intervals[0][0]
    return {"span_ms": round(span / 1e3, 2), "busy_ms": round(busy / 1e3, 2),
            "busy_fraction": round(busy / span, 3) if span else None, "gaps_over_50us": len(gaps),
            "gap_ms": round(sum(gaps) / 1e3, 2), "largest_gaps_ms": [round(g / 1e3, 2) for g in sorted(gaps)[-5:]]}


def gap_neighbours(kernels: list[tuple[float, float, str]], steps: int, top: int = 8) -> dict:
    """Which GPU work the idle time falls between: for each gap longer than GAP_US, the GPU operation that ended
    last before it and the one that starts it, grouped by that pair (names cut to 50 characters) with their count
    and idle ms per step; and all idle time per step, the gaps under GAP_US included (launch latency, or a CPU
    behind the GPU), with the GPU operations per step by kind (copies by direction)."""
    if not kernels:
        return {}
    kernels = sorted(kernels)
    pairs: dict[str, list[float]] = {}
    idle = 0.0
    cur_e, last = kernels[0][1], kernels[0][2]
    for s, e, name in kernels[1:]:
        if s > cur_e:
            idle += s - cur_e
            if s - cur_e > GAP_US:
                pair = pairs.setdefault(f"{last[:50]} -> {name[:50]}", [0, 0.0])
                pair[0] += 1
                pair[1] += s - cur_e
        if e >= cur_e:
            cur_e, last = e, name
    kinds: dict[str, int] = {}
    for _, _, name in kernels:  # copies by direction and memory ("Memcpy HtoD (Pageable -> Device)")
        kind = name if name.startswith("Memcpy") else "memset" if name.startswith("Memset") else "kernel"
        kinds[kind] = kinds.get(kind, 0) + 1
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
    return {"idle_ms_per_step_all_gaps": round(idle / 1e3 / steps, 3),
            "gpu_ops_per_step": {k: round(v / steps, 1) for k, v in sorted(kinds.items())},
            "gap_pairs_per_step": {k: {"count": round(n / steps, 1), "ms": round(us / 1e3 / steps, 2)}
                                   for k, (n, us) in ranked},
            "small_ops_between": small_op_neighbours(kernels, steps, top)}


def small_op_neighbours(kernels: list[tuple[float, float, str]], steps: int, top: int = 8) -> dict:
    """Where the memsets and device-to-device copies sit: for each, the GPU operations just before and just after
    it in start order (names cut to 50 characters), grouped as "before -> op -> after" with their count per step.
    Inside a CUDA graph each is a node of its own; the kernel they precede is usually the library that made them."""
    kernels = sorted(kernels)
    triples: dict[str, int] = {}
    for i, (_, _, name) in enumerate(kernels):
        if not (name.startswith("Memset") or name.startswith("Memcpy DtoD")):
            continue
        before = kernels[i - 1][2][:50] if i else "(start)"
        after = kernels[i + 1][2][:50] if i + 1 < len(kernels) else "(end)"
        key = f"{before} -> {name[:30]} -> {after}"
        triples[key] = triples.get(key, 0) + 1
    ranked = sorted(triples.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(n / steps, 1) for k, n in ranked}


def _is_wait(name: str, calls: tuple) -> bool:
    """A host read (item, is_nonzero) or one of `calls` (prefixes of CUDA runtime calls)."""
    return name in HOST_READS[1:] or name.startswith(calls)


def _site(e, frames: int) -> tuple[str | None, list[str]]:
    """Where event `e` was made: the nearest op with a Python stack from `e` up, as "op: its innermost frames
    outside torch" (None where no op has one), and the names of the ops above `e` passed on the way."""
    op, chain = e, []
    while op is not None and not getattr(op, "stack", None):
        if op is not e:
            chain.append(op.name)
        op = op.cpu_parent
    if op is None:
        return None, chain
    own = [f for f in op.stack if not f.startswith("torch/") and "/torch/" not in f and "built-in" not in f][:frames]
    return f"{op.name}: " + (" <- ".join(own) or "(torch internals)"), chain


def read_sites(events, frames: int = 4) -> dict:
    """Where the host waits for the GPU: for each host read (item, is_nonzero) and each synchronising CUDA call
    (a stream sync, a blocking memcpy), the innermost Python frames outside torch of the nearest op with a stack
    (the profile records stacks on ops; a CUDA call is attributed to the op that made it), with how often each
    site waited."""
    sites: dict[str, int] = {}
    for e in events:
        if not _is_wait(e.name, SYNC_CALLS):
            continue
        where, _ = _site(e, frames)
        if where is not None:
            key = f"{e.name} in {where}"
            sites[key] = sites.get(key, 0) + 1
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def wait_sites(events, steps: int, frames: int = 4, top: int = 12) -> dict:
    """Where the host waited and for how long: each synchronising CUDA call and host read (SYNC_CALLS, HOST_READS,
    MAYBE_WAITS), grouped by site, with its count and its own CPU time per step (the wait; a blocking
    cudaMemcpyAsync waits for the GPU to reach the copy). A site is the innermost Python frames outside torch of
    the nearest op with a stack (`--stacks`), or else the names of the ops the call was made in; a copy also names
    its direction where the profile linked the GPU's memcpy to it ("Memcpy HtoD (Pageable -> Device)")."""
    sites: dict[str, list[float]] = {}
    for e in events:
        if not _is_wait(e.name, SYNC_CALLS + MAYBE_WAITS):
            continue
        where, chain = _site(e, frames)
        where = where or " <- ".join(chain[:3]) or "(no op)"
        kinds = sorted({k.name for k in getattr(e, "kernels", ()) or () if k.name.startswith("Memcpy")})
        site = sites.setdefault(f"{e.name}{' [' + ', '.join(kinds) + ']' if kinds else ''} in {where}", [0, 0.0])
        site[0] += 1
        site[1] += e.self_cpu_time_total
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]
    return {k: {"per_step": round(n / steps, 2), "wait_ms_per_step": round(us / 1e3 / steps, 2)}
            for k, (n, us) in ranked}


def small_op_sites(events, steps: int, top: int = 8) -> dict:
    """Which ops launch the memsets and device-to-device copies (outside CUDA graphs, whose nodes all come from one
    cudaGraphLaunch): each cudaMemsetAsync, and each cudaMemcpyAsync the profile linked to a "Memcpy DtoD", by the
    names of the ops it was made in (innermost first, up to three), counted per step."""
    sites: dict[str, int] = {}
    for e in events:
        if e.name.startswith("cudaMemsetAsync"):
            what = "memset"
        elif e.name.startswith("cudaMemcpyAsync") and any(
                k.name.startswith("Memcpy DtoD") for k in getattr(e, "kernels", ()) or ()):
            what = "DtoD copy"
        else:
            continue
        _, chain = _site(e, 0)
        key = f"{what} in {' <- '.join(chain[:3]) or '(no op)'}"
        sites[key] = sites.get(key, 0) + 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(n / steps, 1) for k, n in ranked}


def summarise(prof, steps: int, wall_s: float) -> dict:
    """Per-step figures of one profiled sampling run."""
    from torch.autograd import DeviceType

    events = prof.events()
    named = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA]
    gpu = busy_and_gaps([(s, e) for s, e, _ in named])
    cpu_names = [e.name for e in events if e.device_type == DeviceType.CPU]
    syncs = {n: sum(1 for c in cpu_names if c.startswith(n)) for n in SYNC_CALLS}
    reads = {n: cpu_names.count(n) for n in HOST_READS}
    return {"steps": steps, "wall_s": round(wall_s, 3), "step_ms": round(wall_s * 1e3 / steps, 2),
            "gpu": gpu, "gpu_busy_ms_per_step": round(gpu["busy_ms"] / steps, 2),
            "gpu_idle_ms_per_step": round(gpu["gap_ms"] / steps, 2),
            "host_syncs_per_step": {k: round(v / steps, 2) for k, v in syncs.items() if v},
            "host_reads_per_step": {k: round(v / steps, 2) for k, v in reads.items() if v},
            "host_read_sites": read_sites(events), "host_wait_sites": wait_sites(events, steps),
            "gaps": gap_neighbours(named, steps), "small_op_sites": small_op_sites(events, steps)}


def tables(prof, top: int, cuda: bool) -> dict:
    """The profile's top CPU ops and, where CUDA was profiled, top kernels, as PyTorch's text tables."""
    averages = prof.key_averages()
    out = {"top_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)}
    if cuda:
        out["top_cuda"] = averages.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)
    return out
