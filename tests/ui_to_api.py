"""A workflow as ComfyUI's editor saves it (UI format: nodes, links, widgets_values) -> the prompt the editor posts
to /prompt (API format: node id -> class_type + inputs), the way the front end's graphToPrompt builds it.

What the front end does, and so this does:
- widget inputs (INT, FLOAT, STRING, BOOLEAN, COMBO that are not forceInput) take their values from
  widgets_values in the node definition's input order, required then optional; an input with
  control_after_generate has one more value after it (fixed/increment/...), which is not sent;
- a linked input is sent as [origin node id, origin slot], also when it is a widget input fed by a link;
- muted nodes and the editor's own nodes (notes) are left out, and so are links coming from them;
- list values are wrapped as {"__value__": [...]} so the server does not read them as links;
- _meta.title is the node's title, else the server's display name (the front end may show its own
  translation of a core node's name there; the server does not read _meta).
Bypassed nodes and legacy Reroute/Primitive nodes are refused rather than guessed at.

Command line (writes the API twins the host tests run, with the tiny test models):
    python tests/ui_to_api.py example_workflows/*.json --out tests/workflows [--object-info URL_OR_FILE]
Without --object-info it starts a ComfyServer (devkit/harness.py) to ask for the node definitions.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EDITOR_ONLY_NODES = {"Note", "MarkdownNote"}  # front-end (virtual) nodes: never sent to the server
MODE_MUTED, MODE_BYPASSED = 2, 4

# The public release's file names, as the example workflows use them -> the tiny models the tests make.
PUBLIC_TO_TINY = {
    "NewBie-Image-Exp0.1-bf16.safetensors": "newbie-tiny.safetensors",
    "gemma_3_4b_it_bf16.safetensors": "newbie-tiny-gemma3.safetensors",
    "jina_clip_v2_bf16.safetensors": "newbie-tiny-jina-clip-v2.safetensors",
    "ae.safetensors": "newbie-tiny-flux-ae.safetensors",
}
# The example LoRA (a NewbieLoraTrainer output folder in models/loras) -> the tiny one conftest writes with PEFT.
EXAMPLE_LORA_TO_TINY = {"newbie_style_lora/adapter_model.safetensors": "newbie-tiny-trainer-lora/adapter_model.safetensors"}


class ConversionError(ValueError):
    pass


def widget_inputs(node_def: dict) -> list[tuple[str, dict]]:
    """(name, options) of each input the editor shows as a widget, in the order of widgets_values."""
    found = []
    order = node_def.get("input_order") or {}
    for section in ("required", "optional"):
        specs = node_def.get("input", {}).get(section) or {}
        for name in order.get(section, list(specs)):
            spec = specs[name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                found.append((name, options))
    return found


def _links(workflow: dict) -> dict:
    """link id -> (origin node id, origin slot); links are lists in format 0.4 and objects in format 1."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            out[link[0]] = (link[1], link[2])
    return out


def _widget_values(node: dict, node_def: dict) -> dict:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        raise ConversionError(f"node {node['id']} ({node['type']}): widgets_values is an object, not a list")
    out, i = {}, 0
    for name, options in widget_inputs(node_def):
        if i < len(values):
            value = values[i]
        elif "default" in options:
            value = options["default"]
        else:
            raise ConversionError(f"node {node['id']} ({node['type']}): no value for widget {name!r}")
        out[name] = {"__value__": value} if isinstance(value, list) else value
        i += 2 if options.get("control_after_generate") else 1
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the front end would post for this UI workflow."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    sent = {}
    for node_id, node in nodes.items():
        if node["type"] in EDITOR_ONLY_NODES or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASSED:
            raise ConversionError(f"node {node_id} ({node['type']}) is bypassed; this converter does not reroute "
                                  "around bypassed nodes")
        if node["type"] not in object_info:
            raise ConversionError(f"node {node_id}: type {node['type']!r} is not known to this ComfyUI")
        sent[node_id] = node
    links = _links(workflow)
    prompt = {}
    for node_id, node in sent.items():
        node_def = object_info[node["type"]]
        inputs = _widget_values(node, node_def)
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            origin_id, origin_slot = links[slot["link"]]
            if origin_id in sent:
                inputs[slot["name"]] = [str(origin_id), int(origin_slot)]
            else:
                inputs.pop(slot["name"], None)  # fed by a node that is not sent: the front end drops it too
        prompt[str(node_id)] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or node_def.get("display_name") or node["type"]}}
    return prompt


def with_tiny_models(prompt: dict) -> dict:
    """The same prompt with the public release's model files replaced by the tiny test models."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and value in PUBLIC_TO_TINY:
                node["inputs"][name] = PUBLIC_TO_TINY[value]
            elif isinstance(value, str) and value in EXAMPLE_LORA_TO_TINY:
                node["inputs"][name] = EXAMPLE_LORA_TO_TINY[value]
    return out


def _object_info(source: str | None) -> dict:
    if source and Path(source).is_file():
        return json.loads(Path(source).read_text())
    if source:
        with urllib.request.urlopen(source, timeout=60) as answer:
            return json.loads(answer.read())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from devkit import harness

    host = harness.find_hosts()["v0.33"] or harness.find_hosts()["v0.8"]
    if host is None:
        raise SystemExit("no ComfyUI host found to ask for node definitions; looked in " + harness.where_looked())
    with tempfile.TemporaryDirectory() as work:
        server = harness.ComfyServer(host, Path(work), Path(work) / "models").start()
        try:
            return server.get("/object_info")
        finally:
            server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="+", type=Path, help="UI-format workflow JSON files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the API-format twins")
    parser.add_argument("--object-info", help="a saved /object_info JSON or its URL (default: start ComfyUI)")
    parser.add_argument("--public-models", action="store_true",
                        help="keep the public model file names instead of the tiny test models")
    args = parser.parse_args(argv)
    object_info = _object_info(args.object_info)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.workflows:
        prompt = ui_to_api(json.loads(path.read_text()), object_info)
        if not args.public_models:
            prompt = with_tiny_models(prompt)
        (args.out / path.name).write_text(json.dumps(prompt, indent=2, ensure_ascii=False) + "\n")
        print(f"{path} -> {args.out / path.name} ({len(prompt)} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
