"""NewBie Save Quantized DiT: the DiT quantized once (fp8/int8) and written as ComfyUI's quantized checkpoint."""
from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..pipeline import loader, quantize


class NewBieSaveQuantizedDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieSaveQuantizedDiT",
            display_name="NewBie Save Quantized DiT",
            category="NewBie",
            description="Quantizes a 16-bit NewBie DiT file to fp8 or int8 once and saves it to "
                        "models/diffusion_models as ComfyUI's quantized safetensors checkpoint, so later loads "
                        "skip the quantization and read half the bytes.",
            inputs=[
                io.Combo.Input("diffusion_model", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The 16-bit NewBie DiT file (models/diffusion_models) to quantize."),
                io.Combo.Input("precision", options=list(quantize.FORMATS), default="fp8",
                               tooltip="fp8: scaled e4m3, one scale per tensor. int8: one scale per output "
                                       "channel (needs a ComfyUI with int8_tensorwise)."),
                io.String.Input("filename", default="",
                                tooltip="Name of the new file, written beside the source file; empty: the source "
                                        "name with -fp8/-int8. An existing file is never overwritten."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="What was written, where, and its size.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, diffusion_model, precision, filename) -> io.NodeOutput:
        source = Path(folder_paths.get_full_path_or_raise("diffusion_models", diffusion_model))
        name = filename.strip() or f"{source.stem}-{precision}.safetensors"
        target = source.parent / Path(name).name  # beside the source, in whichever models folder that is
        sd = loader.read_single_part("dit", source)[0]
        report = quantize.write_quantized_file(sd, precision, target, source)
        return io.NodeOutput(report, ui={"text": [report]})


NODES = [NewBieSaveQuantizedDiT]
