"""Resident DiT calls replayed as CUDA graphs (pipeline/cuda_graphs.py).

A CPU has no CUDA graphs, so here the recording backend is `Replaying`: it "records" a call by keeping the
function bound to the recording's own input tensors, and "replays" it by running that function again and writing
the result into the recorded outputs, which is what a graph does to memory. The plumbing under test is real:
ComfyUI's sampler and wrappers, the signatures, the copies into the recorded inputs, the clones of the outputs,
the invalidation on moved weights and the refusals. A wrong copy or a stale recording shows as a wrong number.
The CUDA backend itself ran on an H200 through bench/sampling_accuracy.py (`+graphs` variants): a 25-step latent
bit-identical to the one without graphs (bench/results/run35-sampling_accuracy.json)."""
from __future__ import annotations

import logging

import pytest
import torch

from devkit import cfg_batch_errors, dit_calls

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")]


class Replaying:
    """A CPU stand-in for CudaBackend with the same contract (see the module docstring)."""

    device_type = "cpu"

    def __init__(self, fail_with: Exception | None = None):
        self.fail_with = fail_with
        self.warmups = self.records = self.replays = 0

    def warmup(self, fn):
        self.warmups += 1
        return fn()

    def record(self, fn):
        self.records += 1
        if self.fail_with is not None:
            raise self.fail_with
        out = fn()
        return (fn, out), out

    def replay(self, graph):
        self.replays += 1
        fn, static_out = graph
        from pipeline import cuda_graphs

        fresh, old = [], []
        cuda_graphs.flatten(fn(), fresh, "cpu")
        cuda_graphs.flatten(static_out, old, "cpu")
        for o, f in zip(old, fresh):
            o.copy_(f)


def _run(patcher, backend):
    """A CallGraphs run put on the patcher's DiT, as the OUTER_SAMPLE wrapper does."""
    from pipeline import cuda_graphs

    run = cuda_graphs.CallGraphs(backend, room=lambda device: True)
    setattr(patcher.model.diffusion_model, cuda_graphs.RUN_ATTR, run)
    return run


def _end(patcher):
    from pipeline import cuda_graphs

    delattr(patcher.model.diffusion_model, cuda_graphs.RUN_ATTR)


def _eager_then_graphed(patcher, cfg, calls: list, backend):
    """(eager results, results through a run's graphs, the run) of the same DiT calls."""
    expected = [dit_calls.dit_call(patcher, cfg, c) for c in calls]
    run = _run(patcher, backend)
    try:
        got = [dit_calls.dit_call(patcher, cfg, c) for c in calls]
    finally:
        _end(patcher)
    return expected, got, run


def _inputs(cfg, seed: int, batch: int = 2, tokens: int = 12):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 8, 8, generator=g),
            "c_crossattn": torch.randn(batch, tokens, cfg["cap_feat_dim"], generator=g),
            "clip_text_pooled": torch.randn(batch, cfg["clip_text_dim"], generator=g),
            "t": torch.rand(batch, generator=g), "num_tokens": tokens}


# ---- signatures -------------------------------------------------------------------------------------------------

def test_a_signature_holds_shapes_and_other_arguments_but_not_tensor_values():
    from pipeline import cuda_graphs

    def sig(*args, **kwargs):
        found = []
        return cuda_graphs.flatten((args, kwargs), found, "cpu"), found

    a, ta = sig(torch.zeros(2, 3), 7, transformer_options={"cond_or_uncond": [0, 1], "sigmas": torch.ones(2)})
    b, tb = sig(torch.ones(2, 3), 7, transformer_options={"cond_or_uncond": [0, 1], "sigmas": torch.zeros(2)})
    assert a == b and len(ta) == len(tb) == 2, "new values, same shapes: one recording serves both"
    assert sig(torch.zeros(2, 4), 7, transformer_options={"cond_or_uncond": [0, 1]})[0] != a
    assert sig(torch.zeros(2, 3), 8, transformer_options={"cond_or_uncond": [0, 1], "sigmas": torch.ones(2)})[0] != a
    assert sig(torch.zeros(2, 3), 7, transformer_options={"cond_or_uncond": [1, 0], "sigmas": torch.ones(2)})[0] != a
    assert sig(torch.zeros(3, 2).t(), 7)[0] != sig(torch.zeros(2, 3), 7)[0], "strides count"


