"""OOM Guard on a real GPU: a 1024x1024 NewBie job whose memory another process takes away mid-job.

Runs a real ComfyUI server (devkit/harness.py) on a CUDA machine with the graph
NewBieLoader -> NewBieOOMGuard -> CLIPTextEncode x2 -> EmptySD3LatentImage -> KSampler (euler_ancestral)
-> VAEDecode -> SaveImage (+ SaveLatent), twice with the same seed:
1. undisturbed;
2. disturbed: when the KSampler reports step --grab-at-step (0: as soon as KSampler starts, before the
   model is loaded), a second process takes the GPU's free memory down to --leave-gib and holds it to the end
   (--greedy: it keeps taking whatever the server frees, like a co-tenant ramping up).
Optionally (--budget-gib) a third process holds everything but that budget for the whole run, as
bench/run.py does, and (--unguarded-too) the disturbed job runs once more without the guard, to show what
upstream does in the same situation.

Prints, and writes to <work>/summary.json: the guard's recoveries (from the server log), whether ComfyUI fell
back to tiled VAE decoding, time per run, and the difference between the disturbed and undisturbed images
(latent relative error; pixel max difference). The claim under test: an equal image (bit-identical unless
the batch was split or the decode tiled), or a failed prompt whose message says how much memory was needed.
Note: PyTorch's caching allocator keeps what a step used, so a grab after the first steps may not cause any
OOM; the summary says so rather than claiming a recovery. --grab-at-step 0 makes an OOM most likely.

Weights: --models-dir (ComfyUI layout, with --diffusion-model), else full-size random weights written by
devkit/tiny_models.py (FULL; ~16 GB, about 1.5 minutes) into --weights-dir.
Example (device machine, host unpacked to /tmp/ComfyUI):
    COMFYUI_PATH=/tmp/ComfyUI python bench/oom_recovery.py --leave-gib 0.5 --grab-at-step 0 --unguarded-too
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit import graphs  # noqa: E402
from devkit import harness  # noqa: E402

# A process that takes GPU memory: `grab` (a line on stdin) takes free memory down to LEAVE bytes, `greedy`
# keeps doing so every 50 ms; `release` or EOF ends it. Prints one JSON line per event.
HOG = textwrap.dedent("""
    import json, sys, threading, time, torch
    leave = int(sys.argv[1]); greedy = sys.argv[2] == "1"; immediate = sys.argv[3] == "1"
    torch.cuda.init(); held = []; stop = threading.Event()
    def take():
        taken = 0
        while True:
            free, _ = torch.cuda.mem_get_info()
            chunk = min(free - leave, 256 << 20)
            if chunk < (8 << 20):
                return taken
            try:
                held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda")); taken += chunk
            except torch.OutOfMemoryError:
                return taken
    def keep_taking():
        while not stop.wait(0.05):
            take()
    def report(event, taken):
        free, total = torch.cuda.mem_get_info()
        print(json.dumps({"event": event, "taken": taken, "held": sum(t.numel() for t in held), "free": free}),
              flush=True)
    if immediate:
        report("grabbed", take())
    else:
        print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        if line.strip() == "grab":
            report("grabbed", take())
            if greedy:
                threading.Thread(target=keep_taking, daemon=True).start()
        elif line.strip() == "release":
            break
    stop.set(); report("released", 0)
""")


class Hog:
    def __init__(self, leave_bytes: int, greedy: bool = False, immediate: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", HOG, str(leave_bytes), "1" if greedy else "0",
                                      "1" if immediate else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.first = json.loads(self.proc.stdout.readline())

    def grab(self) -> dict:
        self.proc.stdin.write("grab\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("release\n")
            self.proc.stdin.close()
            self.proc.wait(30)


def graph_for(args, dit: str, prefix: str, max_retries: int | None, pause: dict | None = None) -> dict:
    """The job, guarded unless max_retries is None; with `pause` ({"signal", "ack", "call"}), devkit's model
    fault node (inside the guard) pauses before that model call until the hog has grabbed."""
    graph = graphs.txt2img(seed=args.seed, width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                           sampler="euler_ancestral", prefix=prefix, diffusion_model=dit, precision=args.precision)
    if max_retries is not None:
        graph["8"] = {"class_type": "NewBieOOMGuard", "inputs": {"model": ["1", 0], "vae": ["1", 2],
                                                                 "max_retries": max_retries,
                                                                 "allow_batch_split": True}}
        graph["5"]["inputs"]["model"] = ["8", 0]
        graph["6"]["inputs"]["vae"] = ["8", 1]
    graph["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}}
    if pause is not None:
        graph = graphs.with_faults(graph, {"pause_at_call": pause["call"], "pause_signal": pause["signal"],
                                           "pause_ack": pause["ack"]})
    return graph


def _grab_on_signal(signal: Path, ack: Path, hog: Hog, out: dict, stop) -> None:
    """Wait for the server's pause signal, take the memory, then let the server go on."""
    while not stop.is_set():
        if signal.exists():
            out.update(hog.grab(), at="model call pause")
            print(f"[oom_recovery] hog grabbed {out['taken'] / 2**30:.2f} GiB at the paused model call; "
                  f"{out['free'] / 2**30:.2f} GiB free now", flush=True)
            ack.write_text("grabbed")
            return
        stop.wait(0.02)


