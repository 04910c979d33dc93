"""Headless NewBie generation through a real ComfyUI server with this pack loaded.

With no arguments it writes the embedded tiny NewBie model (random weights: the picture is noise-like, the
point is that every stage runs) and generates one image. With --models-dir it uses your own models folder
(ComfyUI layout: diffusion_models/, text_encoders/, vae/). Prints where the image went, how long each stage
took and the peak memory of the server process.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit import harness  # noqa: E402


def _peak_memory(pid: int, stop: threading.Event, out: dict) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            out["rss"] = max(out.get("rss", 0), rss)
            stop.wait(0.1)
    except psutil.Error:
        return


def _gpu_peak(pid: int, stop: threading.Event, out: dict) -> None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return
    while not stop.is_set():
        try:
            text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5).stdout
            for line in text.splitlines():
                p, used = [x.strip() for x in line.split(",")]
                if int(p) == pid:
                    out["gpu_mib"] = max(out.get("gpu_mib", 0), int(used))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        stop.wait(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models-dir", type=Path, help="your ComfyUI-style models folder (default: the tiny model)")
    ap.add_argument("--diffusion-model", default=None, help="file name in diffusion_models/ (default: the tiny DiT)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--prompt", default=None, help="NewBie XML (or plain) prompt; default: a one-character example")
    ap.add_argument("--out", type=Path, default=REPO / "out", help="where ComfyUI writes the image")
    args = ap.parse_args()

    host = harness.find_hosts()["v0.33"] or harness.find_hosts()["v0.8"]
    if host is None:
        print("No ComfyUI found. Looked in: " + harness.where_looked(), file=sys.stderr)
        return 2
    import torch

    t0 = time.perf_counter()
    if args.models_dir is None:
        sys.path.insert(0, str(host))
        from devkit import tiny_models

        models = Path.home() / ".cache" / "comfyui-newbie-lowvram" / "models"
        tiny_models.write_single_files(models)
        dit = tiny_models.SINGLE_FILE_NAMES["dit"].format(name=tiny_models.TINY.name).split("/")[-1]
        print(f"[generate] embedded tiny NewBie model in {models} ({time.perf_counter() - t0:.1f} s)")
    else:
        models, dit = args.models_dir, args.diffusion_model
        if dit is None:
            print("--diffusion-model is required with --models-dir", file=sys.stderr)
            return 2
    from devkit import graphs

    args.prompt = args.prompt or graphs.XML_PROMPT
    work = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    server = harness.ComfyServer(host, work, models, cpu=not torch.cuda.is_available())
    t_start = time.perf_counter()
    server.start()
    print(f"[generate] ComfyUI {harness.host_version(host)} started in {time.perf_counter() - t_start:.1f} s "
          f"({'CPU' if server.cpu else 'GPU'}), log: {server.log_path}")
    graph = graphs.txt2img(seed=args.seed, width=args.width, height=args.height, steps=args.steps,
                           diffusion_model=dit, precision=args.precision, prefix="newbie")
    # The prompt goes through the pack's XML node: validated, and encoded as NewBie was trained.
    del graph["3"]
    graph["2"] = {"class_type": "NewBieXMLPromptFlatten", "inputs": {
        "text": args.prompt, "mode": "official", "negative": graphs.NEGATIVE, "clip": ["1", 1]}}
    graph["5"]["inputs"]["positive"], graph["5"]["inputs"]["negative"] = ["2", 0], ["2", 1]
    stop, peaks = threading.Event(), {}
    watchers = [threading.Thread(target=f, args=(server.proc.pid, stop, peaks), daemon=True)
                for f in (_peak_memory, _gpu_peak)]
    for w in watchers:
        w.start()
    try:
        t_run = time.perf_counter()
        entry, events = server.run_with_events(graph)
        total = time.perf_counter() - t_run
    finally:
        stop.set()
        server.stop()
    # Stage times from the websocket: each 'executing' message starts a node; the next one ends it.
    starts = [(e["data"]["node"], e["_t"]) for e in events if e.get("type") == "executing" and "_t" in e]
    print(f"[generate] image: {server.output_images(entry)[0]}")
    print(f"[generate] total {total:.2f} s for {args.width}x{args.height}, {args.steps} steps")
    for (node, t), nxt in zip(starts, starts[1:] + [(None, None)]):
        if node is None or nxt[1] is None:
            continue
        print(f"[generate]   {graph[node]['class_type']:<24} {nxt[1] - t:7.2f} s")
    print(f"[generate] peak memory of the server: RAM {peaks.get('rss', 0) / 2**30:.2f} GiB"
          + (f", GPU {peaks['gpu_mib'] / 1024:.2f} GiB" if "gpu_mib" in peaks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
