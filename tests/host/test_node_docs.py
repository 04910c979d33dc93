"""Every NewBie node, as the server describes it, has a tooltip on every input and its help page
(web/docs/<node_id>.md), served where ComfyUI's front end looks for it."""
from __future__ import annotations

import urllib.request

import pytest

from devkit import harness

pytestmark = pytest.mark.host

DOCS = harness.REPO / "web" / "docs"
NODE_IDS = ["NewBieLoader", "NewBieSaveQuantizedDiT", "NewBieLoraLoader", "NewBieXMLPromptFlatten", "NewBieVRAMWarmup", "NewBieEulerAncestralSampler",
            "NewBieOOMGuard"]


def _pack_nodes(server) -> dict:
    info = server.get("/object_info")
    nodes = {k: v for k, v in info.items() if v.get("python_module", "").split(".")[-1] == harness.PACK_NAME}
    assert sorted(nodes) == sorted(NODE_IDS), f"the pack's nodes on this host: {sorted(nodes)}"
    return nodes


def test_every_input_has_a_tooltip(server):
    missing = []
    for node_id, node in _pack_nodes(server).items():
        for section in ("required", "optional"):
            for name, spec in (node["input"].get(section) or {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{node_id}.{name}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_every_node_has_its_docs_page_naming_each_input_and_output(server):
    for node_id, node in _pack_nodes(server).items():
        page = DOCS / f"{node_id}.md"
        assert page.is_file(), f"no help page {page.relative_to(harness.REPO)}"
        text = page.read_text()
        assert text.startswith(f"# {node['display_name']}\n"), f"{page.name} should start with its display name"
        names = [n for section in ("required", "optional") for n in (node["input"].get(section) or {})]
        names += node["output_name"]
        undocumented = [n for n in names if f"`{n}`" not in text]
        assert not undocumented, f"{page.name} does not describe {undocumented}"
        assert "## Example" in text and ("## Memory" in text or "## Precision and memory" in text), page.name


def test_docs_are_served_where_the_front_end_asks_for_them(server):
    """The front end fetches /extensions/<pack folder>/docs/<node_id>.md (after a per-locale
    docs/<node_id>/<locale>.md, which this pack does not need): the pack folder comes from python_module."""
    for node_id, node in _pack_nodes(server).items():
        pack = node["python_module"].split(".")[1]
        with urllib.request.urlopen(f"{server.url}/extensions/{pack}/docs/{node_id}.md", timeout=30) as answer:
            assert answer.read().decode() == (DOCS / f"{node_id}.md").read_text()
