"""The block streamer of a DiT loaded in part (pipeline/block_stream.py). On the CPU the tiny DiT is loaded in part by
ComfyUI's own non-dynamic load (the layers it leaves out get `comfy_cast_weights`, as on a GPU), and the streamer
runs with copies made at once (InlineCopier) and "on the host" meaning the CPU tensors of those layers: the plan,
the pointing of each block's parameters at a buffer while it runs and back after, a failing call, the plan's cache
and the room a partial load leaves. The CUDA test runs devkit/stream_check.py (side stream, events, pinned host
memory, bit-identical to ComfyUI's casts and to the resident model)."""
from __future__ import annotations

import pytest
import torch

from devkit import cfg_batch_errors, dit_calls
from pipeline import block_stream

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu")]
COMFY_PINS = block_stream.comfy_pins


@pytest.fixture(autouse=True)
def pinned_as_on_a_gpu_host(monkeypatch):
    """ComfyUI pins the layers a partial load leaves out on a GPU host; the CPU host runs with pinned memory off,
    so its partial loads are read here as a GPU host's would be (their host layers count as pinned, `_on_host`)."""
    monkeypatch.setattr(block_stream, "comfy_pins", lambda: True)

CPU = torch.device("cpu")


def _on_host(t) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu"


def _partly_loaded(tiny_dit, share=0.5):
    """The tiny DiT in the pack's non-dynamic patcher, loaded by ComfyUI with `share` of its size as the room."""
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    patcher.load(CPU, lowvram_model_memory=int(patcher.model_size() * share))
    return patcher, cfg


def _streaming(patcher, on_host=_on_host):
    """The streamer as a DIFFUSION_MODEL wrapper of the patcher, with inline copies (the pack's own one passes
    through off a GPU)."""
    import comfy.patcher_extension as pe

    from pipeline import block_stream

    def wrapper(executor, x, *args, **kwargs):
        return block_stream.run_streamed(executor, x, args, kwargs, copier_for=lambda d: block_stream.InlineCopier(),
                                         streamed=on_host)

    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_stream", wrapper)


def test_a_partial_load_leaves_cast_layers_the_plan_finds_in_running_order(tiny_dit):
    from pipeline import block_stream

    patcher, _ = _partly_loaded(tiny_dit)
    dm = patcher.model.diffusion_model
    blocks = block_stream.plan(block_stream.blocks_in_order(dm), _on_host)
    assert blocks, "ComfyUI's partial load left layers of some blocks to cast"
    order = [id(b) for b in block_stream.blocks_in_order(dm)]
    assert [order.index(id(b.block)) for b in blocks] == sorted(order.index(id(b.block)) for b in blocks)
    for b in blocks:
        offsets = [off for _, _, off in b.params]
        assert all(off % block_stream.ALIGN == 0 for off in offsets) and offsets == sorted(set(offsets))
        assert b.nbytes >= offsets[-1] + b.params[-1][1].numel() * b.params[-1][1].element_size()
        for p, host, _ in b.params:
            assert block_stream._holds(p, host)
    planned = {id(p) for b in blocks for p, _, _ in b.params}
    for block in block_stream.blocks_in_order(dm):
        for m in block.modules():
            for p in m.parameters(recurse=False):
                assert (id(p) in planned) == bool(getattr(m, "comfy_cast_weights", False)), \
                    "every parameter of a cast layer, and nothing else, is planned"


def test_a_layer_streams_whole_or_is_left_to_comfyui(tiny_dit):
    """A cast layer with one parameter the streamer must not move (here: any 1-d one, a bias or a norm's weight, as
    for a quantized weight) is left whole to ComfyUI's cast."""
    from pipeline import block_stream

    patcher, _ = _partly_loaded(tiny_dit)
    blocks = block_stream.blocks_in_order(patcher.model.diffusion_model)
    plan = block_stream.plan(blocks, lambda t: _on_host(t) and t.dim() > 1)
    planned = {id(p) for b in plan for p, _, _ in b.params}
    cast = [m for b in blocks for m in b.modules() if getattr(m, "comfy_cast_weights", False)]
    with_bias = [m for m in cast if getattr(m, "bias", None) is not None]
    matrices = [m for m in cast if list(m.parameters(recurse=False))
                and all(p.dim() > 1 for p in m.parameters(recurse=False))]
    assert with_bias and matrices, "the tiny DiT's cast layers include both kinds"
    assert not any(id(p) in planned for m in with_bias for p in m.parameters(recurse=False))
    assert all(id(p) in planned for m in matrices for p in m.parameters(recurse=False))


