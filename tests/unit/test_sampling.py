"""Euler ancestral for rectified flow: the node's sampler (pipeline/sampling.py, ComfyUI's own
sample_euler_ancestral_RF behind the pack's checks) against a loop written from the docstring's math and the step
coefficients worked out by hand (tests/flow_reference.py), eta = 0 as plain Euler, seeds, and the checks."""
from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import pytest
import torch

from flow_reference import ancestral_step
from pipeline import sampling

pytestmark = pytest.mark.host  # the sampler is ComfyUI's own


@pytest.fixture(scope="module", autouse=True)
def comfy_sampling(comfy_import_path):
    if not torch.cuda.is_available():
        from comfy.cli_args import args

        args.cpu = True  # ComfyUI's model_management probes CUDA at import unless told to use the CPU
    import comfy.k_diffusion.sampling

    return comfy.k_diffusion.sampling


def sample_euler_ancestral_rf(model, x, sigmas, **kwargs):
    return sampling.sample_euler_ancestral_rf(model, x, sigmas, **kwargs)

SHAPE = (2, 4, 6, 6)


def flow_sigmas(steps: int, shift: float = 6.0) -> torch.Tensor:
    """ComfyUI's 'simple' schedule for a flow model with NewBie's shift: t from 1 to 0, shifted, ending at 0."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


class _ModelSampling:
    def __init__(self, noise_scale=None):
        if noise_scale is not None:
            self.noise_scale = noise_scale


class _Patcher:
    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.model_sampling


class _Guider:
    def __init__(self, model_sampling):
        self.model_patcher = _Patcher(model_sampling)


class ToyFlowModel:
    """A fixed linear denoiser D(x, sigma) = (1 - sigma) * (M x over channels) + bias: cheap, deterministic, and
    not a no-op, so every coefficient of the step shows in the result. Dressed like ComfyUI's KSamplerX0Inpaint
    (inner_model, the guider -> model_patcher -> model_sampling), as ComfyUI's sampler expects."""

    def __init__(self, channels: int = SHAPE[1], noise_scale=None):
        self.inner_model = _Guider(_ModelSampling(noise_scale))
        g = torch.Generator().manual_seed(1234)
        self.m = torch.randn(channels, channels, generator=g) / channels ** 0.5
        self.bias = 0.1 * torch.randn(1, channels, 1, 1, generator=g)
        self.calls = 0

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        assert sigma.shape == (x.shape[0],), "sigma must come per batch item, as ComfyUI's models expect"
        mixed = torch.einsum("oc,bchw->bohw", self.m.to(x.device), x)
        return (1 - sigma).view(-1, 1, 1, 1) * mixed + self.bias.to(x.device)


class FixedNoise:
    """Pre-drawn unit noise handed out in order, so two runs can share one stream."""

    def __init__(self, count: int, seed: int = 99):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(SHAPE, generator=g) for _ in range(count)]
        self.used = 0

    def __call__(self, sigma, sigma_next):
        z = self.draws[self.used]
        self.used += 1
        return z


def start_latent(seed: int = 5) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_capturing(model, x, sigmas, **kwargs):
    """Run the sampler; return (final x, [x entering each step], [callback dicts])."""
    seen = []
    out = sample_euler_ancestral_rf(model, x.clone(), sigmas, callback=seen.append, disable=True, **kwargs)
    return out, [s["x"] for s in seen], seen


# --------------------------------------------------------------------------------------------------------------
# ancestral_step
# --------------------------------------------------------------------------------------------------------------

# (sigma, sigma_next, eta) -> (sigma_down, alpha_ratio, renoise**2), worked out by hand in fractions:
#   sigma_down = sn * (1 + eta * (sn / s - 1)); alpha = (1 - sn) / (1 - sigma_down); c^2 = sn^2 - (alpha*sd)^2
HAND = [
    # eta 1: sd = sn^2/s = (1/4)/(4/5) = 5/16; alpha = (1/2)/(11/16) = 8/11; c^2 = 1/4 - 25/484 = 24/121
    ((F(4, 5), F(1, 2), 1), (F(5, 16), F(8, 11), F(24, 121))),
    # eta 1/2: ratio 1 + (5/8 - 1)/2 = 13/16; sd = 13/32; alpha = (1/2)/(19/32) = 16/19; c^2 = 1/4 - 169/1444
    ((F(4, 5), F(1, 2), F(1, 2)), (F(13, 32), F(16, 19), F(48, 361))),
    # eta 0: no step down, no noise
    ((F(4, 5), F(1, 2), 0), (F(1, 2), F(1), F(0))),
    # eta 2 from pure noise: ratio 1 + 2 (1/4 - 1) = -1/2; sd = -1/8 (past the clean estimate);
    # alpha = (3/4)/(9/8) = 2/3; c^2 = 1/16 - (1/12)^2 = 1/18
    ((F(1), F(1, 4), 2), (F(-1, 8), F(2, 3), F(1, 18))),
    # last step: straight to the clean estimate
    ((F(3, 10), F(0), 1), (F(0), F(1), F(0))),
]


