"""A resident DiT's calls replayed as CUDA graphs (opt-in: NEWBIE_CUDA_GRAPHS=1).

Why it exists: a profile of one resident step (H200, bf16, compiled blocks; run31/32 in bench/results/NOTES.md)
showed the CPU issuing kernels at about the pace the GPU ran them, roughly 0.9 ms of Inductor's Python launcher
per compiled block, and the GPU idle in some 57 small gaps a step. A CUDA graph issues a whole DiT call in one
launch. Upstream's way to graphs is Inductor's `reduce-overhead` mode, which records compiled regions one by one
and copies their inputs at each region; here the whole DiT call is one graph.

What it measured (H200, medians of 3 warm images, each pair in one call; bench/results/run36-38):
- bf16 compiled: 3.65 s a warm image with graphs against 3.68 s without (46 of a run's 50 calls replayed);
  eager bf16: 4.39 s with graphs against 4.40 s without them under ComfyUI's default allocator; fp8 compiled:
  3.44 s against 3.24 s (the two recordings of a run cost more than the replays saved). The GPU, not the launches, bounds a step there: the graphs are bit-identical
  (bench/results/run35-sampling_accuracy.json) and no faster. So they are off unless switched on, for GPUs
  paired with a slow CPU, where launches may bound a step (unmeasured).
- Kept from one sampling run to the next, so that a warm run replays all 50 calls (H100, medians of 5 and 3 warm
  images): fp8 with flash-attn-4 2.68 s against 2.74 s, its sampling 2.30 against 2.42 s (run90); bf16 with cuDNN
  3.48 against 3.50 s (run92). Still off by default: a few percent for fp8, and a server started differently.
- They need PyTorch's own CUDA allocator (ComfyUI's --disable-cuda-malloc; `native_allocator`).

How a call becomes a graph (a DIFFUSION_MODEL wrapper; `CallGraphs` holds one run's graphs):
- A call's signature is everything about its arguments except the values in its GPU tensors: the shapes, dtypes
  and strides of those, and every other argument by value (ints, the caption padding, the cond/uncond order, the
  functions in transformer_options by identity). Each signature runs eagerly the first time (that compiles the
  blocks), on a side stream the second time (CUDA libraries initialise per stream), and is recorded right after
  it; from the third time on its graph is replayed. The GPU tensors of the call are copied into the graph's own
  input tensors first, and its outputs cloned after, so a caller never holds memory the next replay writes.
- A graph reads the weights at the addresses it was recorded with. Every call compares the addresses of the DiT's
  parameters and buffers with those of the recording; where one moved (a LoRA patched by replacing a parameter,
  an unload and reload) the run's graphs are dropped and recorded again. A weight changed in place needs
  nothing: a replay reads the memory as it is.
- Only what a graph can replay faithfully is recorded: a CUDA device, every weight on it, ComfyUI's non-dynamic
  patcher (dynamic VRAM may move or evict weights during a call), no `patches` or `patches_replace` of other
  nodes in the call's transformer_options (Python code that runs inside the DiT), no other node's DIFFUSION_MODEL
  wrapper inside this one, and the pack's fp16 path in its fast mode (its recomputations run eagerly). Anything
  else runs as before, and so does everything after a recording failed (logged once a run).
- All graphs share one memory pool: the activations of about one call stay reserved (about 0.1 GiB more peak in
  run36 and run38), and nothing is recorded unless ComfyUI reports 2 GiB free.
- The graphs are kept from one sampling run to the next, so that a warm run replays every call: re-recorded at
  each run, the two recordings cost what the replays saved (fp8 with flash-attn-4 on an H100: 2.446 s a run with
  graphs against 2.381 s without, 46 of 50 calls replayed, bench/results/run88). A call of the next run meets its
  recording through the same signature and weight addresses as any other; the sampling run's conditioning ids
  (transformer_options["uuids"], new in every run) are left out of the signature, as nothing inside the DiT reads
  them (ComfyUI's hooks and patches do, and graphs refuse calls that carry those). They are released when ComfyUI
  detaches the model (unloads it), when its weights move, or when a recording fails.
"""
from __future__ import annotations

import logging

import torch

from . import compat, env_switch

log = logging.getLogger(__name__)

