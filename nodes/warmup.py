"""VRAM Warmup: make the first real image as fast as the tenth."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipeline import warmup


class NewBieVRAMWarmup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieVRAMWarmup",
            display_name="VRAM Warmup",
            category="NewBie",
            description="Runs the smallest job that makes the first real image as fast as later ones (weights on "
                        "the GPU, kernels chosen, memory pool grown) and passes MODEL through unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model to warm up; passed through unchanged."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=16,
                             tooltip="Width of the images you are about to make (warm-up is per resolution)."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=16,
                             tooltip="Height of the images you are about to make."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Batch size of the real job."),
                io.Int.Input("steps", default=2, min=1, max=10,
                             tooltip="Sampling steps of the warm-up itself; 2 is enough for kernel choice."),
                io.Clip.Input("clip", optional=True, tooltip="Also warm up the text encoders."),
                io.Vae.Input("vae", optional=True, tooltip="Also warm up the VAE decoder at this size."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.String.Output(display_name="report", tooltip="What was warmed up and how long it took."),
            ],
        )

    @classmethod
    def execute(cls, model, width, height, batch_size, steps, clip=None, vae=None) -> io.NodeOutput:
        report = warmup.warm_up(model, width, height, batch_size, steps, clip=clip, vae=vae)
        return io.NodeOutput(model, report)


NODES = [NewBieVRAMWarmup]
