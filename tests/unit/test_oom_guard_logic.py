"""The OOM recovery ladder, the batch split and devkit's injected faults on toy callables (pipeline/oom/,
devkit/faults.py).

No ComfyUI here: the memory rungs get a fake in place of ComfyUI's model management, and the "model" is a
row-wise function, so a split batch must give exactly the whole batch's result.
"""
import json
import logging

import pytest
import torch

from devkit import faults
from pipeline.oom import calls, ladder, report
from pipeline.oom.guard import OOMGuard, OOMUnrecoverable
from pipeline.oom.memory import ComfyMemory, is_oom
from pipeline.oom.vae import guard_vae


class FakeMemory:
    """Stands in for ComfyMemory; records which rungs ran."""

    def __init__(self, patcher=None, device="cpu", in_use=()):
        self.device = torch.device(device)
        self.done = []

    def free_bytes(self):
        return 3 << 30

    def total_bytes(self):
        return 8 << 30

    def empty_cache(self):
        self.done.append("empty_cache")
        return "emptied the cache"

    def free_other_models(self):
        self.done.append("free_models")
        return "unloaded 1 other model(s)"

    def offload_weights(self, amount):
        self.done.append("offload_weights")
        return f"moved {report.fmt_bytes(amount)} of weights"


def oom(text="CUDA out of memory. Tried to allocate 2.00 GiB."):
    return torch.OutOfMemoryError(text)