def test_a_streamed_call_gives_the_same_output_with_each_block_on_its_buffer_and_everything_back_after(tiny_dit):
    from pipeline import block_stream

    patcher, cfg = _partly_loaded(tiny_dit)
    reference = dit_calls.dit_call(patcher, cfg)
    dm = patcher.model.diffusion_model
    blocks = block_stream.plan(block_stream.blocks_in_order(dm), _on_host)
    hosts = {id(p): host for b in blocks for p, host, _ in b.params}
    seen = []

    def probe(module, _args, _out):  # runs before the streamer's own forward hook (registered first)
        b = next(b for b in blocks if b.block is module)
        seen.append(all(not block_stream._holds(p, host) for p, host, _ in b.params))

    probes = [b.block.register_forward_hook(probe) for b in blocks]
    _streaming(patcher)
    try:
        out = dit_calls.dit_call(patcher, cfg)
    finally:
        for h in probes:
            h.remove()
    assert len(seen) == len(blocks) and all(seen), "every streamed block ran on its buffer's copy of its weights"
    assert torch.equal(out, reference), "streaming changes no number"
    assert all(block_stream._holds(p, hosts[id(p)]) for b in blocks for p, _, _ in b.params), \
        "every parameter is back on the host"
    assert all(not b.block._forward_pre_hooks and not b.block._forward_hooks for b in blocks), "no hook stays"


def test_a_failing_call_puts_every_parameter_back(tiny_dit):
    from pipeline import block_stream

    patcher, cfg = _partly_loaded(tiny_dit)
    blocks = block_stream.plan(block_stream.blocks_in_order(patcher.model.diffusion_model), _on_host)
    assert len(blocks) >= 2
    hosts = [(p, host) for b in blocks for p, host, _ in b.params]

    def fail(_m, _a, _o):
        raise RuntimeError("out of memory (a test)")

    h = blocks[1].block.register_forward_hook(fail)  # while the block's parameters point at the buffer
    _streaming(patcher)
    try:
        with pytest.raises(RuntimeError, match="a test"):
            dit_calls.dit_call(patcher, cfg)
    finally:
        h.remove()
    assert all(block_stream._holds(p, host) for p, host in hosts)
    assert all(not b.block._forward_pre_hooks for b in blocks)


def test_the_plan_is_kept_until_the_weights_move(tiny_dit):
    from pipeline import block_stream

    patcher, _ = _partly_loaded(tiny_dit)
    dm = patcher.model.diffusion_model
    generation = getattr(dm, block_stream.GENERATION_ATTR)
    first = block_stream.planned(dm, _on_host)
    assert block_stream.planned(dm, _on_host) is first, "unchanged weights: the same plan"
    p, host, _ = first[0].params[0]
    p.data = host.clone()  # a weight replaced behind the plan
    second = block_stream.planned(dm, _on_host)
    assert second is not first and block_stream._holds(p, second[0].params[0][1])
    patcher.partially_unload(CPU, memory_to_free=1)
    assert getattr(dm, block_stream.GENERATION_ATTR) > generation, "an unload marks the weights moved"
    assert block_stream.planned(dm, _on_host) is not second


def test_only_plain_pinned_host_tensors_stream():
    from pipeline import block_stream

    assert not block_stream.host_pinned(torch.zeros(4)), "an unpinned host tensor is left to ComfyUI's cast"
    assert not block_stream.host_pinned(torch.nn.Parameter(torch.zeros(4))), "only plain tensors"

    class Quantized(torch.Tensor):
        pass

    assert not block_stream.host_pinned(torch.zeros(4).as_subclass(Quantized))


class _Model:
    def __init__(self, dm, loaded):
        self.diffusion_model, self.model_loaded_weight_memory = dm, loaded


class _Recorder:
    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        self.seen = lowvram_model_memory




