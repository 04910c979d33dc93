"""NewBie LoRA Loader: NewBie trainer LoRAs (PEFT LoRA, LyCORIS LoKr/LoHa) and ComfyUI-format ones, on a MODEL."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..pipeline import lora


class NewBieLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieLoraLoader",
            display_name="NewBie LoRA Loader",
            category="NewBie",
            description="Applies a LoRA for NewBie's DiT through ComfyUI's own LoRA patches: the PEFT LoRA and "
                        "LyCORIS LoKr that NewBie's trainer writes (which ComfyUI's LoRA loaders skip), and the "
                        "ComfyUI/kohya formats. The report lists what was applied per module kind and every "
                        "tensor that was not.",
            inputs=[
                io.Model.Input("model", tooltip="The NewBie MODEL (from NewBie Loader, or after other LoRAs)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors LoRA from models/loras. For a PEFT LoRA, keep its "
                                       "adapter_config.json beside it (or rename it <name>.json): the scale "
                                       "lives there."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Multiplies the LoRA's change to the weights, as ComfyUI's LoRA loaders "
                                       "do: 0 leaves the model unchanged, 1 is the LoRA as trained."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A copy of the model with the LoRA patched in."),
                io.String.Output(display_name="report",
                                 tooltip="Modules patched per kind, the scale used, and every tensor not applied."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        result = lora.apply_lora(model, path, strength)
        return io.NodeOutput(result.model, result.report)


NODES = [NewBieLoraLoader]