WRAPPER_KEY = "newbie_cuda_graphs"
RUN_ATTR = "newbie_call_graphs"  # the running sampling run's CallGraphs, on the DiT module
STORE_ATTR = "newbie_kept_graphs"  # the same CallGraphs, kept on the DiT module between runs
# Distinct call signatures a run may record (a run whose calls keep changing shape stops recording beyond it), and
# the most recordings kept: a run that needs room drops the least recently used of those it has not met.
MAX_SIGNATURES = 8
# transformer_options entries a sampling run sets anew that nothing inside the DiT reads (see the module docstring).
_PER_RUN_OPTIONS = frozenset({"uuids"})
# Free memory ComfyUI must report before a recording: twice what a 1024x1024 CFG call needs beside its weights.
RECORD_ROOM = 2 * 1024 ** 3
# CPU tensors up to this many elements are part of a signature by value (a replay would not read them again).
_SMALL_HOST_TENSOR = 64
# DIFFUSION_MODEL wrappers that may run inside this one: the pack's own, which do no per-call Python work a graph
# would freeze (the prefetch declines without dynamic VRAM; the caption padding is read from the call's arguments).
_SAFE_INNER = frozenset({"newbie_block_prefetch"})


def enabled() -> bool:
    """Switched on by NEWBIE_CUDA_GRAPHS=1 (off by default: see the module docstring for what it measured)."""
    return env_switch.switch("NEWBIE_CUDA_GRAPHS", False)


class Unsupported(Exception):
    """An argument a graph cannot take (the call then runs eagerly)."""