def test_rebuild_puts_tensors_back_in_order_and_keeps_other_values():
    from pipeline import cuda_graphs

    structure = ((torch.zeros(1), 3, (4, "x")), {"a": [torch.zeros(2)], "b": None})
    found = []
    cuda_graphs.flatten(structure, found, "cpu")
    new = [torch.ones(1), torch.ones(2) * 2]
    (args, kwargs) = cuda_graphs.rebuild(structure, iter(new), "cpu")
    assert args[0] is new[0] and kwargs["a"][0] is new[1]
    assert args[1:] == (3, (4, "x")) and args[2] is structure[0][2] and kwargs["b"] is None


def test_arguments_a_graph_cannot_take_are_refused():
    from pipeline import cuda_graphs

    with pytest.raises(cuda_graphs.Unsupported, match="set"):
        cuda_graphs.flatten({"opts": [set()]}, [], "cuda")
    with pytest.raises(cuda_graphs.Unsupported, match="cpu tensor of 1000"):
        cuda_graphs.flatten(torch.zeros(1000), [], "cuda")
    assert cuda_graphs.flatten(torch.tensor([0.5, 2.0]), [], "cuda") == \
        ("host", (2,), torch.float32, (0.5, 2.0)), "a small host tensor counts by value"


# ---- calls ------------------------------------------------------------------------------------------------------

def test_replayed_calls_give_each_calls_own_result(tiny_dit):
    """Five calls of one kind with new values each: the first eager, the second warmed up and recorded, the rest
    replayed; every result is the eager one for its own inputs, bit for bit."""
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    backend = Replaying()
    expected, got, run = _eager_then_graphed(patcher, cfg, [_inputs(cfg, seed) for seed in range(5)], backend)
    assert (backend.warmups, backend.records, backend.replays) == (1, 1, 3)
    assert run.replays == 3 and run.why_eager is None
    for n, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"call {n}"
    assert not torch.equal(expected[3], expected[4]), "the inputs differ"


def test_a_replayed_output_is_the_callers_own(tiny_dit):
    """The next replay writes the recorded outputs again: what a caller got before must not change."""
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    run = _run(patcher, Replaying())
    try:
        outs = [dit_calls.dit_call(patcher, cfg, _inputs(cfg, seed)) for seed in range(3)]
        kept = outs[2].clone()
        dit_calls.dit_call(patcher, cfg, _inputs(cfg, 9))
    finally:
        _end(patcher)
    assert run.replays == 2 and torch.equal(outs[2], kept)


def test_each_kind_of_call_has_its_own_recording(tiny_dit):
    """Batch 1 and batch 2, and two caption lengths, alternate as a sampler's calls do."""
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    kinds = [dict(batch=2, tokens=12), dict(batch=1, tokens=12), dict(batch=1, tokens=5)]
    calls = [_inputs(cfg, seed, **kinds[seed % 3]) for seed in range(12)]
    backend = Replaying()
    expected, got, run = _eager_then_graphed(patcher, cfg, calls, backend)
    assert len(run.recordings) == 3 and backend.records == 3 and backend.replays == 6
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_moved_weights_drop_the_recordings(tiny_dit):
    """A weight replaced by another tensor (as ComfyUI patches a LoRA in) is read at its new address: the run's
    recordings are dropped and made again, and the results follow the new weight."""
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    dm = patcher.model.diffusion_model
    backend = Replaying()
    run = _run(patcher, backend)
    try:
        for seed in range(3):
            dit_calls.dit_call(patcher, cfg, _inputs(cfg, seed))
        assert run.replays == 1
        layer = dm.layers[0].attention.out
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 1.5, requires_grad=False)
        _end(patcher)
        expected = dit_calls.dit_call(patcher, cfg, _inputs(cfg, 7))
        setattr(dm, "newbie_call_graphs", run)
        got = dit_calls.dit_call(patcher, cfg, _inputs(cfg, 7))
    finally:
        if hasattr(dm, "newbie_call_graphs"):
            _end(patcher)
    assert torch.equal(got, expected)
    assert run.replays == 1 and run.why_eager == "first call of its kind (compiles)", "recorded anew"


def test_calls_a_graph_could_not_replay_faithfully_run_eagerly(tiny_dit):
    import comfy.patcher_extension as pe

    from pipeline import precision

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    seen = []

    def calls(n, **topts):
        for seed in range(n):
            inputs = _inputs(cfg, seed)
            topts_all = dict(patcher.model_options.get("transformer_options", {}), **topts)
            topts_all["wrappers"] = patcher.wrappers
            x, t = inputs.pop("x"), inputs.pop("t")
            with torch.no_grad():
                patcher.model.apply_model(x, t, transformer_options=topts_all, **inputs)
            seen.append(run.why_eager)

    backend = Replaying()
    run = _run(patcher, backend)
    try:
        calls(3, patches={"double_block": [lambda d: d]})
        assert backend.replays == 0 and "patches" in seen[-1]

        patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "another_node", lambda ex, *a, **k: ex(*a, **k))
        try:
            calls(3)
        finally:
            patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, "another_node")
        assert backend.replays == 0 and "another node's DIFFUSION_MODEL wrapper" in seen[-1]

        patcher.model.diffusion_model.newbie_fp16_state = precision.FP16State(mode="scaled")
        try:
            calls(3)
        finally:
            patcher.model.diffusion_model.newbie_fp16_state = None
        assert backend.replays == 0 and "scaled" in seen[-1]

        calls(3)
        assert backend.replays == 1, "the same calls replay once nothing stands in the way"
    finally:
        _end(patcher)


