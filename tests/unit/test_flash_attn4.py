"""The optional FlashAttention-4 route (pipeline/flash_attn4.py, chosen in pipeline/sdpa.py).

flash-attn-4 runs only on CUDA GPUs, so here its kernel is replaced by a double with its contract: it takes and
returns FlashAttention's [batch, tokens, heads, head size] layout and checks that it was given that layout. What
is real: the custom op and its fake (so a compiled block traces it), the layout handling, the choice of route
and every fall-back to SDPA. The kernel itself is measured on the H200 (bench/attention_backends.py)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline import flash_attn4, sdpa

B, H, N, D = 2, 3, 17, 8


@pytest.fixture
def qkv():
    """bf16, as the DiT's attention runs (FlashAttention-4 takes 16-bit tensors only)."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, generator=g).to(torch.bfloat16) for _ in range(3))


@pytest.fixture
def fa4_double(monkeypatch):
    """The kernel replaced: SDPA computed in FlashAttention's layout, after checking it got that layout."""
    calls = []

    def flash_attn_func(q, k, v):
        assert q.shape == (B, N, H, D) and k.shape[1] == N and v.shape[2] == H, q.shape
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous(), torch.zeros(B, H, N)  # FlashAttnFunc returns (out, lse)

    monkeypatch.setattr(flash_attn4, "kernel", lambda: flash_attn_func)
    return calls


@pytest.fixture(autouse=True)
def cache_switch_kept(monkeypatch):
    """Importing flash-attn-4 through the pack sets its cache switch in os.environ; each test starts without it
    and leaves the environment as it found it."""
    monkeypatch.setenv(flash_attn4.CACHE_SWITCH, "")
    monkeypatch.delenv(flash_attn4.CACHE_SWITCH)


def test_absent_here():
    """CI has no flash-attn-4: the route is never chosen and nothing is imported."""
    assert not flash_attn4.installed()
    assert flash_attn4.version() is None


def test_attention_in_sdpa_layout(qkv, fa4_double):
    out = flash_attn4.attention(*qkv)
    assert out.shape == (B, H, N, D)
    assert torch.allclose(out, F.scaled_dot_product_attention(*qkv), atol=1e-2)
    assert len(fa4_double) == 1


@pytest.fixture
def no_failures(monkeypatch):
    monkeypatch.setattr(flash_attn4, "_FAILED", [])


def test_without_the_package_the_op_computes_sdpa(qkv, no_failures):
    assert torch.allclose(flash_attn4.attention(*qkv), F.scaled_dot_product_attention(*qkv), atol=1e-2)


def test_a_failing_kernel_falls_back_to_sdpa_once_and_for_all(qkv, monkeypatch, no_failures, caplog):
    calls = []

    def broken(q, k, v):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(flash_attn4, "kernel", lambda: broken)
    assert flash_attn4.installed()
    with caplog.at_level("WARNING"):
        first = flash_attn4.attention(*qkv)
        second = flash_attn4.attention(*qkv)
    assert torch.allclose(first, F.scaled_dot_product_attention(*qkv), atol=1e-2) and torch.equal(first, second)
    assert calls == [1], "the failed kernel was tried again"
    assert "flash-attn-4 failed (RuntimeError: no kernel for this GPU)" in caplog.text
    assert not flash_attn4.installed()  # new traces choose SDPA