def run(server, graph: dict, grab_at: int | None = None, hog: Hog | None = None, pause: dict | None = None) -> dict:
    """Queue the graph; when KSampler (node 5) reaches step `grab_at`, tell the hog to grab. With `pause`
    ({"signal", "ack"} paths of the graph's fault plan, see graph_for), grab when the server signals instead."""
    import threading

    import websocket  # websocket-client

    watcher, paused_grab, stop = None, {}, threading.Event()
    if pause is not None and hog is not None:
        for p in (pause["signal"], pause["ack"]):
            Path(p).unlink(missing_ok=True)
        watcher = threading.Thread(target=_grab_on_signal, args=(Path(pause["signal"]), Path(pause["ack"]), hog,
                                                                 paused_grab, stop), daemon=True)
        watcher.start()
        grab_at = None

    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=5)
    log_start = server.log_path.stat().st_size
    t0 = time.perf_counter()
    prompt_id = server.queue(graph)
    grabbed = None
    try:
        while grab_at is not None and grabbed is None:
            try:
                msg = ws.recv()
            except websocket.WebSocketTimeoutException:
                if not server.alive():
                    break
                continue
            if not isinstance(msg, str):
                continue
            m = json.loads(msg)
            data = m.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            started = m.get("type") == "executing" and data.get("node") == "5" and grab_at == 0
            stepped = m.get("type") == "progress" and data.get("node") == "5" and data.get("value", 0) >= grab_at
            if started or stepped:
                grabbed = dict(hog.grab(), at=("KSampler start" if started else f"step {data['value']}"),
                               after_s=round(time.perf_counter() - t0, 2))
                print(f"[oom_recovery] hog grabbed {grabbed['taken'] / 2**30:.2f} GiB at {grabbed['at']}; "
                      f"{grabbed['free'] / 2**30:.2f} GiB free now", flush=True)
            if m.get("type") in ("execution_success", "execution_error"):
                break
    finally:
        ws.close()
    result = {"grab": grabbed}
    try:
        entry = server.wait(prompt_id, timeout=1800)
        result["ok"] = True
        result["image"] = str(server.output_images(entry)[0])
        latents = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
        result["latent"] = str(server.output_dir / latents[0]["subfolder"] / latents[0]["filename"])
    except harness.PromptFailed as e:
        result["ok"] = False
        result["error"] = str(e)[:3000]
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(5)
            result["grab"] = paused_grab or None
        if hog is not None:
            hog.release()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    with open(server.log_path, "rb") as f:
        f.seek(log_start)
        log_text = f.read().decode(errors="replace")
    result["guard_log"] = [line for line in log_text.splitlines() if "NewBie OOM guard" in line][:40]
    result["recoveries"] = sum("NewBie OOM guard: recovered" in line for line in result["guard_log"])
    result["comfy_tiled_vae"] = "retrying with tiled VAE decoding" in log_text
    result["oom_in_log"] = "out of memory" in log_text.lower()
    return result