@pytest.mark.parametrize("offered, loaded, full, expected", [
    ("half", 0, False, "half - room"),  # a first partial load leaves the buffers' room
    ("half", "half - 1", False, "half - 1"),  # never below what is loaded now (ComfyUI's partially_load)
    ("all", 0, False, "all"),  # the whole model fits: nothing streams, no room taken
    ("half", 0, True, "half"),  # a full load streams nothing either
])
def test_a_partial_load_leaves_room_for_two_blocks(tiny_dit, monkeypatch, offered, loaded, full, expected):
    from pipeline import block_stream

    patcher, _ = cfg_batch_errors.model(tiny_dit)
    dm = patcher.model.diffusion_model
    size = patcher.model_size()
    room = block_stream.SLOTS * block_stream.block_bytes(dm)
    assert 0 < room < size // 2
    values = {"half": size // 2, "all": size * 2, "half - room": size // 2 - room, "half - 1": size // 2 - 1, 0: 0}

    class Spy(block_stream.StreamRoom, _Recorder):
        def model_size(self):
            return size

    spy = Spy()
    spy.model = _Model(dm, values[loaded])
    monkeypatch.setattr(block_stream, "attached", lambda p: True)
    spy.load(CPU, values[offered], False, full)
    assert spy.seen == values[expected]
    monkeypatch.setattr(block_stream, "comfy_pins", lambda: False)
    spy.load(CPU, values[offered], False, full)
    assert spy.seen == values[offered], "ComfyUI pins nothing: nothing streams, nothing is held back"
    monkeypatch.setattr(block_stream, "comfy_pins", lambda: True)
    monkeypatch.setattr(block_stream, "attached", lambda p: False)
    spy.load(CPU, values[offered], False, full)
    assert spy.seen == values[offered], "without the streamer nothing is held back"


def test_comfyui_loads_less_by_the_room_when_the_streamer_is_attached(tiny_dit, monkeypatch):
    from pipeline import block_stream

    loaded = {}
    for streaming in (True, False):
        patcher, _ = cfg_batch_errors.model(tiny_dit)
        assert block_stream.attached(patcher), "the loader attaches the streamer to its non-dynamic patcher"
        if not streaming:
            block_stream.detach(patcher)
        offered = int(patcher.model_size() * 0.9)
        room = block_stream.SLOTS * block_stream.block_bytes(patcher.model.diffusion_model)
        patcher.load(CPU, lowvram_model_memory=offered)
        loaded[streaming] = patcher.model.model_loaded_weight_memory
    assert 0 < loaded[True] <= offered - room < loaded[False] <= offered


def test_switched_off_by_the_environment_and_removed_by_a_compile(tiny_dit, monkeypatch):
    from pipeline import block_compile, block_stream

    monkeypatch.setenv("NEWBIE_BLOCK_STREAM", "0")
    patcher, _ = cfg_batch_errors.model(tiny_dit)
    assert not block_stream.attached(patcher) and not block_stream.attach(patcher)
    monkeypatch.delenv("NEWBIE_BLOCK_STREAM")
    assert block_stream.attach(patcher) and block_stream.attached(patcher)
    block_compile.apply(patcher)
    assert not block_stream.attached(patcher), "compiled blocks take their weights where ComfyUI's cast puts them"


def test_the_pack_wrapper_passes_through_off_a_gpu(tiny_dit):
    patcher, cfg = _partly_loaded(tiny_dit)
    from pipeline import block_stream

    assert block_stream.attached(patcher)
    reference = dit_calls.dit_call(patcher, cfg)
    dm = patcher.model.diffusion_model
    assert all(not b._forward_pre_hooks for b in block_stream.blocks_in_order(dm))
    assert torch.equal(reference, dit_calls.dit_call(patcher, cfg))


def test_the_loader_streams_a_16_bit_dit_that_does_not_fit_itself_and_says_so(tiny_dit, monkeypatch):
    from pipeline import block_stream, loader

    cuda = torch.device("cuda")
    monkeypatch.setattr(block_stream, "available", lambda device: device.type == "cuda")
    assert not loader.on_dynamic_vram("off", False, cuda, None), "16-bit, does not fit: the pack's patcher"
    assert loader.on_dynamic_vram("off", False, cuda, "fp8"), "a quantized DiT that does not fit: dynamic VRAM"
    assert loader.on_dynamic_vram("off", False, CPU, None), "off a GPU: as before"
    assert not loader.on_dynamic_vram("off", True, cuda, None), "resident: the pack's patcher"
    assert not loader.on_dynamic_vram("blocks", False, cuda, None), "compiled: the pack's patcher"
    monkeypatch.setenv("NEWBIE_BLOCK_STREAM", "0")
    assert loader.on_dynamic_vram("off", False, cuda, None), "switched off: dynamic VRAM, as before"
    monkeypatch.delenv("NEWBIE_BLOCK_STREAM")
    patcher, _ = cfg_batch_errors.model(tiny_dit)
    assert "a transformer block ahead" in loader._streaming(patcher)
    monkeypatch.setattr(block_stream, "comfy_pins", lambda: False)
    assert "ComfyUI decides what stays on the GPU" in loader._streaming(patcher), "nothing pinned: nothing ahead"
    monkeypatch.setattr(block_stream, "comfy_pins", lambda: True)
    block_stream.detach(patcher)
    assert "ComfyUI decides what stays on the GPU" in loader._streaming(patcher)


def test_without_comfyuis_pinned_memory_a_dit_that_does_not_fit_stays_on_dynamic_vram(monkeypatch):
    """Only pinned host layers stream a block ahead; with ComfyUI's pinned memory off (--disable-pinned-memory) the
    streamer would take none, and its patcher would hold its buffers' room back for nothing."""
    import comfy.model_management as mm

    from pipeline import block_stream, loader

    cuda = torch.device("cuda")
    monkeypatch.setattr(block_stream, "comfy_pins", COMFY_PINS)  # ComfyUI's own setting, below
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 8 * 2**30)
    assert block_stream.available(cuda) and not loader.on_dynamic_vram("off", False, cuda, None)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1)  # ComfyUI's value with pinned memory off
    assert not block_stream.available(cuda)
    assert loader.on_dynamic_vram("off", False, cuda, None), "dynamic VRAM, as before the streamer"
    assert not block_stream.available(CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (devkit/stream_check.py on the device)")
def test_on_a_gpu_streaming_is_bit_identical_to_comfyui_casts_and_to_the_resident_model():
    from devkit import stream_check

    for precision in ("bf16", "fp16"):
        verdict = stream_check.compare(torch.device("cuda", torch.cuda.current_device()), precision)
        assert verdict["ok"], verdict