def test_a_failed_recording_leaves_the_run_eager_and_correct(tiny_dit, caplog):
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    backend = Replaying(fail_with=RuntimeError("operation not permitted when stream is capturing"))
    with caplog.at_level(logging.WARNING):
        expected, got, run = _eager_then_graphed(patcher, cfg, [_inputs(cfg, seed) for seed in range(4)], backend)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert backend.records == 1 and backend.replays == 0 and "not permitted" in run.failed
    assert "recording a DiT call failed" in caplog.text


def test_too_many_kinds_of_call_stop_recording(tiny_dit, monkeypatch):
    from pipeline import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_SIGNATURES", 2)
    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    run = _run(patcher, Replaying())
    try:
        for tokens in (3, 4, 5):
            dit_calls.dit_call(patcher, cfg, _inputs(cfg, 0, tokens=tokens))
    finally:
        _end(patcher)
    assert len(run.recordings) == 2 and "more than 2" in run.why_eager


def test_no_room_means_no_recording(tiny_dit):
    from pipeline import cuda_graphs

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    backend = Replaying()
    run = cuda_graphs.CallGraphs(backend, room=lambda device: False)
    patcher.model.diffusion_model.newbie_call_graphs = run
    try:
        for seed in range(4):
            dit_calls.dit_call(patcher, cfg, _inputs(cfg, seed))
    finally:
        _end(patcher)
    assert backend.records == 0 and run.why_eager == "not enough free memory to record"


# ---- inside ComfyUI's sampler ------------------------------------------------------------------------------------

def _sample(patcher, cond, uncond, steps: int, seed: int = 1):
    """ComfyUI's sampler (euler_ancestral, CFG 5, seeded): (latent, batch size of each DiT call), counted by a
    forward pre-hook on the DiT, which sees every call and adds no wrapper of its own."""
    import comfy.sample

    batches = []
    hook = patcher.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: batches.append(int(args[0].shape[0])))
    try:
        latent = torch.zeros(1, 16, 8, 8)
        with cfg_batch_errors.batching("off"):
            out = comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, seed), steps, 5.0, "euler_ancestral",
                                      "simple", cond, uncond, latent, seed=seed, disable_pbar=True)
    finally:
        hook.remove()
    return out, batches


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sampling_runs_replay_their_calls_keep_the_graphs_and_give_the_same_latents(tiny_dit, monkeypatch, precision):
    """ComfyUI's own sampler (euler_ancestral, CFG 5, two prompts of different lengths, 6 steps): the first run
    records cond and uncond at step 2 and replays steps 3..6; the next run, with another seed (and the new
    conditioning ids ComfyUI gives every run), replays all its calls; each latent is the eager one bit for bit.
    Unloading the model (ComfyUI's detach) releases the graphs, and the run after it records again. The fp16 path
    keeps its per-call overflow check outside the graph."""
    from pipeline import cuda_graphs

    patcher, cfg = cfg_batch_errors.model(tiny_dit, precision)
    dm = patcher.model.diffusion_model
    cond, uncond = cfg_batch_errors.prompts(cfg, 9, 4)
    monkeypatch.setenv("NEWBIE_CUDA_GRAPHS", "0")
    eager = {seed: _sample(patcher, cond, uncond, steps=6, seed=seed)[0] for seed in (1, 2, 3)}
    monkeypatch.setenv("NEWBIE_CUDA_GRAPHS", "1")
    backends, runs = [], []
    monkeypatch.setattr(cuda_graphs, "backend_for", lambda device: backends.append(Replaying()) or backends[-1])
    real = cuda_graphs.CallGraphs

    def keep(*a, **k):
        runs.append(real(*a, room=lambda device: True))
        return runs[-1]

    monkeypatch.setattr(cuda_graphs, "CallGraphs", keep)
    graphed, batches = _sample(patcher, cond, uncond, steps=6, seed=1)
    assert batches == [1] * 12, "two calls a step"
    assert len(runs) == 1 and runs[0].failed is None, runs[0].failed
    assert (backends[0].records, runs[0].replays) == (2, 8), \
        f"cond and uncond recorded at step 2, replayed 3..6 ({runs[0].why_eager})"
    assert torch.equal(graphed, eager[1])
    assert len(runs[0].recordings) == 2 and getattr(dm, cuda_graphs.STORE_ATTR) is runs[0], "kept for the next run"
    assert not hasattr(dm, cuda_graphs.RUN_ATTR)

    graphed, _ = _sample(patcher, cond, uncond, steps=6, seed=2)
    assert len(runs) == 1 and (backends[0].records, runs[0].replays) == (2, 12), runs[0].why_eager
    assert torch.equal(graphed, eager[2])

    patcher.detach()
    assert not hasattr(dm, cuda_graphs.STORE_ATTR) and not runs[0].recordings, "released with the model"
    graphed, _ = _sample(patcher, cond, uncond, steps=6, seed=3)
    assert len(runs) == 2 and (backends[1].records, runs[1].replays) == (2, 8)
    assert torch.equal(graphed, eager[3])