@pytest.mark.parametrize("args,expected", HAND, ids=["eta1", "eta0.5", "eta0", "eta2-overshoot", "last-step"])
def test_ancestral_step_matches_hand_computed_values(args, expected):
    sigma_down, alpha, renoise = ancestral_step(*(float(a) for a in args))
    assert sigma_down == pytest.approx(float(expected[0]), abs=1e-15)
    assert alpha == pytest.approx(float(expected[1]), abs=1e-15)
    assert renoise == pytest.approx(math.sqrt(expected[2]), abs=1e-15)


def test_reference_step_accepts_tensors():
    assert ancestral_step(torch.tensor(0.8), torch.tensor(0.5), 1.0) == pytest.approx((5 / 16, 8 / 11, 24 ** .5 / 11))


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0, 1.7, 2.0])
def test_step_keeps_the_flow_marginal(eta):
    """alpha * (1 - sigma_down) = 1 - sigma_next (signal) and (alpha * sigma_down)^2 + renoise^2 = sigma_next^2
    (noise) for every step of a real schedule: the re-noised latent sits on the path at sigma_next."""
    sig = flow_sigmas(12).tolist()
    for s, sn in zip(sig[:-2], sig[1:-1]):
        sd, alpha, c = ancestral_step(s, sn, eta)
        assert abs(sd) <= sn + 1e-12
        assert alpha * (1 - sd) == pytest.approx(1 - sn, abs=1e-12)
        assert (alpha * sd) ** 2 + c ** 2 == pytest.approx(sn ** 2, abs=1e-12)


@pytest.mark.parametrize("eta", [-0.1, 2.01])
def test_sampler_refuses_eta_outside_0_to_2(eta):
    with pytest.raises(ValueError, match="eta"):
        sample_euler_ancestral_rf(ToyFlowModel(), start_latent(), flow_sigmas(3), eta=eta, disable=True)


@pytest.mark.parametrize("sigma,sigma_next", [(0.5, 0.8), (0.0, 0.0), (1.5, 0.5)])
def test_sampler_refuses_steps_that_are_not_flow_denoising(sigma, sigma_next):
    model = ToyFlowModel()
    with pytest.raises(ValueError, match="scheduler"):
        sample_euler_ancestral_rf(model, start_latent(), torch.tensor([sigma, sigma_next]), disable=True)
    assert model.calls == 0, "refused before the first model call"


class OracleModel(ToyFlowModel):
    """A denoiser that knows x0."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def __call__(self, x, sigma, **extra_args):
        return self.x0


def test_oracle_denoiser_step_lands_on_the_path():
    """With a denoiser that knows x0, one step from x = (1-s) x0 + s eps gives (1-sn) x0 plus noise of std sn."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 128, 128, generator=g)
    s, sn = 0.8, 0.5
    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    out = sample_euler_ancestral_rf(OracleModel(x0), x, torch.tensor([s, sn]), disable=True,
                                    noise_sampler=lambda a, b: torch.randn(x0.shape, generator=g))
    residual = out - (1 - sn) * x0
    assert residual.mean().abs() < 0.01
    assert residual.std().item() == pytest.approx(sn, rel=0.02)


# --------------------------------------------------------------------------------------------------------------
# The sampler against a loop written from the docstring
# --------------------------------------------------------------------------------------------------------------

