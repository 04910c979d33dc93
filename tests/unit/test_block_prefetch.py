"""The block prefetch of a streamed DiT (pipeline/block_prefetch.py): ComfyUI's prefetch queue gets the DiT's blocks
in the order they run and is popped as each block starts, and the result is unchanged. ComfyUI's queue only works
on a GPU under dynamic VRAM, so here its two functions are replaced by recorders; on the CPU the real
`make_prefetch_queue` declines and the call runs as before."""
from __future__ import annotations

import pytest
import torch

from devkit import cfg_batch_errors, dit_calls

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu")]


def _wrapped(patcher) -> bool:
    import comfy.patcher_extension as pe

    from pipeline import block_prefetch

    return any(key == block_prefetch.WRAPPER_KEY
               for key in patcher.wrappers.get(pe.WrappersMP.DIFFUSION_MODEL, {}))


def test_each_block_is_fetched_as_it_starts_in_the_order_the_blocks_run(tiny_dit, monkeypatch):
    from pipeline import block_prefetch

    mp = block_prefetch._prefetch_module()
    if mp is None:
        pytest.skip("this host has no comfy.model_prefetch (v0.8): nothing to attach")
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    assert _wrapped(patcher), "the loader attaches the prefetch"
    dm = patcher.model.diffusion_model
    blocks = block_prefetch.blocks_in_order(dm)
    assert len(blocks) == len(dm.context_refiner) + len(dm.noise_refiner) + len(dm.layers)
    reference = dit_calls.dit_call(patcher, cfg)

    events, queues = [], []

    def make_queue(queue, device, transformer_options):
        assert "prefetch_dynamic_vbars" in transformer_options, "ComfyUI's flag reaches the wrapper"
        queues.append([None] + list(queue) + [None])
        return queues[-1]

    def pop(queue, device, module, *args, **kwargs):
        assert queue is queues[-1]
        queue.pop(0)
        events.append(("fetch", module))

    monkeypatch.setattr(mp, "make_prefetch_queue", make_queue)
    monkeypatch.setattr(mp, "prefetch_queue_pop", pop)
    ran = [b.register_forward_hook(lambda m, a, o: events.append(("ran", m))) for b in blocks]
    try:
        out = dit_calls.dit_call(patcher, cfg)
    finally:
        for h in ran:
            h.remove()
    expected = [e for b in blocks for e in (("fetch", b), ("ran", b))] + [("fetch", None)]
    assert [(k, id(m)) for k, m in events] == [(k, id(m)) for k, m in expected], \
        "each block fetched just before it runs, then the last one released"
    assert queues[-1] == [None], "the queue was consumed to its end"
    assert torch.equal(out, reference), "prefetching changes no number"
    assert all(not b._forward_pre_hooks for b in blocks), "the hooks leave with the call"


def test_without_a_queue_the_call_runs_as_before(tiny_dit):
    """On a CPU (or a resident DiT) ComfyUI's make_prefetch_queue declines: no hooks, the same output."""
    import comfy.patcher_extension as pe

    from pipeline import block_prefetch

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    out = dit_calls.dit_call(patcher, cfg)
    patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, block_prefetch.WRAPPER_KEY)
    assert not _wrapped(patcher)
    assert torch.equal(out, dit_calls.dit_call(patcher, cfg))
    assert all(not b._forward_pre_hooks for b in block_prefetch.blocks_in_order(patcher.model.diffusion_model))


def test_switched_off_by_the_environment_or_absent_on_the_host(tiny_dit, monkeypatch):
    from pipeline import block_prefetch

    monkeypatch.setenv("NEWBIE_BLOCK_PREFETCH", "0")
    patcher, _ = cfg_batch_errors.model(tiny_dit)
    assert not _wrapped(patcher) and not block_prefetch.attach(patcher)
    monkeypatch.delenv("NEWBIE_BLOCK_PREFETCH")
    monkeypatch.setattr(block_prefetch, "_prefetch_module", lambda: None)  # a host without the queue (v0.8.0)
    assert not block_prefetch.attach(patcher) and not _wrapped(patcher)
    monkeypatch.undo()
    if block_prefetch._prefetch_module() is not None:  # a host with the queue (v0.33): attached
        assert block_prefetch.attach(patcher) and _wrapped(patcher)