def test_the_graphs_kept_make_room_for_a_later_runs_calls(tiny_dit):
    """Recordings kept from earlier runs give way, the least recently used first, when a run meets new kinds of
    call beyond MAX_SIGNATURES; what this run has met stays."""
    from pipeline import cuda_graphs

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    backend = Replaying()
    run = _run(patcher, backend)
    try:
        for tokens in range(4, 4 + cuda_graphs.MAX_SIGNATURES - 2):  # a run of 6 kinds, each recorded
            for seed in range(2):
                dit_calls.dit_call(patcher, cfg, _inputs(cfg, seed, tokens=tokens))
        for tokens in range(4 + cuda_graphs.MAX_SIGNATURES - 2, 4 + cuda_graphs.MAX_SIGNATURES):
            run.begin_run()
            for seed in range(2):  # runs of one new kind each: there is room beside the kept ones
                dit_calls.dit_call(patcher, cfg, _inputs(cfg, seed, tokens=tokens))
        assert len(run.recordings) == cuda_graphs.MAX_SIGNATURES == backend.records
        kinds = list(run.recordings)
        run.begin_run()
        for seed in range(3):  # a new run: the earlier run's first kind, and a new kind
            for tokens in (4, 40):
                dit_calls.dit_call(patcher, cfg, _inputs(cfg, seed, tokens=tokens))
    finally:
        _end(patcher)
    assert (backend.records, run.replays) == (cuda_graphs.MAX_SIGNATURES + 1, 3 + 1)
    assert list(run.recordings)[:-2] == kinds[2:], "the least recently used kept kind (5 tokens) gave way"
    assert list(run.recordings)[-2] == kinds[0]


def test_the_loader_attaches_it_innermost_and_reports_it(tiny_dit, monkeypatch):
    import comfy.patcher_extension as pe

    from pipeline import cuda_graphs

    patcher, _ = cfg_batch_errors.model(tiny_dit)
    keys = list(patcher.wrappers[pe.WrappersMP.DIFFUSION_MODEL])
    assert keys[-1] == cuda_graphs.WRAPPER_KEY, keys
    assert cuda_graphs.WRAPPER_KEY in patcher.wrappers[pe.WrappersMP.OUTER_SAMPLE]
    monkeypatch.delenv("NEWBIE_CUDA_GRAPHS", raising=False)
    assert cuda_graphs.describe(patcher).startswith("CUDA graphs: off (NEWBIE_CUDA_GRAPHS=1"), "off by default"
    monkeypatch.setenv("NEWBIE_CUDA_GRAPHS", "1")
    assert cuda_graphs.describe(patcher) == "CUDA graphs: off (not a CUDA device)"


def test_no_graphs_under_the_cuda_malloc_async_allocator(tiny_dit, monkeypatch):
    """ComfyUI's default allocator (cudaMallocAsync) could not record the compiled blocks and aborted the server
    freeing the failed recording's memory (H200): graphs only with PyTorch's own allocator, and the report says how
    to get them."""
    from pipeline import cuda_graphs

    monkeypatch.setenv("NEWBIE_CUDA_GRAPHS", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert cuda_graphs.backend_for(torch.device("cuda")) is None
    patcher, _ = cfg_batch_errors.model(tiny_dit)
    monkeypatch.setattr(patcher, "load_device", torch.device("cuda"))
    assert "--disable-cuda-malloc" in cuda_graphs.describe(patcher)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert cuda_graphs.describe(patcher).startswith("CUDA graphs: the DiT's calls replayed")