def reference_loop(model, x, sigmas, eta, s_noise, noise):
    """Docstring math, written out independently: Euler move to sigma_down along d = (x - D) / sigma, then
    x = alpha x + sqrt(sn^2 - (alpha sd)^2) * s_noise * z. Returns the x entering each step and the final x."""
    xs = []
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        xs.append(x)
        denoised = model(x, torch.full((x.shape[0],), s))
        if sn == 0:
            x = denoised
            continue
        sd = sn * (1 + eta * (sn / s - 1))
        x = x + (sd - s) * (x - denoised) / s
        if eta > 0:
            alpha = (1 - sn) / (1 - sd)
            x = alpha * x + math.sqrt(sn ** 2 - (alpha * sd) ** 2) * s_noise * noise(s, sn)
    return x, xs


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.6), (1.3, 2.5)])
def test_sampler_matches_the_docstring_math_step_by_step(eta, s_noise):
    sigmas = flow_sigmas(6)
    x = start_latent()
    out, xs, seen = run_capturing(ToyFlowModel(), x, sigmas, eta=eta, s_noise=s_noise, noise_sampler=FixedNoise(6))
    ref_out, ref_xs = reference_loop(ToyFlowModel(), x.clone(), sigmas, eta, s_noise, FixedNoise(6))
    assert len(xs) == len(ref_xs) == 6
    for i, (a, b) in enumerate(zip(xs, ref_xs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, x)


def test_callback_reports_every_step_like_comfy_samplers():
    sigmas = flow_sigmas(4)
    model = ToyFlowModel()
    _, _, seen = run_capturing(model, start_latent(), sigmas, noise_sampler=FixedNoise(4))
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert model.calls == 4
    for i, s in enumerate(seen):
        assert set(s) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(s["sigma"]) == float(s["sigma_hat"]) == float(sigmas[i])
        assert s["denoised"].shape == SHAPE


def test_last_step_returns_the_denoised_estimate():
    sigmas = flow_sigmas(3)
    out, _, seen = run_capturing(ToyFlowModel(), start_latent(), sigmas, noise_sampler=FixedNoise(3))
    assert torch.equal(out, seen[-1]["denoised"])


def test_eta_zero_is_plain_euler_and_draws_no_noise():
    def no_noise(sigma, sigma_next):
        raise AssertionError("eta = 0 must not draw noise (it would shift ComfyUI's seeded stream)")

    sigmas = flow_sigmas(5)
    x = start_latent()
    out, xs, _ = run_capturing(ToyFlowModel(), x, sigmas, eta=0.0, noise_sampler=no_noise)
    model, ref = ToyFlowModel(), x.clone()
    for i in range(len(sigmas) - 1):
        torch.testing.assert_close(xs[i], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
        s = sigmas[i]
        denoised = model(ref, s.expand(ref.shape[0]))
        ref = ref + (sigmas[i + 1] - s) * (ref - denoised) / s
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_s_noise_zero_at_eta_one_still_steps_down_without_noise():
    """s_noise scales only the injected noise: at 0 the step is the deterministic part of the ancestral step."""
    sigmas = flow_sigmas(4)
    x = start_latent()
    out, _, _ = run_capturing(ToyFlowModel(), x, sigmas, eta=1.0, s_noise=0.0, noise_sampler=FixedNoise(4))
    ref, _ = reference_loop(ToyFlowModel(), x.clone(), sigmas, 1.0, 0.0, FixedNoise(4))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_pipeline_module_imports_without_comfyui():
    code = ("import sys; import pipeline.sampling; "
            "bad = [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.')]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(sampling.__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------------------
# With ComfyUI's modules: seeded noise, and parity with its own flow sampler
# --------------------------------------------------------------------------------------------------------------

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                reason="no CUDA device here"))]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_is_bit_identical_and_another_seed_differs(comfy_sampling, device):
    sigmas = flow_sigmas(4).to(device)
    x = start_latent().to(device)
    runs = [sample_euler_ancestral_rf(ToyFlowModel(), x.clone(), sigmas, extra_args={"seed": seed}, disable=True)
            for seed in (42, 42, 43)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_matches_comfyui_euler_ancestral_for_flow_models(comfy_sampling, eta, s_noise, device):
    """Same seed, same start: ComfyUI's sample_euler_ancestral_RF and ours agree (they share the noise stream,
    whose seeding differs between CPU and CUDA)."""
    sigmas = flow_sigmas(5).to(device)
    x = start_latent().to(device)
    extra = {"seed": 7}
    ours = sample_euler_ancestral_rf(ToyFlowModel(), x.clone(), sigmas, extra_args=dict(extra), disable=True,
                                     eta=eta, s_noise=s_noise)
    theirs = comfy_sampling.sample_euler_ancestral_RF(ToyFlowModel(), x.clone(), sigmas, extra_args=dict(extra),
                                                       disable=True, eta=eta, s_noise=s_noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_model_sampling_noise_scale_multiplies_s_noise(comfy_sampling):
    """As the host's own flow sampler does, which the pack's runs; a host whose sampler has no `noise_scale` (v0.8)
    has nothing to follow."""
    import inspect

    if "noise_scale" not in inspect.getsource(comfy_sampling.sample_euler_ancestral_RF):
        pytest.skip("this host's sample_euler_ancestral_RF does not read model_sampling.noise_scale")
    sigmas = flow_sigmas(4)
    x = start_latent()
    scaled = sample_euler_ancestral_rf(ToyFlowModel(noise_scale=0.5), x.clone(), sigmas, s_noise=1.0, disable=True,
                                       noise_sampler=FixedNoise(4))
    direct = sample_euler_ancestral_rf(ToyFlowModel(), x.clone(), sigmas, s_noise=0.5, disable=True,
                                       noise_sampler=FixedNoise(4))
    absent = sample_euler_ancestral_rf(ToyFlowModel(), x.clone(), sigmas, s_noise=0.5, disable=True,
                                       noise_sampler=FixedNoise(4))
    torch.testing.assert_close(scaled, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(absent, direct, rtol=0, atol=0)
