"""What the guard says: byte counts, the message when nothing made a call fit, the node's report, and text
shown on the guard node in ComfyUI's front end."""
from __future__ import annotations

import re
import sys
from typing import Sequence

import torch

_ALLOC = re.compile(r"Tried to allocate ([0-9.]+) ?([KMGT]i?B)", re.IGNORECASE)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

GENERAL_HINTS = ("a smaller resolution or batch size", "lower precision (NewBie Loader precision fp16, or an fp8 "
                 "checkpoint)", "closing other programs that use the GPU",
                 "starting ComfyUI with --lowvram or a larger --reserve-vram budget for other apps")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def requested_bytes(message: str) -> int | None:
    """The allocation a CUDA OOM message says failed ("Tried to allocate 2.50 GiB"), if it says."""
    m = _ALLOC.search(message or "")
    return int(float(m.group(1)) * _UNITS[m.group(2)[0].upper()]) if m else None


def first_line(text: str, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line[:limit]


def unrecoverable_message(where, actions: Sequence[str], last_error: str, memory, need: int | None, basis: str,
                          notes: Sequence[str] = (), hints: Sequence[str] = ()) -> str:
    """Out of memory at `where` after the retries in `actions`: how much it needs (the larger of ComfyUI's
    estimate `need`, made on `basis`, and the failed allocation), what is free, what to try (`hints` first)."""
    asked = requested_bytes(last_error)
    free, total = memory.free_bytes(), memory.total_bytes()
    need = max(need or 0, asked or 0) or None
    done = "; ".join([*actions, *notes]) if actions else "no retries allowed: max_retries is 0"
    return (f"Out of memory at {where}, and the NewBie OOM Guard could not make it fit after "
            f"{len(actions)} retry(ies) ({done}). It needs about {fmt_bytes(need)} ({basis}); "
            f"{fmt_bytes(free)} is free on {memory.device}"
            + (f" of {fmt_bytes(total)}" if total else "") + f". Try {', '.join([*hints, *GENERAL_HINTS])}. "
            f"Last error: {first_line(last_error)}")


def describe(max_retries: int, allow_batch_split: bool, vae_guarded: bool, device) -> str:
    """The node's report: the ladder in force."""
    rungs = ["empty the allocator cache", "unload other models", "offload part of this model's weights"]
    if allow_batch_split:
        rungs.append("split the batch (cond/uncond, then rows) in halves")
    lines = [f"OOM guard: up to {max_retries} retries per model call, one rung each: "
             + " -> ".join(f"{i + 1}. {r}" for i, r in enumerate(rungs)) + "."]
    if device is not None and torch.device(device).type == "cpu":
        lines.append("Device: CPU, where the memory rungs have nothing to free (retries and splitting still run).")
    lines.append("VAE: guarded (a full decode is retried before ComfyUI's tiled fallback)." if vae_guarded
                 else "VAE: not guarded (ComfyUI's VAEDecode falls back to tiled decoding on OOM).")
    # The report is made when the node runs, before any sampling: recoveries happen later, so they are
    # logged and shown on this node as they happen rather than counted here (the count would always be 0).
    lines.append("Recoveries during sampling are logged and shown on this node as they happen.")
    return "\n".join(lines)


def show_on_node(node_id: str | None, text: str) -> None:
    """Show text on the guard node in ComfyUI's front end, where the host can."""
    if not node_id or "server" not in sys.modules:
        return
    instance = getattr(getattr(sys.modules["server"], "PromptServer", None), "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is not None:
        send(text, node_id)
