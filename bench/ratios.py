"""Each configuration's warm median as a ratio to upstream's fastest configuration at the same budget, from the
runs of one device call (bench/run.py prints it at the end; bench/report.py puts it into docs/BENCHMARKS.md)."""
from __future__ import annotations


def ratio_table(results: list[dict]) -> str:
    """Each configuration's warm median as a ratio to the fastest upstream configuration at the same budget,
    from this call's own runs."""
    best = {}
    for r in results:
        w = r.get("warm", {}).get("wall_s")
        if r["kind"] == "upstream" and w:
            best[r["budget_gib"]] = min(best.get(r["budget_gib"], w), w)
    lines = ["| budget GiB | configuration | round | warm s median [min, max] | sampling s | it/s | cold s | peak GiB | "
             "vs upstream's best here |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        w = r.get("warm", {})
        if "wall_s" not in w:
            lines.append(f"| {r['budget_gib']} | {r['config']} | {r.get('round')} | failed | | | | | |")
            continue
        ref = best.get(r["budget_gib"])
        ratio = f"{w['wall_s'] / ref:.2f}x" if ref else "n/a"
        sampling = f"{w['sampling']:.2f}" if "sampling" in w else ""
        lines.append(f"| {r['budget_gib'] or 'none'} | {r['config']} | {r.get('round')} | {w['wall_s']:.2f} "
                     f"[{w['wall_s_range'][0]:.2f}, {w['wall_s_range'][1]:.2f}] | {sampling} | "
                     f"{w.get('it_per_s', 0):.2f} | "
                     f"{r.get('cold', {}).get('wall_s', float('nan')):.1f} | {w.get('peak_gib', 0):.1f} | "
                     f"{ratio} |")
    return "\n".join(lines)