class ToyModel:
    """A row-wise model, like one denoiser call: out[i] depends on row i of every input only."""

    def __init__(self, fail_first=0, fail_when=None):
        self.calls = []
        self.fail_first = fail_first
        self.fail_when = fail_when  # predicate on the batch size

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        self.calls.append((x.shape[0], list(transformer_options.get("cond_or_uncond", []))))
        if len(self.calls) <= self.fail_first or (self.fail_when and self.fail_when(x.shape[0])):
            raise oom()
        # cond_or_uncond must describe the rows it came with: row chunks carry their chunk's label.
        labels = torch.tensor(transformer_options["cond_or_uncond"], dtype=x.dtype)
        labels = labels.repeat_interleave(x.shape[0] // len(labels))
        return x * 2 + t[:, None, None, None] + c_crossattn.sum(dim=(1, 2))[:, None, None, None] \
            + labels[:, None, None, None] * 100 + kwargs["pooled"][:, :1, None, None]


class Executor:
    """Plays ComfyUI's WrapperExecutor: callable, with the wrapped model as class_obj; the wrappers in `inner`
    run inside the one it is handed to, the first outermost."""

    def __init__(self, model, base_model=None, inner=()):
        self.model = model
        self.class_obj = base_model
        self.inner = list(inner)

    def __call__(self, *args, **kwargs):
        if self.inner:
            return self.inner[0](Executor(self.model, self.class_obj, self.inner[1:]), *args, **kwargs)
        return self.model(*args, **kwargs)


class BaseModel:
    def memory_required(self, shape):
        return 1000 * shape[0]


def inputs(batch=2, chunks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    cross = torch.randn(batch, 5, 16, generator=g)
    pooled = torch.randn(batch, 3, generator=g)
    schedule = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    opts = {"cond_or_uncond": [1, 0][:chunks] if chunks <= 2 else list(range(chunks)),
            "uuids": [f"u{i}" for i in range(chunks)], "sample_sigmas": schedule, "sigmas": schedule[1:2]}
    return x, t, cross, pooled, opts


def call_guard(guard, model, batch=2, chunks=2, seed=0, model_faults=None):
    """One model call through the guard's APPLY_MODEL wrapper (and inside it devkit's, when given)."""
    x, t, cross, pooled, opts = inputs(batch, chunks, seed)
    inner = [model_faults.apply_model] if model_faults is not None else []
    return guard.apply_model(Executor(model, BaseModel(), inner), x, t, None, cross, None, opts, pooled=pooled)


def sample(guard, model_faults, run):
    """A sampling run: both OUTER_SAMPLE wrappers around `run`, the guard's outermost."""
    return guard.outer_sample(lambda: model_faults.outer_sample(run))


def new_guard(**kw):
    return OOMGuard(memory=FakeMemory, **kw)


# -- the ladder --------------------------------------------------------------------------------------------

def test_no_fault_calls_once_and_records_nothing():
    guard, model = new_guard(), ToyModel()
    out = call_guard(guard, model)
    assert torch.equal(out, ToyModel()(*_positional(), **_kw()))
    assert len(model.calls) == 1 and guard.recoveries == 0


def _positional(batch=2, chunks=2):
    x, t, cross, pooled, opts = inputs(batch, chunks)
    return x, t, None, cross, None, opts


def _kw(batch=2, chunks=2):
    return {"pooled": inputs(batch, chunks)[3]}


@pytest.mark.parametrize("failures, rungs", [(1, ["empty_cache"]), (2, ["empty_cache", "free_models"]),
                                            (3, ["empty_cache", "free_models", "offload_weights"])])
def test_retry_after_memory_rungs_is_bit_identical(failures, rungs):
    memory = FakeMemory()
    guard = OOMGuard(memory=lambda *args: memory)
    reference = ToyModel()(*_positional(), **_kw())
    model = ToyModel(fail_first=failures)
    out = call_guard(guard, model)
    assert torch.equal(out, reference)
    assert memory.done == rungs
    assert len(model.calls) == failures + 1 and all(n == 2 for n, _ in model.calls)
    assert guard.recoveries == 1 and guard.events[0].retries == failures
    assert not guard.events[0].changed_computation
    assert guard.events[0].where == "step 2/4 (model call 0)"


def test_fourth_retry_splits_cond_and_uncond_and_stays_split_for_the_run():
    guard = new_guard()
    reference = ToyModel()(*_positional(), **_kw())
    model = ToyModel(fail_first=4)
    out = call_guard(guard, model)
    assert torch.allclose(out, reference, rtol=1e-6, atol=0)
    assert model.calls[-2:] == [(1, [1]), (1, [0])]  # each half carries its own cond_or_uncond label
    assert guard.events[0].changed_computation
    assert "split the batch of 2 into 2 pieces of 1" in guard.events[0].actions[-1]
    following = ToyModel()
    call_guard(guard, following, seed=1)  # the next step of the same run starts split
    assert following.calls == [(1, [1]), (1, [0])]


def test_split_goes_on_halving_rows_within_chunks():
    guard = new_guard(max_retries=8)
    x, t, cross, pooled, opts = inputs(batch=8, chunks=2)
    reference = ToyModel()(x, t, None, cross, None, opts, pooled=pooled)
    model = ToyModel(fail_when=lambda rows: rows > 2)
    out = guard.apply_model(Executor(model, BaseModel()), x, t, None, cross, None, opts, pooled=pooled)
    assert torch.allclose(out, reference, rtol=1e-6, atol=0)
    sizes = [n for n, _ in model.calls]
    assert sizes[-4:] == [2, 2, 2, 2]
    assert [c for n, c in model.calls[-4:]] == [[1], [1], [0], [0]]
    assert guard.events[0].actions[-2:] == ["split the batch of 8 into 2 pieces of 4",
                                            "split the batch of 8 into 4 pieces of 2"]


def test_split_sizes_keep_pieces_aligned_with_chunks():
    x = torch.zeros(6, 1)
    call = calls.ModelCall(x, torch.zeros(6), transformer_options={"cond_or_uncond": [0, 1]})
    assert call.split_sizes() == [3, 1]
    call = calls.ModelCall(torch.zeros(2, 1), torch.zeros(2), transformer_options={"cond_or_uncond": [0, 1]})
    assert call.split_sizes() == [1]
    call = calls.ModelCall(torch.zeros(1, 1), torch.zeros(1), transformer_options={"cond_or_uncond": [0]})
    with pytest.raises(calls.SplitImpossible):
        call.check_splittable()


def test_split_refused_with_controlnet_or_odd_inputs():
    call = calls.ModelCall(torch.zeros(2, 1), torch.zeros(2), control=object())
    with pytest.raises(calls.SplitImpossible, match="ControlNet"):
        call.check_splittable()
    call = calls.ModelCall(torch.zeros(2, 1), torch.zeros(2), kwargs={"odd": torch.zeros(3, 1)})
    with pytest.raises(calls.SplitImpossible, match="'odd' has 3 rows"):
        call.check_splittable()


def test_no_split_when_not_allowed_exhausts_with_a_message():
    guard = new_guard(allow_batch_split=False)
    model = ToyModel(fail_first=99)
    with pytest.raises(OOMUnrecoverable) as err:
        call_guard(guard, model)
    assert len(model.calls) == 4  # first try + the three memory rungs
    text = str(err.value)
    assert "step 2/4 (model call 0)" in text
    assert "needs about 2.00 GiB" in text and "3.00 GiB is free on cpu of 8.00 GiB" in text
    assert "allow_batch_split" in text and "smaller resolution" in text
    assert isinstance(err.value, torch.OutOfMemoryError) and is_oom(err.value)


def test_max_retries_zero_fails_at_once_with_a_message():
    guard = new_guard(max_retries=0)
    model = ToyModel(fail_first=1)
    with pytest.raises(OOMUnrecoverable, match="no retries allowed: max_retries is 0"):
        call_guard(guard, model)
    assert len(model.calls) == 1


def test_other_errors_are_not_caught():
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    guard = new_guard()
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        call_guard(guard, broken)
    assert guard.recoveries == 0


def test_call_with_recovery_runs_rungs_outside_the_except_block():
    seen = []

    def attempt(k):
        if k < 2:
            raise oom()
        return "ok"

    def rung():
        import sys
        seen.append(sys.exc_info()[0])
        return "did something"

    done = ladder.call_with_recovery(attempt, lambda: [ladder.Rung("a", rung), ladder.Rung("b", rung)], max_retries=5)
    assert done.value == "ok" and done.retries == 2 and seen == [None, None]


def test_recovery_is_logged_with_step_and_count(caplog):
    guard = new_guard()
    with caplog.at_level(logging.INFO, logger="pipeline.oom"):
        call_guard(guard, ToyModel(fail_first=1))
        call_guard(guard, ToyModel(fail_first=2))
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 2
    assert "recovered step 2/4 (model call 0) on retry 1" in recovered[0] and "Recovery #1" in recovered[0]
    assert "Recovery #2" in recovered[1]


# -- injected faults (devkit/faults.py) ----------------------------------------------------------------------

def plan(**keys):
    return faults.FaultPlan.parse(json.dumps(keys))


def test_fault_plan_rejects_unknown_keys():
    with pytest.raises(faults.FaultPlanError, match="unknown keys \\['step'\\]"):
        plan(step=[1])
    with pytest.raises(faults.FaultPlanError, match="cannot read the fault plan"):
        faults.FaultPlan.parse("steps: [1]")


def test_fault_plan_steps_count_from_the_end():
    chosen = plan(steps=[-1], model_calls=[0])
    assert chosen.targets_model_call(7, 3, 4) and not chosen.targets_model_call(7, 2, 4)
    assert chosen.targets_model_call(0, None, None)


def test_injected_fault_is_a_genuine_oom_raised_before_the_model_runs():
    guard, model, model_faults = new_guard(), ToyModel(), faults.ModelFaults(plan(steps=[1], times=2))
    out = sample(guard, model_faults, lambda: call_guard(guard, model, model_faults=model_faults))
    assert torch.equal(out, ToyModel()(*_positional(), **_kw()))
    assert len(model.calls) == 1  # the two injected failures never reached the model
    assert guard.events[0].retries == 2


def test_unrecoverable_fault_plan_fails_every_attempt():
    guard, model, model_faults = new_guard(), ToyModel(), faults.ModelFaults(plan(steps=[1], unrecoverable=True))
    with pytest.raises(OOMUnrecoverable) as err:
        sample(guard, model_faults, lambda: call_guard(guard, model, model_faults=model_faults))
    assert model.calls == []
    text = str(err.value)
    assert "after 4 retry(ies)" in text and "split the batch of 2" in text and "Injected" in text


def test_retries_and_split_pieces_are_attempts_at_the_same_call():
    """Four failures, then the pieces of the split call: the pieces are the fifth attempt, not new calls."""
    guard, model, model_faults = new_guard(), ToyModel(), faults.ModelFaults(plan(model_calls=[0], times=4))
    out = sample(guard, model_faults, lambda: call_guard(guard, model, model_faults=model_faults))
    assert torch.allclose(out, ToyModel()(*_positional(), **_kw()), rtol=1e-6, atol=0)
    assert model.calls == [(1, [1]), (1, [0])]
    assert guard.recoveries == 1 and guard.events[0].retries == 4


def test_model_calls_are_counted_from_0_in_each_sampling_run():
    guard, model_faults = new_guard(), faults.ModelFaults(plan(model_calls=[1]))

    def two_calls():
        call_guard(guard, ToyModel(), seed=0, model_faults=model_faults)
        call_guard(guard, ToyModel(), seed=1, model_faults=model_faults)

    sample(guard, model_faults, two_calls)
    assert [e.where for e in guard.events] == ["step 2/4 (model call 1)"]
    sample(guard, model_faults, two_calls)
    assert guard.recoveries == 2


# -- VAE -----------------------------------------------------------------------------------------------------

class ToyDecoder:
    comfy_has_chunked_io = False

    def __init__(self, fail_first=0):
        self.calls = 0
        self.fail_first = fail_first

    def decode(self, z, **kwargs):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise oom()
        return z * 3

    def encode(self, x):
        return x / 3


class ToyVAE:
    def __init__(self, decoder):
        self.first_stage_model = decoder
        self.patcher = None
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32

    def memory_used_decode(self, shape, dtype):
        return 1 << 20


def test_guarded_vae_retries_decode_and_leaves_the_input_vae_alone():
    decoder = ToyDecoder(fail_first=2)
    vae = ToyVAE(decoder)
    guard = new_guard()
    guarded = guard_vae(vae, guard)
    assert vae.first_stage_model is decoder
    z = torch.randn(1, 16, 4, 4)
    assert torch.equal(guarded.first_stage_model.decode(z), z * 3)
    assert decoder.calls == 3 and guard.recoveries == 1 and guard.events[0].where == "VAE decode"
    assert guarded.first_stage_model.comfy_has_chunked_io is False  # everything else is the real decoder's
    assert torch.equal(guarded.first_stage_model.encode(z), z / 3)
    import copy
    assert copy.deepcopy(guarded).first_stage_model.decode(z).shape == z.shape  # copies of the proxy work


def test_guarded_vae_gives_up_with_an_oom_so_comfyui_can_tile():
    decoder = ToyDecoder(fail_first=99)
    guarded = guard_vae(ToyVAE(decoder), new_guard())
    with pytest.raises(torch.OutOfMemoryError, match="VAE decode"):
        guarded.first_stage_model.decode(torch.zeros(1, 16, 4, 4))
    assert decoder.calls == 3  # first try + empty cache + unload other models


def test_vae_fault_plan_counts_attempts_per_prompt():
    decoder = ToyDecoder()
    guard = new_guard()
    guarded = guard_vae(faults.inject_vae_faults(ToyVAE(decoder), plan(vae_decode=True, times=1)), guard)
    guarded.first_stage_model.decode(torch.zeros(1, 16, 4, 4))
    guarded.first_stage_model.decode(torch.zeros(1, 16, 4, 4))  # same prompt: the one fault is spent
    assert decoder.calls == 2 and guard.recoveries == 1


# -- helpers -------------------------------------------------------------------------------------------------

def test_requested_bytes_reads_cuda_messages():
    assert report.requested_bytes("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0") == int(2.5 * (1 << 30))
    assert report.requested_bytes("Tried to allocate 20.00 MiB") == 20 << 20
    assert report.requested_bytes("something else") is None


def test_step_of_finds_the_sigma_in_the_schedule():
    schedule = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert calls.step_of({"sample_sigmas": schedule, "sigmas": torch.tensor([3.0, 3.0])}) == (2, 4)
    assert calls.step_of({"sample_sigmas": schedule, "sigmas": torch.tensor([2.0])}) == (None, 4)
    assert calls.step_of({}) == (None, None)


# -- ComfyUI's memory functions, against a stand-in for comfy.model_management -------------------------------

class FakePatcher:
    def __init__(self, name, base=None, loaded=4 << 30):
        self.name = name
        self.model = base if base is not None else object()
        self.load_device = torch.device("cuda:0")
        self.offload_device = torch.device("cpu")
        self.loaded = loaded
        self.unloaded = []

    def model_patches_models(self):
        return []

    def loaded_size(self):
        return self.loaded

    def partially_unload(self, device_to, memory_to_free=0):
        self.unloaded.append((device_to, memory_to_free))
        self.loaded -= memory_to_free
        return memory_to_free


class FakeLoaded:
    def __init__(self, patcher):
        self.model = patcher


class FakeModelManagement:
    def __init__(self, loaded):
        self.current_loaded_models = [FakeLoaded(p) for p in loaded]
        self.freed_with = None
        self.free = 1 << 30

    def get_free_memory(self, device):
        return self.free

    def get_total_memory(self, device):
        return 8 << 30

    def soft_empty_cache(self):
        pass

    def free_memory(self, memory_required, device, keep_loaded=()):
        self.freed_with = (memory_required, device, [lm.model.name for lm in keep_loaded])
        gone = [lm for lm in self.current_loaded_models if lm not in keep_loaded]
        self.free += len(gone) << 30
        return gone


def test_unloading_other_models_keeps_what_the_sampling_run_uses(monkeypatch):
    ours, controlnet, text_encoder = FakePatcher("dit"), FakePatcher("controlnet"), FakePatcher("gemma")
    sibling = FakePatcher("dit-clone", base=ours.model)  # another clone of the same model
    mm = FakeModelManagement([text_encoder, sibling, controlnet, ours])
    monkeypatch.setitem(__import__("sys").modules, "comfy.model_management", mm)
    memory = ComfyMemory(ours, "cuda:0", in_use=[controlnet])
    text = memory.free_other_models()
    assert mm.freed_with[1] == torch.device("cuda:0")
    assert sorted(mm.freed_with[2]) == ["controlnet", "dit", "dit-clone"]
    assert text.startswith("unloaded 1 other model(s) from cuda:0 (1.00 GiB more free")


def test_offloading_weights_moves_part_of_this_model(monkeypatch):
    ours = FakePatcher("dit", loaded=4 << 30)
    monkeypatch.setitem(__import__("sys").modules, "comfy.model_management", FakeModelManagement([ours]))
    text = ComfyMemory(ours, "cuda:0").offload_weights(3 << 30)
    assert ours.unloaded == [(torch.device("cpu"), 3 << 30)]
    assert text.startswith("moved 3.00 GiB of this model's weights to cpu (1.00 GiB stay on cuda:0")


def test_memory_rungs_on_the_cpu_free_nothing():
    memory = ComfyMemory(None, "cpu")
    assert "CPU" in memory.empty_cache()
    assert "CPU" in memory.free_other_models()
    assert "CPU" in memory.offload_weights(1 << 30)


def test_report_describes_the_ladder():
    text = OOMGuard(max_retries=5, allow_batch_split=False).describe(vae_guarded=True, device="cpu")
    assert "up to 5 retries" in text and "split" not in text.split("\n")[0]
    assert "VAE: guarded" in text and "shown on this node as they happen" in text
    assert "so far" not in text, "made before sampling, the report cannot count recoveries"