def compare(a: dict, b: dict) -> dict:
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    la = load_file(a["latent"])["latent_tensor"].double().numpy()
    lb = load_file(b["latent"])["latent_tensor"].double().numpy()
    pa = np.asarray(Image.open(a["image"]).convert("RGB")).astype(int)
    pb = np.asarray(Image.open(b["image"]).convert("RGB")).astype(int)
    return {"latent_identical": bool(np.array_equal(la, lb)),
            "latent_rel_err": float(np.linalg.norm(la - lb) / max(np.linalg.norm(la), 1e-30)),
            "pixels_identical": bool(np.array_equal(pa, pb)),
            "pixel_max_diff": int(np.abs(pa - pb).max()), "pixel_mean_diff": float(np.abs(pa - pb).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", type=Path, help="ComfyUI folder (default: as the tests find it, COMFYUI_PATH first)")
    ap.add_argument("--models-dir", type=Path, help="your ComfyUI-style models folder")
    ap.add_argument("--diffusion-model", help="file name in diffusion_models/ (with --models-dir)")
    ap.add_argument("--weights-dir", type=Path, default=Path("/tmp/newbie-full-random"),
                    help="where full-size random weights are written when --models-dir is not given")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--precision", default="bf16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--budget-gib", type=float, help="hold all but this much GPU memory for the whole run")
    ap.add_argument("--grab-at-step", type=int, default=3, help="0: when KSampler starts; N: after step N")
    ap.add_argument("--grab-at-call", type=int, default=None,
                    help="grab exactly before this model call (the server pauses there through devkit's fault "
                         "hook until the grab is done), so the call meets a real CUDA OOM")
    ap.add_argument("--leave-gib", type=float, default=0.5, help="free memory the grab leaves")
    ap.add_argument("--greedy", action="store_true", help="keep taking what the server frees after the grab")
    ap.add_argument("--unguarded-too", action="store_true", help="also run the disturbed job without the guard")
    ap.add_argument("--server-arg", action="append", default=[], help="extra ComfyUI argument (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "oom-recovery")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("[oom_recovery] needs a CUDA GPU (this measures real out-of-memory recovery)", file=sys.stderr)
        return 2
    hosts = harness.find_hosts()
    host = args.comfy or hosts["v0.33"] or hosts["v0.8"]
    if host is None or not (Path(host) / "main.py").exists():
        print("[oom_recovery] no ComfyUI found; looked in " + harness.where_looked(), file=sys.stderr)
        return 2
    if args.models_dir is None:
        sys.path.insert(0, str(host))
        from devkit import tiny_models

        t = time.perf_counter()
        tiny_models.write_single_files(args.weights_dir, tiny_models.FULL, device="cuda")
        models, dit = args.weights_dir, f"{tiny_models.FULL.name}.safetensors"
        torch.cuda.empty_cache()
        print(f"[oom_recovery] full-size random weights in {models} ({time.perf_counter() - t:.0f} s)", flush=True)
    else:
        models, dit = args.models_dir, args.diffusion_model
        if not dit:
            print("--diffusion-model is required with --models-dir", file=sys.stderr)
            return 2

    work = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    budget = Hog(int((args.budget_gib + 0.6) * 2**30), immediate=True) if args.budget_gib else None
    pause = None
    if args.grab_at_call is not None:
        work.mkdir(parents=True, exist_ok=True)
        # Only the disturbed graphs carry the pause (devkit's fault node, which this server loads).
        pause = {"signal": str(work / "pause.signal"), "ack": str(work / "pause.ack"), "call": args.grab_at_call}
    server = harness.ComfyServer(host, work, models, extra_args=args.server_arg, cpu=False,
                                 extra_nodes=[harness.FAULT_NODES] if pause else [])
    summary = {"host": harness.host_version(Path(host)), "gpu": torch.cuda.get_device_name(0),
               "args": {k: str(v) for k, v in vars(args).items()}, "budget_hog": budget and budget.first}
    try:
        server.start()
        print(f"[oom_recovery] ComfyUI {summary['host']} on {summary['gpu']}, log {server.log_path}", flush=True)
        summary["undisturbed"] = run(server, graph_for(args, dit, "undisturbed", 6))
        print(f"[oom_recovery] undisturbed: {summary['undisturbed']['seconds']} s, "
              f"ok={summary['undisturbed']['ok']}", flush=True)
        hog = Hog(int(args.leave_gib * 2**30), greedy=args.greedy)
        summary["disturbed"] = run(server, graph_for(args, dit, "disturbed", 7, pause), args.grab_at_step, hog,
                                   pause)
        d = summary["disturbed"]
        print(f"[oom_recovery] disturbed: {d['seconds']} s, ok={d['ok']}, recoveries={d['recoveries']}, "
              f"tiled VAE={d['comfy_tiled_vae']}", flush=True)
        if d["ok"] and summary["undisturbed"]["ok"]:
            summary["comparison"] = compare(summary["undisturbed"], d)
        if args.unguarded_too:
            hog = Hog(int(args.leave_gib * 2**30), greedy=args.greedy)
            summary["unguarded_disturbed"] = u = run(server, graph_for(args, dit, "unguarded", None, pause),
                                                     args.grab_at_step, hog, pause)
            if u["ok"] and summary["undisturbed"]["ok"]:
                summary["unguarded_comparison"] = compare(summary["undisturbed"], u)
    finally:
        server.stop()
        if budget is not None:
            budget.release()
    d = summary.get("disturbed", {})
    if not d.get("oom_in_log"):
        summary["verdict"] = "no out-of-memory happened in the disturbed run: nothing was tested (grab earlier)"
    elif d.get("ok"):
        c = summary.get("comparison", {})
        same = c.get("latent_identical") or c.get("latent_rel_err", 1) <= 1e-3
        summary["verdict"] = ("recovered, same image" if same else "recovered, but the image differs") + \
            (" (ComfyUI tiled the VAE decode)" if d.get("comfy_tiled_vae") else "")
    else:
        summary["verdict"] = "failed with a message (see disturbed.error)"
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary.get(k) for k in ("verdict", "comparison", "unguarded_comparison")}, indent=2))
    print(f"[oom_recovery] summary: {work / 'summary.json'}")
    return 0 if summary["verdict"].startswith("recovered, same") else 1


if __name__ == "__main__":
    sys.exit(main())
