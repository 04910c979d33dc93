"""Euler Ancestral Sampler: a SAMPLER for SamplerCustomAdvanced, made for rectified-flow models like NewBie."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..pipeline import sampling
from ..pipeline.errors import require_finite


class NewBieEulerAncestralSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieEulerAncestralSampler",
            display_name="Euler Ancestral Sampler",
            category="NewBie",
            description="Euler ancestral for rectified-flow models (NewBie, Lumina 2): each step moves below the "
                        "next noise level and re-noises back up. Plug into SamplerCustomAdvanced; with the same "
                        "seed it matches ComfyUI's euler_ancestral at eta 1 and euler at eta 0.",
            inputs=[
                io.Float.Input("eta", default=1.0, min=0.0, max=2.0, step=0.01, round=False,
                               tooltip="How much of each step is fresh noise. 0: plain Euler (deterministic); "
                                       "1: standard ancestral; up to 2: more variation per step."),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=4.0, step=0.01, round=False,
                               tooltip="Scale of the injected noise. 1 keeps the noise level the model expects; "
                                       "lower gives smoother, higher grainier results."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, eta, s_noise) -> io.NodeOutput:
        require_finite(eta, "eta", "Euler Ancestral Sampler", "a number from 0 to 2 (1: standard ancestral)")
        require_finite(s_noise, "s_noise", "Euler Ancestral Sampler", "a number from 0 to 4 (1: the usual noise)")
        return io.NodeOutput(comfy.samplers.KSAMPLER(sampling.sample_euler_ancestral_rf,
                                                     extra_options={"eta": eta, "s_noise": s_noise}))


NODES = [NewBieEulerAncestralSampler]
