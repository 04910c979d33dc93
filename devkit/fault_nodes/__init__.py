"""A test-only ComfyUI node that injects out-of-memory faults (devkit/faults.py) into a graph. Not part of the
pack: the harness links this folder into a test server's custom_nodes when a test asks for it
(harness.ComfyServer(extra_nodes=[harness.FAULT_NODES])), and devkit/graphs.with_faults puts the node where the
faults belong. ComfyUI loads this folder as a package of its own, so devkit is imported from the checkout."""
import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

_CHECKOUT = str(Path(__file__).resolve().parents[2])
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)  # last, so nothing of ComfyUI's is shadowed

from devkit import faults  # noqa: E402


class NewBieDevkitFaults(io.ComfyNode):
    """Test only: devkit's fault wrappers on a model (put it after the OOM Guard, so its wrapper is the
    innermost one) or on a VAE (put it before the OOM Guard, which then wraps it)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="NewBieDevkitFaults", display_name="Faults (devkit)", category="NewBie/devkit",
                         inputs=[io.String.Input("plan", multiline=True, tooltip="JSON; keys in devkit/faults.py"),
                                 io.Model.Input("model", optional=True, tooltip="a model, after the OOM Guard"),
                                 io.Vae.Input("vae", optional=True, tooltip="a VAE, before the OOM Guard")],
                         outputs=[io.Model.Output(display_name="MODEL"), io.Vae.Output(display_name="VAE")])

    @classmethod
    def execute(cls, plan, model=None, vae=None) -> io.NodeOutput:
        chosen = faults.FaultPlan.parse(plan)
        return io.NodeOutput(None if model is None else faults.inject_model_faults(model, chosen),
                             None if vae is None else faults.inject_vae_faults(vae, chosen))


class DevkitFaultsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [NewBieDevkitFaults]


async def comfy_entrypoint():
    return DevkitFaultsExtension()