def flatten(obj, tensors: list, device_type: str = "cuda") -> object:
    """The signature of `obj` (hashable), appending its tensors on the graph's device to `tensors` in a fixed
    order (`rebuild` puts them back in the same order). Small tensors elsewhere count by value."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != device_type:
            if obj.device.type != "cpu" or obj.numel() > _SMALL_HOST_TENSOR:
                raise Unsupported(f"a {obj.device.type} tensor of {obj.numel()} elements")
            return ("host", tuple(obj.shape), obj.dtype, tuple(obj.flatten().tolist()))
        tensors.append(obj)
        return ("T", tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return ("dict",) + tuple((k, flatten(v, tensors, device_type)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return (type(obj),) + tuple(flatten(v, tensors, device_type) for v in obj)
    try:
        hash(obj)
    except TypeError:
        raise Unsupported(f"an argument of type {type(obj).__name__}") from None
    return obj  # held by the signature, so an identity-compared object cannot be replaced by another at its address


def _has_tensor(obj, device_type: str | None) -> bool:
    """Whether `obj` holds a tensor on `device_type` (on any device for None)."""
    if isinstance(obj, torch.Tensor):
        return device_type is None or obj.device.type == device_type
    if isinstance(obj, dict):
        return any(_has_tensor(v, device_type) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v, device_type) for v in obj)
    return False


def rebuild(obj, tensors, device_type: str = "cuda") -> object:
    """`obj` with its tensors on the graph's device replaced, in `flatten`'s order, by those of the iterator
    `tensors`; containers without one are passed as they are (a tuple subclass keeps its type)."""
    if isinstance(obj, torch.Tensor):
        return next(tensors) if obj.device.type == device_type else obj
    if isinstance(obj, dict):
        return {k: rebuild(v, tensors, device_type) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and _has_tensor(obj, device_type):
        items = [rebuild(v, tensors, device_type) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _leaf_tensors(t: torch.Tensor):
    """A weight and, for a tensor subclass (ComfyUI's QuantizedTensor), the plain tensors inside it."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(t, name))
    else:
        yield t


def weight_addresses(module: torch.nn.Module, device_type: str = "cuda") -> tuple | None:
    """The addresses of a module's parameters and buffers, in a fixed order; None where one is not on the graph's
    device (a weight a graph cannot hold)."""
    out = []
    for t in (*module.parameters(), *module.buffers()):
        for leaf in _leaf_tensors(t):
            if leaf.device.type != device_type:
                return None
            out.append(leaf.data_ptr())
    return tuple(out)


class CudaBackend:
    """Records and replays on the current CUDA device; one side stream and one memory pool per run."""

    device_type = "cuda"

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        for t in _output_tensors(out):
            t.record_stream(current)
        return out

    def record(self, fn):
        """(graph, outputs): `fn` recorded, not run."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), _no_compiling():
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph, out

    @staticmethod
    def replay(graph):
        graph.replay()


def _no_compiling():
    """Dynamo runs a region eagerly instead of compiling it while a call is recorded. Compiling launches work
    that a recording stream refuses (Inductor evaluates constants such as the fp8 layers' unit input scale): every
    recording of the fp8 blocks failed that way in run37. With this stance run38 recorded and replayed them."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("eager_on_recompile") if set_stance is not None else contextlib.nullcontext()


def _output_tensors(out) -> list:
    found = []
    flatten(out, found)
    return found


def room_to_record(device) -> bool:
    import comfy.model_management as mm

    return mm.get_free_memory(device) >= RECORD_ROOM


class _Recording:
    __slots__ = ("calls", "graph", "inputs", "args", "kwargs", "outputs", "out_structure")

    def __init__(self):
        self.calls = 0
        self.graph = None


class CallGraphs:
    """One DiT's graphs, kept from run to run: `call` runs a DiT call (an executor and its arguments) eagerly, on
    the side stream, recorded, or replayed, as above; `begin_run` starts a sampling run's counts. `why_eager` says
    why the last call ran eagerly, if it did."""

    def __init__(self, backend, room=room_to_record):
        self.backend = backend
        self.room = room
        self.recordings: dict = {}
        self.addresses = None
        self.failed: str | None = None
        self.replays = 0
        self.why_eager: str | None = None
        self.seen: set = set()  # the signatures this run has met

    def release(self):
        self.recordings.clear()
        self.addresses = None

    def begin_run(self):
        """A new sampling run: its counts start at zero, and a recording that failed in an earlier run may be tried
        again (the failure released every recording)."""
        self.failed = None
        self.replays = 0
        self.why_eager = None
        self.seen = set()

    def call(self, executor, args: tuple, kwargs: dict):
        why = self.refusal(executor, kwargs)
        if why is None:
            try:
                tensors: list = []
                signature = flatten((args, _without_per_run_options(kwargs)), tensors, self.backend.device_type)
            except Unsupported as e:
                why = f"{e} in the call's arguments"
        self.why_eager = why
        if why is not None:
            return executor(*args, **kwargs)
        addresses = weight_addresses(executor.class_obj, self.backend.device_type)
        if addresses is None:
            self.why_eager = "a weight is not on the GPU"
            return executor(*args, **kwargs)
        if addresses != self.addresses:
            self.release()
            self.addresses = addresses
        rec = self.recordings.get(signature)
        if signature not in self.seen:
            if len(self.seen) >= MAX_SIGNATURES:
                self.why_eager = f"more than {MAX_SIGNATURES} distinct calls in one run"
                return executor(*args, **kwargs)
            self.seen.add(signature)
        if rec is None:
            excess = len(self.recordings) + 1 - MAX_SIGNATURES
            if excess > 0:
                stale = [sig for sig in self.recordings if sig not in self.seen]  # least recently used first
                for sig in stale[:excess]:
                    del self.recordings[sig]
            rec = self.recordings[signature] = _Recording()
        else:
            self.recordings[signature] = self.recordings.pop(signature)  # the most recently used last
        rec.calls += 1
        if rec.graph is not None:
            for static, t in zip(rec.inputs, tensors):
                static.copy_(t)
            self.backend.replay(rec.graph)
            self.replays += 1
            return rebuild(rec.out_structure, iter([t.clone() for t in rec.outputs]), self.backend.device_type)
        if rec.calls == 1:
            self.why_eager = "first call of its kind (compiles)"
            return executor(*args, **kwargs)
        out = self.backend.warmup(lambda: executor(*args, **kwargs))
        self._record(executor, rec, args, kwargs, tensors)
        return out

    def _record(self, executor, rec: _Recording, args, kwargs, tensors):
        device = tensors[0].device if tensors else None
        if device is None or not self.room(device):
            self.why_eager = "not enough free memory to record"
            return
        rec.inputs = [t.clone() for t in tensors]
        rec.args, rec.kwargs = rebuild((args, kwargs), iter(rec.inputs), self.backend.device_type)
        try:
            rec.graph, out = self.backend.record(lambda: executor(*rec.args, **rec.kwargs))
        except Exception as e:  # noqa: BLE001 - whatever stops a recording, the run goes on eagerly
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("NewBie CUDA graphs: recording a DiT call failed, this run continues without graphs (%s)",
                        self.failed)
            self.release()
            return
        rec.outputs = []
        rec.out_structure = out
        flatten(out, rec.outputs, self.backend.device_type)

    def refusal(self, executor, kwargs: dict) -> str | None:
        """Why this call cannot be a graph, or None."""
        if self.failed:
            return "a recording failed earlier in this run"
        why = foreign_code(executor, kwargs.get("transformer_options") or {}, _SAFE_INNER)
        if why is not None:
            return why
        fp16 = getattr(executor.class_obj, "newbie_fp16_state", None)
        if fp16 is not None and fp16.mode != "fast":
            return f"the fp16 path recomputes in its {fp16.mode} form"
        return None


def foreign_code(executor, topts: dict, safe_inner: frozenset) -> str | None:
    """Why other nodes' Python may run inside this DiT call, or None: their `patches` or `patches_replace` in its
    transformer_options, or a DIFFUSION_MODEL wrapper inside the one whose `executor` this is, other than those
    keyed in `safe_inner`."""
    for name in ("patches", "patches_replace"):
        if topts.get(name):
            return f"transformer_options[{name!r}] holds other nodes' patches"
    inner = getattr(executor, "wrappers", ())[getattr(executor, "idx", 0) + 1:]
    known = {id(fn) for group in (topts.get("wrappers") or {}).values()
             for key, fns in group.items() if key in safe_inner for fn in fns}
    if any(id(fn) not in known for fn in inner):
        return "another node's DIFFUSION_MODEL wrapper runs inside this one"
    return None


def _without_per_run_options(kwargs: dict) -> dict:
    """The call's keyword arguments as its signature sees them: transformer_options without the entries a sampling
    run sets anew and the DiT does not read, where they hold no tensor."""
    topts = kwargs.get("transformer_options")
    if not isinstance(topts, dict) or not _PER_RUN_OPTIONS & topts.keys():
        return kwargs
    kept = {k: v for k, v in topts.items() if k not in _PER_RUN_OPTIONS or _has_tensor(v, None)}
    return {**kwargs, "transformer_options": kept}


def _graphed_call(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the call through the running sampling run's graphs, where there are any."""
    run = getattr(executor.class_obj, RUN_ATTR, None)
    if run is None:
        return executor(*args, **kwargs)
    return run.call(executor, args, kwargs)


def native_allocator() -> bool:
    """Whether PyTorch's own caching allocator serves CUDA memory in this process. ComfyUI starts PyTorch with
    cudaMallocAsync unless it runs with --disable-cuda-malloc; under that allocator recording the compiled blocks
    failed (`CUDA driver error: invalid argument` from their Triton kernels, H200, torch 2.11), and freeing what the
    failed recording had allocated then aborted the server (bench/results/NOTES.md). So graphs need the native one."""
    return torch.cuda.get_allocator_backend() == "native"


def backend_for(device):
    """The recording backend for a model on `device`, or None where graphs cannot run there."""
    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available() or not native_allocator():
        return None
    return CudaBackend()


def graphable(patcher) -> bool:
    """Whether the patcher's DiT can be recorded at all: switched on, and held by a non-dynamic patcher."""
    return enabled() and not compat.is_dynamic(patcher)


def describe(patcher) -> str:
    """The loader report's line."""
    if not enabled():
        return "CUDA graphs: off (NEWBIE_CUDA_GRAPHS=1 in ComfyUI's environment turns them on)"
    if getattr(patcher.load_device, "type", None) != "cuda":
        return "CUDA graphs: off (not a CUDA device)"
    if not graphable(patcher):
        return "CUDA graphs: off (dynamic VRAM fetches the weights during each call)"
    if torch.cuda.is_available() and not native_allocator():
        return ("CUDA graphs: off (they need PyTorch's own CUDA allocator: start ComfyUI with --disable-cuda-malloc "
                "to replay the DiT's calls as graphs)")
    return ("CUDA graphs: the DiT's calls replayed as CUDA graphs from the third of a kind on, and kept for later "
            "sampling runs while its weights stay where they are on the GPU")


def _sampling_run(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a sampling run through the DiT's graphs, those kept from earlier runs or new ones."""
    patcher = executor.class_obj.model_patcher
    dm = patcher.model.diffusion_model
    if not graphable(patcher) or getattr(dm, RUN_ATTR, None) is not None:
        return executor(*args, **kwargs)
    run = getattr(dm, STORE_ATTR, None)
    if run is None:
        backend = backend_for(patcher.load_device)
        if backend is None:
            return executor(*args, **kwargs)
        run = CallGraphs(backend)
        setattr(dm, STORE_ATTR, run)
    run.begin_run()
    setattr(dm, RUN_ATTR, run)
    try:
        return executor(*args, **kwargs)
    finally:
        delattr(dm, RUN_ATTR)
        log.info("NewBie CUDA graphs: %d DiT calls replayed in this run (%d kept)%s", run.replays,
                 sum(rec.graph is not None for rec in run.recordings.values()),
                 f" (recording failed: {run.failed})" if run.failed else "")


def release(patcher, unpatch_all: bool = True) -> None:
    """Drop the DiT's kept graphs and their memory: ComfyUI's ON_DETACH callback, where it unloads the model. A
    detach that leaves the weights where they are (`unpatch_all` False: ComfyUI loading another patcher of the same
    model, as each sampling run's clone does) keeps them."""
    if not unpatch_all:
        return
    dm = patcher.model.diffusion_model
    run = getattr(dm, STORE_ATTR, None)
    if run is not None:
        run.release()
        delattr(dm, STORE_ATTR)


def attach(patcher) -> None:
    """Replay the DiT's calls as CUDA graphs in each sampling run where it can (replaces an earlier attach).
    Attach it after the pack's other DIFFUSION_MODEL wrappers: it must be the innermost one."""
    import comfy.patcher_extension as pe

    patcher.model.diffusion_model.newbie_fp16_state = getattr(patcher.model, "newbie_fp16", None)
    for kind, fn in ((pe.WrappersMP.OUTER_SAMPLE, _sampling_run), (pe.WrappersMP.DIFFUSION_MODEL, _graphed_call)):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    patcher.remove_callbacks_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY)
    patcher.add_callback_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY, release)
