"""q/k RMSNorm + RoPE fusion (pipeline/rope_fusion.py): the out-of-place definition equals comfy-kitchen's own
eager backend, and once registered, a compiled graph holds no call to comfy-kitchen's op."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host  # comfy-kitchen comes with the host's requirements


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_definition_matches_comfy_kitchen_eager(dtype, comfy_import_path):
    from comfy_kitchen.backends.eager.rope import rms_rope1 as kitchen_eager

    from pipeline import rope_fusion

    g = torch.Generator().manual_seed(0)
    # NextDiT's layout [B, N, H, D], and [B, H, N, D] with more frequencies than tokens (trimmed)
    for x_shape, freqs_shape in (((2, 16, 3, 8), (1, 16, 1, 4, 2, 2)), ((2, 3, 12, 8), (1, 1, 16, 4, 2, 2))):
        x = (torch.randn(*x_shape, generator=g) * 5).to(dtype)
        freqs = torch.randn(*freqs_shape, generator=g)
        scale = torch.randn(8, generator=g).to(dtype)
        ours, theirs = rope_fusion.rms_rope1(x, freqs, scale, 1e-6), kitchen_eager(x, freqs, scale, 1e-6)
        assert ours.dtype == theirs.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(ours.float(), theirs.float(), atol=tol, rtol=tol), (ours - theirs).abs().max()


def test_compiled_graph_runs_the_fused_definition(comfy_import_path):
    import comfy.quant_ops  # noqa: F401  (registers comfy-kitchen's ops the way ComfyUI does)
    import comfy_kitchen as ck
    from torch._inductor.utils import run_and_get_code

    from pipeline import rope_fusion

    if not rope_fusion.enable():
        pytest.skip("comfy-kitchen's CUDA kernel is active here: the op is left to it")

    def attention_prologue(x, freqs, scale):
        return ck.rms_rope1(x * 2, freqs, scale, 1e-6) + 1

    g = torch.Generator().manual_seed(1)
    x, freqs, scale = torch.randn(2, 16, 4, 8, generator=g), torch.randn(1, 16, 1, 4, 2, 2, generator=g), \
        torch.randn(8, generator=g)
    torch._dynamo.reset()
    # Inductor's on-disk graph cache does not key on registered decompositions: bypass it, or a graph compiled
    # by an earlier run (with or without the decomposition) would answer instead.
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            out, code = run_and_get_code(torch.compile(attention_prologue), x, freqs, scale)
    finally:
        torch._dynamo.reset()
    assert "comfy_kitchen" not in "".join(code), "the custom op is still called from the compiled graph"
    assert torch.allclose(out, attention_prologue(x, freqs, scale), atol=1e-5)


def test_enabling_after_another_inductor_compile_still_fuses(comfy_import_path):
    """Inductor caches its decomposition table at its first compile in the process. Another node's compile before
    the pack's first one (a TorchCompileModel of another model in the same server) left the op out of that table,
    and the pack's compiled blocks then failed in Inductor ("both a fallback and a decomp for same op")."""
    import comfy.quant_ops  # noqa: F401
    import comfy_kitchen as ck
    from torch._inductor import decomposition

    from pipeline import rope_fusion

    op = getattr(torch.ops.comfy_kitchen, rope_fusion.OP_NAME).default
    registered = decomposition.decompositions.pop(op, None)
    decomposition.fast_random_decomps.cache_clear()
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            torch.compile(lambda x: x * 3 + 1)(torch.ones(4))  # another compile caches the table first
            assert op not in decomposition.select_decomp_table()
            if not rope_fusion.enable():
                pytest.skip("comfy-kitchen's CUDA kernel is active here: the op is left to it")
            assert op in decomposition.select_decomp_table()
            g = torch.Generator().manual_seed(2)
            x, freqs, scale = torch.randn(2, 16, 4, 8, generator=g), torch.randn(1, 16, 1, 4, 2, 2, generator=g), \
                torch.randn(8, generator=g)
            torch._dynamo.reset()
            out = torch.compile(lambda x, f, s: ck.rms_rope1(x, f, s, 1e-6) * 2)(x, freqs, scale)
        assert torch.allclose(out, rope_fusion.rms_rope1(x, freqs, scale, 1e-6) * 2, atol=1e-5)
    finally:
        torch._dynamo.reset()
        if registered is not None and op not in decomposition.decompositions:
            decomposition.decompositions[op] = registered
        decomposition.fast_random_decomps.cache_clear()
