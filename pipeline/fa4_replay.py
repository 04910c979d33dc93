"""flash-attn-4's kernel launched again without the Python that finds it, for calls of a shape met before.

flash-attn-4 (pipeline/flash_attn4.py) is pure Python up to its compiled kernel: each call of `flash_attn_func`
goes through an autograd Function and about a thousand lines of `_flash_attn_fwd` that check the inputs, derive
the kernel's configuration, build its compile key (a tuple of some sixty fields), look the kernel up and launch
it. On an H100 that took 184 µs of CPU a call (run101's profile, "FlashAttnFunc"), 80 calls and about 15 ms of CPU
a sampling step, in a step whose pace the CPU sets (fp8 with flash-attn-4, run101-103).

For NewBie's dense, unmasked, inference-only attention everything that Python derives is a function of the
inputs' shapes, strides, dtype, alignment and device. So, once a call of a given signature has run the ordinary
way (the first call, which may compile the kernel), the second one is *watched*: a profile hook of this thread
(`sys.setprofile`, restored at once) sees `_flash_attn_fwd` return and reads two of its locals, the compile key
and the launch's arguments. The launch is kept when it is plain: its tensor arguments are exactly the call's
q, k, v and output (same memory, shape and strides), and its other arguments hold no tensor (None, numbers, the
empty tuples and named tuples of an unmasked call). It is then replayed once on the same inputs and kept only if
its output is bit-identical to the ordinary call's. Later calls of that signature allocate the output and call
the compiled kernel directly; the stream is the current one, as flash-attn-4 compiles its kernels to take it.

Nothing of flash-attn-4 is changed or patched: the hook reads and returns. A version whose locals are named
otherwise, a launch with another tensor (a workspace, a scheduler's metadata, a copy made to fix a layout), a
replay that differs or raises: each leaves that signature on the ordinary path, said once in the log at debug
level. Nothing is watched while a CUDA graph is being captured or while another profile hook is set (a debugger,
a profiler). `NEWBIE_FA4_REPLAY=0` turns it off.

Measured on an H100, in-process (bench/results run104-106; tests/unit/test_grouped_attention_gpu.py checks the
real flash-attn-4's launches kept and bit-identical): NewBie's 5 signatures were all kept; under the profiler the
attention op took 100-168 µs a call against 317-444 µs; a compiled fp8 sampling run took 2.404 against 2.659 s
(run105), and with pipeline/guard_skip.py 2.261 against 2.512 s with neither (run106, -10 %).
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, NamedTuple

import torch

from . import env_switch

log = logging.getLogger(__name__)

SWITCH = "NEWBIE_FA4_REPLAY"
WATCH_AT = 2  # the call of a signature that is watched: the first may compile the kernel, which a hook would slow
# signatures a process keeps apart (one per caption length and batch: a few per prompt); past it, new ones take the
# ordinary path, so that no stream of prompts grows these tables without bound
MAX_SIGNATURES = 256
_LEAVES = (type(None), bool, int, float, str, torch.dtype)


def enabled() -> bool:
    return env_switch.switch(SWITCH, True)


class Slot(NamedTuple):
    """Where a launch argument is one of the call's tensors: 0 q, 1 k, 2 v, 3 the output."""
    index: int


class Launch(NamedTuple):
    """A compiled kernel and its arguments, the call's tensors replaced by slots."""
    kernel: Callable
    args: tuple


def signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What decides flash-attn-4's kernel and launch for an unmasked call: each tensor's shape, strides, dtype,
    device, and whether its address has the 16-byte alignment that flash-attn-4 compiles its kernels to assume."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0) for t in (q, k, v))


def holds_no_tensor(value: Any, depth: int = 0) -> bool:
    """Whether a launch argument is made only of plain values: None, numbers, strings, dtypes, and tuples, lists
    or named tuples of them (flash-attn-4's AuxData and block-sparse tuples of an unmasked call)."""
    if isinstance(value, _LEAVES):
        return True
    if depth < 4 and isinstance(value, (tuple, list)):
        return all(holds_no_tensor(item, depth + 1) for item in value)
    return False


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def plan(kernel: Callable, call_args, tensors: tuple[torch.Tensor, ...]) -> Launch | None:
    """The launch to keep, or None: every tensor argument is one of `tensors` (q, k, v, output) and every other
    argument holds no tensor."""
    args = []
    for arg in call_args:
        if isinstance(arg, torch.Tensor):
            found = [i for i, t in enumerate(tensors) if _same_memory(arg, t)]
            if not found:
                return None
            args.append(Slot(found[0]))
        elif holds_no_tensor(arg):
            args.append(arg)
        else:
            return None
    if sorted(a.index for a in args if isinstance(a, Slot)) != list(range(len(tensors))):
        return None  # each of q, k, v and the output exactly once
    return Launch(kernel, tuple(args))


