"""Each configuration's warm median as a ratio to upstream's fastest configuration at the same budget, from the
runs of one device call (bench/run.py prints it at the end; bench/report.py puts it into docs/BENCHMARKS.md)."""
from __future__ import annotations


def ratio_table(results: list[dict]) -> str:
    """Each configuration's warm median as a ratio to the fastest upstream configuration at the same budget,
    from this call's own runs. Two rates: it/s from the websocket's progress events (they arrive in bursts when
    the sampler keeps the server's CPU busy: 5.9-8.7 it/s for fp8 images sampled in 2.51-2.65 s, run81) and the
    steps over the sampling node's seconds (which include the node's work before its first step)."""
    best = {}
    for r in results:
        w = r.get("warm", {}).get("wall_s")
        if r["kind"] == "upstream" and w:
            best[r["budget_gib"]] = min(best.get(r["budget_gib"], w), w)
    lines = ["| budget GiB | configuration | round | warm s median [min, max] | sampling s | it/s | steps / sampling s | "
             "cold s | peak GiB | vs upstream's best here |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        w = r.get("warm", {})
        if "wall_s" not in w:
            lines.append(f"| {r['budget_gib']} | {r['config']} | {r.get('round')} | failed | | | | | | |")
            continue
        ref = best.get(r["budget_gib"])
        ratio = f"{w['wall_s'] / ref:.2f}x" if ref else "n/a"
        sampling = f"{w['sampling']:.2f}" if "sampling" in w else ""
        # the sampling node's own rate: the loop and what precedes it; the progress events' it/s can come in bursts
        per_node = f"{r['steps'] / w['sampling']:.2f}" if w.get("sampling") and r.get("steps") else ""
        lines.append(f"| {r['budget_gib'] or 'none'} | {r['config']} | {r.get('round')} | {w['wall_s']:.2f} "
                     f"[{w['wall_s_range'][0]:.2f}, {w['wall_s_range'][1]:.2f}] | {sampling} | "
                     f"{w.get('it_per_s', 0):.2f} | {per_node} | "
                     f"{r.get('cold', {}).get('wall_s', float('nan')):.1f} | {w.get('peak_gib', 0):.1f} | "
                     f"{ratio} |")
    return "\n".join(lines)
