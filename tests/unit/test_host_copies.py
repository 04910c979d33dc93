"""pipeline/host_copies.py through ComfyUI's own partially_unload, load_models_gpu and weight patches.

On the CPU a weight's move to the CPU copies nothing. `SimulatedDevice` makes ComfyUI's moves real copies, as on a
GPU: a load's `Tensor.to` gives a new tensor that counts as on the device, an unload's gives a new host tensor. The
tests check the bookkeeping: what a second unload hands back, what a patch or a replaced weight makes it forget.
On a GPU, devkit/eviction_cycles.py checks the outputs against ComfyUI's own patcher
(test_the_same_outputs_as_comfyuis_patcher_on_a_gpu; on the device machine `python3 -m devkit.eviction_cycles`)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.host

CPU = torch.device("cpu")


class SimulatedDevice(TorchFunctionMode):
    """Moves of parameters become copies: `to_device` inside a load, `to_host` inside an unload."""

    def __init__(self):
        super().__init__()
        self.direction = None
        self.on = {}  # address -> the tensor on the simulated device (kept alive: no address is reused)

    def on_device(self, t) -> bool:
        return t.data_ptr() in self.on

    @contextlib.contextmanager
    def moving(self, direction):
        self.direction = direction
        try:
            with self:
                yield
        finally:
            self.direction = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and isinstance(args[0], torch.nn.Parameter) and self.direction:
            t = args[0]
            if self.direction == "to_device" and not self.on_device(t):
                out = t.detach().clone()
                self.on[out.data_ptr()] = out
                return out
            if self.direction == "to_host" and self.on_device(t):
                return t.detach().clone()
            return t
        return func(*args, **kwargs)


@pytest.fixture
def resident(tiny_parts):
    """The tiny DiT in the pack's resident patcher on a simulated device; `cycle()` is one image's unload and
    load."""
    import comfy.model_management as mm

    from devkit import eviction_cycles
    from pipeline import host_copies, vram_budget

    device = SimulatedDevice()
    with device.moving("to_device"):
        patcher, _ = eviction_cycles.resident(tiny_parts, vram_budget.resident_patcher_class(), CPU, "fp32")
    copies = host_copies.of(patcher.model)
    copies.on_device = device.on_device
    assert all(device.on_device(w) for w in patcher.model.parameters())

    def unload(p=patcher):
        with device.moving("to_host"):
            return p.partially_unload(CPU, memory_to_free=p.model_size() // 3)

    def load(p=patcher):
        with device.moving("to_device"):
            mm.load_models_gpu([p], force_full_load=True)

    def cycle(p=patcher):
        freed = unload(p)
        load(p)
        return freed

    yield patcher, copies, unload, load, cycle
    mm.unload_all_models()


def test_a_second_unload_hands_back_what_the_first_one_copied(resident):
    patcher, copies, unload, load, cycle = resident
    freed = cycle()
    assert freed > 0 and copies.copied_bytes > 0 and copies.kept_bytes == 0
    first = copies.copied_bytes
    assert copies.copies and set(copies.links) == set(copies.copies), "the load linked every kept copy"
    cycle()
    assert copies.kept_bytes == first and copies.copied_bytes == first, "nothing copied again"
    cycle()
    assert copies.kept_bytes == 2 * first and copies.copied_bytes == first


def test_the_unloaded_weights_are_the_kept_copies_and_come_back_unchanged(resident):
    patcher, copies, unload, load, cycle = resident
    before = {k: w.detach().clone() for k, w in patcher.model.named_parameters()}
    cycle()
    unload()
    weights = dict(patcher.model.named_parameters())
    assert copies.kept_bytes > 0
    for key, copy in copies.copies.items():
        assert weights[key].data_ptr() == copy.data_ptr() and not copies.on_device(weights[key])
    load()
    for key, w in patcher.model.named_parameters():
        assert copies.on_device(w) and torch.equal(w, before[key]), key


def test_a_patched_weight_is_forgotten_and_copied_again(resident):
    from devkit import eviction_cycles

    patcher, copies, unload, load, cycle = resident
    cycle()
    clone, keys = eviction_cycles.a_patch(patcher)
    patched = [k for k in keys if k in copies.copies]
    assert patched, "the first unload kept some of the patched weights"
    load(clone)
    assert not set(patched) & set(copies.copies), "patching a weight forgets its copy"
    assert set(copies.copies) - set(keys), "the others are kept"


def test_a_weight_replaced_behind_the_patcher_loses_its_copy(resident):
    from pipeline import host_copies

    patcher, copies, unload, load, cycle = resident
    cycle()
    key = next(iter(copies.links))
    module_name, _, attr = key.rpartition(".")
    module = patcher.model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().clone(), requires_grad=False))
    host_copies.relink(patcher.model, host_copies.resting(patcher.model))
    assert key not in copies.copies, "a weight that is not its copy's any more is not linked to it"


def test_hook_patches_forget_the_weight(resident):
    patcher, copies, unload, load, cycle = resident
    cycle()
    key = next(iter(copies.copies))
    patcher.patch_hook_weight_to_device(None, {}, key, {}, None)  # no hook patches this key: nothing to apply
    assert key not in copies.copies and key not in copies.links


def test_switched_off_nothing_is_kept(resident, monkeypatch):
    monkeypatch.setenv("NEWBIE_HOST_COPIES", "0")
    patcher, copies, unload, load, cycle = resident
    cycle()
    cycle()
    assert not copies.copies and copies.kept_bytes == copies.copied_bytes == 0


def test_only_moves_to_the_host_are_served_from_copies():
    from pipeline import host_copies

    copies = host_copies.HostCopies()
    copies.on_device = lambda t: True
    t = torch.ones(4)
    calls = []

    def to(*args, **kwargs):
        calls.append(args[1:])
        return args[0].clone()

    copies.offload("w", t, to, (t, CPU), {}, keep_new=True)
    copies.links["w"] = t.data_ptr()
    assert copies.offload("w", t, to, (t, CPU), {}, keep_new=True) is copies.copies["w"]
    copies.offload("w", t, to, (t, torch.float16), {}, keep_new=True)  # a cast is a real conversion
    copies.offload("w", t, to, (t, "meta"), {}, keep_new=True)
    assert len(calls) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")
def test_the_same_outputs_as_comfyuis_patcher_on_a_gpu(comfy_import_path):
    from devkit import eviction_cycles

    verdict = eviction_cycles.compare(torch.device("cuda"))
    assert verdict["ok"], verdict


def test_a_failing_unload_leaves_no_interception_behind(tiny_parts):
    import comfy.model_patcher
    from torch.overrides import _get_current_function_mode_stack

    from pipeline import host_copies, loader, vram_budget

    class Failing(comfy.model_patcher.ModelPatcher):
        def partially_unload(self, *args, **kwargs):
            raise RuntimeError("an unload that fails midway")

    class Pack(vram_budget.HostCopyEviction, Failing):
        pass

    built, _, _, _ = loader.build_model(tiny_parts, "fp32", dynamic=False)
    patcher = Pack(built.model, load_device=CPU, offload_device=CPU)
    with pytest.raises(RuntimeError, match="midway"):
        patcher.partially_unload(CPU, memory_to_free=1)
    assert not any(isinstance(m, host_copies._Offloading) for m in _get_current_function_mode_stack())
    assert patcher.newbie_evicting is False


def test_pinned_copies_are_unpinned_when_the_model_goes(monkeypatch):
    import gc

    from pipeline import host_copies

    unpinned = []
    monkeypatch.setattr(host_copies, "_unpin", lambda t: unpinned.append(t.shape))
    model = torch.nn.Linear(4, 3)
    copies = host_copies.of(model)
    assert host_copies.of(model) is copies, "one store a model, shared by its patchers"
    copies.copies["weight"] = torch.zeros(3, 4)
    copies.pinned.add("weight")
    del model
    gc.collect()
    assert unpinned == [torch.Size([3, 4])] and not copies.copies


def test_a_budgeted_dit_hands_back_its_evicted_part_too(tiny_parts):
    """The budget patcher (a user's VRAM cap: the layers beyond it stay on the host and stream) evicts its resident
    part for a decode like the resident patcher, and gets the same copies."""
    import comfy.model_management as mm

    from pipeline import host_copies, loader, vram_budget

    device = SimulatedDevice()
    built, _, _, _ = loader.build_model(tiny_parts, "fp32", dynamic=False)
    patcher = vram_budget.patcher_class()(built.model, load_device=CPU, offload_device=CPU)
    patcher.model.newbie_vram_budget = patcher.model_size() * 2 // 3
    copies = host_copies.of(patcher.model)
    copies.on_device = device.on_device
    try:
        for _ in range(3):
            with device.moving("to_device"):
                mm.load_models_gpu([patcher], force_full_load=True)
            assert patcher.model.model_lowvram, "part of the DiT stays on the host under the budget"
            with device.moving("to_host"):
                patcher.partially_unload(CPU, memory_to_free=patcher.model_size() // 4)
        assert copies.copied_bytes > 0 and copies.kept_bytes >= copies.copied_bytes, \
            (copies.copied_bytes, copies.kept_bytes)
    finally:
        mm.unload_all_models()
