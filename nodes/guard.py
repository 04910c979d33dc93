"""OOM Guard: retry a sampling step (or a VAE decode) that ran out of memory, after freeing what can be freed."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipeline.oom.attach import guard_model
from ..pipeline.oom.guard import DEFAULT_MAX_RETRIES
from ..pipeline.oom.vae import guard_vae
from . import outputs


class NewBieOOMGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieOOMGuard",
            display_name="OOM Guard",
            category="NewBie",
            description="MODEL -> MODEL for any sampler node: when the GPU runs out of memory inside a sampling "
                        "step, frees memory (allocator cache, other models, part of this model's weights, then "
                        "the CFG batch split in halves) and retries that same step, so the image is the one an "
                        "uninterrupted run gives. Each recovery is logged and shown on this node. If nothing makes "
                        "the step fit, the prompt fails with how much memory was needed and what to try.",
            inputs=[
                io.Model.Input("model", tooltip="The model to guard (any MODEL; NewBie Loader's or after LoRAs)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: a VAE to guard as well. A decode that runs out of memory is "
                                     "retried whole after freeing memory, before ComfyUI's tiled fallback "
                                     "(which can differ slightly at tile seams). Use the VAE output for VAEDecode."),
                io.Int.Input("max_retries", default=DEFAULT_MAX_RETRIES, min=0, max=16,
                             tooltip="Retries per model call, each after one more rung of the ladder: 1 empty the "
                                     "cache, 2 unload other models, 3 offload part of this model's weights, "
                                     "4+ split the batch. 0 turns recovery off (the error message stays)."),
                io.Boolean.Input("allow_batch_split", default=True,
                                 tooltip="Let the last rungs run cond and uncond (then latent rows) as separate, "
                                         "smaller calls. Results then differ from an uninterrupted run only by "
                                         "float rounding; off keeps the computation exactly the same or fails."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The same model with the OOM guard attached."),
                io.Vae.Output(display_name="VAE",
                              tooltip="The guarded VAE, when a VAE is connected; without one, a node using this output fails with an error saying to connect it."),
                io.String.Output(display_name="report", tooltip="The recovery ladder in force and the recoveries "
                                                                "so far (each one is also logged)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, max_retries, allow_batch_split, vae=None) -> io.NodeOutput:
        guarded, guard = guard_model(model, max_retries, allow_batch_split, node_id=cls.hidden.unique_id)
        if vae is not None:
            guarded_vae = guard_vae(vae, guard)
        else:
            (guarded_vae,) = outputs.unavailable(
                cls.hidden.prompt, cls.hidden.unique_id, {1: "VAE"},
                "OOM Guard has no VAE to guard: connect the loader's VAE to its vae input, or take the VAE "
                "straight from the loader")
        report = guard.describe(vae_guarded=vae is not None, device=getattr(model, "load_device", None))
        return io.NodeOutput(guarded, guarded_vae, report)


NODES = [NewBieOOMGuard]