def test_out_of_memory_is_not_swallowed(qkv, monkeypatch, no_failures):
    def oom(q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(flash_attn4, "kernel", lambda: oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        flash_attn4.attention(*qkv)
    assert flash_attn4.installed()


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Importable stand-ins for what may be installed as `flash_attn`: each test writes its own."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


def _fake_flash_attn_cute(root, interface_source: str) -> None:
    """A `flash_attn` package with a `cute` subpackage whose `interface` module is `interface_source`."""
    (root / "flash_attn" / "cute").mkdir(parents=True)
    (root / "flash_attn" / "__init__.py").write_text("")
    (root / "flash_attn" / "cute" / "__init__.py").write_text("")
    (root / "flash_attn" / "cute" / "interface.py").write_text(interface_source)


def test_flash_attention_2_alone_is_not_a_broken_install(fake_packages, caplog):
    (fake_packages / "flash_attn").mkdir()
    (fake_packages / "flash_attn" / "__init__.py").write_text("")
    with caplog.at_level("WARNING"):
        assert flash_attn4.kernel.__wrapped__() is None
    assert "does not load" not in caplog.text


def test_a_broken_install_is_logged(fake_packages, caplog):
    _fake_flash_attn_cute(fake_packages, "import cutlass_dsl_not_installed_here\n")
    with caplog.at_level("WARNING"):
        assert flash_attn4.kernel.__wrapped__() is None
    assert "flash-attn-4 is installed but does not load (ModuleNotFoundError" in caplog.text


def test_an_install_that_imports_gives_its_function(fake_packages):
    _fake_flash_attn_cute(fake_packages, "def flash_attn_func(q, k, v):\n    pass\n")
    assert flash_attn4.kernel.__wrapped__().__name__ == "flash_attn_func"


def test_its_kernel_cache_is_switched_on_before_it_is_imported_unless_the_user_chose(fake_packages, monkeypatch):
    """flash-attn-4 reads its cache switch when flash_attn.cute is imported; the pack sets it first, keeping a
    value the user set."""
    _fake_flash_attn_cute(fake_packages, "import os\nSEEN = os.environ.get('FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED')\n"
                                         "def flash_attn_func(q, k, v):\n    pass\n")
    for chosen, seen in ((None, "1"), ("0", "0")):
        if chosen is not None:
            monkeypatch.setenv(flash_attn4.CACHE_SWITCH, chosen)
        for name in ("flash_attn.cute.interface", "flash_attn.cute", "flash_attn"):
            sys.modules.pop(name, None)
        assert flash_attn4.kernel.__wrapped__() is not None
        assert sys.modules["flash_attn.cute.interface"].SEEN == seen


def test_the_op_is_defined_once_a_process():
    assert flash_attn4._define_op() is flash_attn4._OP


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_as_one_opaque_call(qkv, fa4_double, monkeypatch, backend):
    """A compiled block traces the route without a graph break; under aot_eager the op's fake gives the shape."""
    monkeypatch.setattr(sdpa, "first_backend", lambda device: "fa4")
    monkeypatch.setattr(flash_attn4, "takes", flash_attn4.shapes_fit)

    def block(q, k, v):
        return sdpa.sdpa(q * 2, k, v).transpose(1, 2).reshape(B, N, H * D) + 1

    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True, backend=backend)(*qkv)
    ref = F.scaled_dot_product_attention(qkv[0] * 2, qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, H * D) + 1
    assert torch.allclose(out, ref, atol=1e-2)
    assert fa4_double


def test_sdpa_routes_unmasked_calls_it_takes(qkv, fa4_double, monkeypatch):
    monkeypatch.setattr(sdpa, "first_backend", lambda device: "fa4")
    monkeypatch.setattr(flash_attn4, "takes", flash_attn4.shapes_fit)
    assert torch.allclose(sdpa.sdpa(*qkv), F.scaled_dot_product_attention(*qkv), atol=1e-2)
    assert len(fa4_double) == 1

    mask = torch.rand(B, 1, N, N) > 0.2
    assert torch.equal(sdpa.sdpa(*qkv, attn_mask=mask), F.scaled_dot_product_attention(*qkv, attn_mask=mask))
    fp32 = tuple(t.float() for t in qkv)
    assert torch.equal(sdpa.sdpa(*fp32), F.scaled_dot_product_attention(*fp32))
    assert len(fa4_double) == 1, "a masked or fp32 call went to FlashAttention-4"


def test_cpu_tensors_are_never_sent(qkv, fa4_double, monkeypatch):
    monkeypatch.setattr(sdpa, "first_backend", lambda device: "fa4")
    assert torch.equal(sdpa.sdpa(*qkv), F.scaled_dot_product_attention(*qkv))
    assert not fa4_double


@pytest.mark.parametrize("dtype, q_shape, kv_shape, fits", [
    (torch.bfloat16, (1, 24, 64, 96), (1, 24, 64, 96), True),
    (torch.float16, (1, 24, 64, 96), (1, 8, 64, 96), True),     # grouped-query heads
    (torch.float32, (1, 24, 64, 96), (1, 24, 64, 96), False),
    (torch.bfloat16, (1, 24, 64, 100), (1, 24, 64, 100), False),  # not a multiple of 8
    (torch.bfloat16, (1, 4, 64, 512), (1, 4, 64, 512), False),    # above 256
    (torch.bfloat16, (1, 24, 64, 96), (1, 7, 64, 96), False)])    # heads that do not group
def test_what_it_takes(dtype, q_shape, kv_shape, fits):
    q, k, v = torch.empty(q_shape, dtype=dtype), torch.empty(kv_shape, dtype=dtype), torch.empty(kv_shape,
                                                                                                  dtype=dtype)
    assert flash_attn4.shapes_fit(q, k, v) is fits
    assert not flash_attn4.takes(q, k, v)  # CPU tensors


@pytest.mark.parametrize("capability, value, installed, expected", [
    ((9, 0), "auto", True, "fa4"), ((9, 0), "auto", False, "cudnn"), ((10, 0), "auto", True, "cudnn"),
    ((8, 9), "auto", True, None), ((8, 9), "fa4", True, "fa4"), ((8, 9), "fa4", False, None),
    ((9, 0), "fa4", False, "cudnn"), ((9, 0), "cudnn", True, "cudnn"), ((9, 0), "torch", True, None)])
def test_choice_by_capability_switch_and_package(monkeypatch, capability, value, installed, expected):
    monkeypatch.setenv("NEWBIE_SDPA", value)
    monkeypatch.setattr(sdpa.torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(flash_attn4, "installed", lambda: installed)
    assert sdpa.first_backend(torch.device("cuda", 0)) == expected
    assert sdpa.first_backend(torch.device("cpu")) is None


def test_a_call_it_does_not_take_falls_back_to_the_sdpa_order(monkeypatch, qkv):
    monkeypatch.setenv("NEWBIE_SDPA", "auto")
    monkeypatch.setattr(sdpa.torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)
    assert sdpa.sdpa_first(torch.device("cuda", 0)) == "cudnn"


def test_report_line(monkeypatch):
    monkeypatch.setattr(flash_attn4, "version", lambda: "4.0.0b40")
    monkeypatch.setattr(sdpa, "first_backend", lambda device: "fa4")
    line = sdpa.describe(torch.device("cuda", 0))
    assert "FlashAttention-4 (flash-attn-4 4.0.0b40" in line and "launched directly" in line
    monkeypatch.setenv("NEWBIE_FA4_REPLAY", "0")
    assert "launched directly" not in sdpa.describe(torch.device("cuda", 0))
    monkeypatch.setattr(sdpa, "first_backend", lambda device: "cudnn")
    assert sdpa.describe(torch.device("cuda", 0)) == "attention: PyTorch SDPA (cuDNN first)"
    monkeypatch.setattr(sdpa, "first_backend", lambda device: None)
    assert sdpa.describe(torch.device("cpu")) == "attention: PyTorch SDPA (PyTorch's own order)"


def test_not_imported_where_it_would_not_be_used(monkeypatch):
    """auto on a GPU other than Hopper, or another mode, never imports flash-attn-4 (its DSL takes seconds)."""
    asked = []
    monkeypatch.setattr(flash_attn4, "installed", lambda: asked.append(1) or True)
    monkeypatch.setattr(sdpa.torch.cuda, "get_device_capability", lambda index: (8, 6))
    for value in ("auto", "cudnn", "flash", "torch"):
        monkeypatch.setenv("NEWBIE_SDPA", value)
        sdpa.first_backend(torch.device("cuda", 0))
    assert not asked