def launch(recorded: Launch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Allocate the output and call the kernel with this call's tensors."""
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    tensors = (q, k, v, out)
    recorded.kernel(*(tensors[a.index] if isinstance(a, Slot) else a for a in recorded.args))
    return out


class Watch:
    """A profile hook of this thread for one call: the locals of the first frame of `code` that returns."""

    def __init__(self, code):
        self.code = code
        self.locals: dict | None = None

    def __call__(self, frame, event, arg):
        if event == "return" and self.locals is None and frame.f_code is self.code:
            self.locals = dict(frame.f_locals)

    def run(self, fn: Callable, *args):
        sys.setprofile(self)
        try:
            return fn(*args)
        finally:
            sys.setprofile(None)


class Replays:
    """The launches of one process, by signature. `call(attention, q, k, v)` returns the output, from a replay
    where one is kept (and NEWBIE_FA4_REPLAY is not 0), else from `attention` (flash-attn-4's `flash_attn_func`, watched on the WATCH_AT-th call of
    a signature)."""

    def __init__(self, forward: Callable | None):
        self.forward = forward  # flash-attn-4's `_flash_attn_fwd`, whose locals are read
        self.code = getattr(forward, "__code__", None)
        self.launches: dict[tuple, Launch | None] = {}
        self.seen: dict[tuple, int] = {}
        self.lock = threading.Lock()

    def call(self, attention: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not enabled() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return _first(attention(q, k, v))  # a launch kept for inference saves nothing for a backward pass
        key = signature(q, k, v)
        recorded = self.launches.get(key)
        if recorded is not None:
            return launch(recorded, q, k, v)
        if key in self.launches or not self._watchable(key, q):
            return _first(attention(q, k, v))
        return self._watch(key, attention, q, k, v)

    def _watchable(self, key: tuple, q: torch.Tensor) -> bool:
        if self.code is None or sys.getprofile() is not None:
            return False
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        with self.lock:
            if key not in self.seen and len(self.seen) >= MAX_SIGNATURES:
                return False
            self.seen[key] = self.seen.get(key, 0) + 1
            return self.seen[key] >= WATCH_AT

    def _watch(self, key: tuple, attention: Callable, q, k, v) -> torch.Tensor:
        watch = Watch(self.code)
        out = _first(watch.run(attention, q, k, v))
        recorded, why = self._keep(watch.locals, q, k, v, out)
        self.launches[key] = recorded
        if recorded is None:
            log.debug("flash-attn-4 calls of shape %s keep flash-attn-4's own launch: %s", tuple(q.shape), why)
        return out

    def _keep(self, found: dict | None, q, k, v, out) -> tuple[Launch | None, str]:
        if not found or "compile_key" not in found or not isinstance(found.get("call_args"), (list, tuple)):
            return None, "this flash-attn-4 names its launch otherwise"
        try:
            kernel = self.forward.compile_cache[found["compile_key"]]
        except Exception as e:  # noqa: BLE001 - another cache layout: keep the ordinary path
            return None, f"its kernel cache did not answer ({type(e).__name__})"
        recorded = plan(kernel, found["call_args"], (q, k, v, out))
        if recorded is None:
            return None, "its launch takes other tensors or objects"
        try:
            again = launch(recorded, q, k, v)
            same = torch.equal(again, out)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a replay that fails is not kept
            return None, f"the replay failed ({type(e).__name__}: {e})"
        return (recorded, "") if same else (None, "the replay's output differs")


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # flash_attn_func returns (out, lse)


def for_flash_attn4() -> Replays:
    """The process's replays of flash-attn-4's forward (watching nothing where its `_flash_attn_fwd` is not found)."""
    try:
        from flash_attn.cute import interface
        forward = getattr(interface, "_flash_attn_fwd", None)
    except Exception:  # noqa: BLE001 - flash_attn4.kernel() has already said why it does not load
        forward = None
    return Replays(forward if hasattr(forward, "compile_cache") else None)
