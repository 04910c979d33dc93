"""The pack in ComfyUI's real front end (comfyui-frontend-package) in headless Chromium: its nodes and editor
extension load, every example workflow opens without missing nodes and converts to the prompt tests/ui_to_api.py
gives, the basic workflow runs on the tiny model and shows its image, and the XML box marks errors as you type.

Screenshots go to the test's temporary folder; with NEWBIE_UPDATE_SCREENSHOTS=1 they also replace the README's
docs/images/workflow.png and docs/images/xml-error.png.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from devkit import harness
import ui_to_api
from chromium_page import why_unavailable
from pipeline.xml_prompt import PromptError, parse_prompt, skeleton

pytestmark = [pytest.mark.host, pytest.mark.browser]

if why_unavailable():
    pytest.skip(f"browser tests skipped: {why_unavailable()}", allow_module_level=True)

EXAMPLES = sorted((harness.REPO / "example_workflows").glob("*.json"))
NODE_IDS = ["NewBieLoader", "NewBieLoraLoader", "NewBieXMLPromptFlatten", "NewBieVRAMWarmup", "NewBieEulerAncestralSampler",
            "NewBieOOMGuard"]
DOCS_IMAGES = harness.REPO / "docs" / "images"
MALFORMED = "<character_1>\n  <n>$character_1$</n>\n  <appearance>blue_hair</clothing>\n</character_1>"
FIXED = "<character_1>\n  <n>$character_1$</n>\n  <appearance>blue_hair</appearance>\n</character_1>"
# Visible text the front end shows for a node type it does not know (a notice in 1.49, a dialog in older ones).
MISSING_NOTICES = "(document.body.innerText.match(/missing node/gi) || []).length"


def _keep_screenshot(shot, name: str) -> None:
    if os.environ.get("NEWBIE_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMAGES / name)


def _load(front_end, workflow: dict) -> None:
    front_end.page.call("await app.loadGraphData(arg);", workflow)
    front_end.page.eval("new Promise((ok) => setTimeout(ok, 300))")


def test_page_loads_with_the_pack_nodes_and_its_editor_extension(front_end):
    page = front_end.page
    registered = page.eval(f"{json.dumps(NODE_IDS)}.filter((id) => id in LiteGraph.registered_node_types)")
    assert registered == NODE_IDS
    categories = page.eval(f"{json.dumps(NODE_IDS)}.map((id) => LiteGraph.registered_node_types[id].category)")
    assert categories == ["NewBie"] * len(NODE_IDS)
    assert page.eval("app.extensions.some((e) => e.name === 'NewBie.XMLPrompt')"), \
        f"web/js/newbie_xml.js did not register; browser log: {page.log()}"
    ours = [line for line in page.log() if "newbie" in line.lower()]
    assert not ours, f"errors from the pack's front-end files: {ours}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_opens_without_missing_nodes_and_converts_like_the_front_end(front_end, example):
    page = front_end.page
    workflow = json.loads(example.read_text())
    before = page.eval(MISSING_NOTICES)
    _load(front_end, workflow)
    types = sorted({node["type"] for node in workflow["nodes"]})
    unknown = page.eval(f"{json.dumps(types)}.filter((t) => !(t in LiteGraph.registered_node_types))")
    assert not unknown, f"{example.name}: node types the front end does not know: {unknown}"
    assert page.eval(MISSING_NOTICES) == before, f"{example.name}: the front end reports missing nodes"
    assert page.eval("app.graph.nodes.length") == len(workflow["nodes"])
    # The front end reads widgets_values as the file means them, and sends what the converter sends.
    values = page.eval("Object.fromEntries(app.graph.serialize().nodes.map((n) => [n.id, n.widgets_values ?? null]))")
    for node in workflow["nodes"]:
        assert values[str(node["id"])] == node.get("widgets_values"), f"{example.name}: node {node['id']}"
    sent = page.eval("app.graphToPrompt().then((p) => p.output)")
    converted = ui_to_api.ui_to_api(workflow, front_end.server.get("/object_info"))
    # Titles (_meta) are labels only; the front end may show its own translation of a core node's name.
    assert {k: (v["class_type"], v["inputs"]) for k, v in sent.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in converted.items()}


def test_missing_node_check_sees_an_unknown_node(front_end):
    """The check above must be able to fail: a node type nobody registered is reported."""
    page = front_end.page
    workflow = json.loads(EXAMPLES[0].read_text())
    loader = next(node for node in workflow["nodes"] if node["type"] == "NewBieLoader")
    loader["type"] = "NoSuchNodeFromThisTest"
    before = page.eval(MISSING_NOTICES)
    _load(front_end, workflow)
    page.wait(f"{MISSING_NOTICES} > {before}", timeout=10)


def test_basic_workflow_runs_on_the_tiny_model_and_shows_its_image(front_end, tmp_path):
    page, server = front_end.page, front_end.server
    workflow = json.loads((harness.REPO / "example_workflows" / "newbie_16gb_basic.json").read_text())
    # The example names the public release's files; this host has the tiny models. Small and quick, too.
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        node["widgets_values"] = [ui_to_api.PUBLIC_TO_TINY.get(v, v) if isinstance(v, str) else v for v in values]
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [256, 256]
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = 3  # steps
        elif node["type"] == "SaveImage":
            node["widgets_values"][0] = "browser"
    _load(front_end, workflow)
    history_before = set(server.get("/history"))
    page.call("await app.queuePrompt(0, 1);")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        new = set(server.get("/history")) - history_before
        if new and server.get(f"/history/{next(iter(new))}")[next(iter(new))]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the queued prompt did not finish; browser log: {page.log()}\n{server.log_tail()}")
    prompt_id = next(iter(new))
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success", server.error_text(entry)
    filename = server.output_images(entry)[0].name
    # The Save Image node shows the picture (drawn on the canvas from the node's <img> elements).
    page.wait("app.graph.nodes.filter((n) => n.type === 'SaveImage').some((n) => (n.imgs ?? []).some((img) =>"
              f" img.src.includes('/view?filename=') && img.src.includes({json.dumps(filename)})"
              " && img.complete && img.naturalWidth === 256))", timeout=30)
    page.eval("new Promise((ok) => requestAnimationFrame(() => setTimeout(ok, 300)))")
    _keep_screenshot(page.screenshot(tmp_path / "workflow.png"), "workflow.png")


def _add_xml_node(page) -> None:
    page.call("""
        app.graph.clear();
        const node = LiteGraph.createNode('NewBieXMLPromptFlatten');
        node.pos = [200, 160];
        app.graph.add(node);
        node.setSize([560, 420]);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [0, 0];
        app.graph.setDirtyCanvas(true, true);
        const text = node.widgets.find((w) => w.name === 'text');
        text.value = '';  // the front end keeps widget values by node id, and a cleared graph reuses the ids
        text.element.dataset.testTarget = 'xml-text';
    """)


STATUS = "document.querySelector('[data-testid=newbie-xml-status]')"
TEXT = "document.querySelector('[data-test-target=xml-text]')"


def test_xml_box_marks_the_first_error_as_you_type_and_clears_when_fixed(front_end, tmp_path):
    page, server = front_end.page, front_end.server
    _add_xml_node(page)
    page.wait(f"{STATUS} && {STATUS}.dataset.state === 'info'", timeout=10)  # empty prompt
    with pytest.raises(PromptError) as server_error:
        parse_prompt(MALFORMED)
    page.type("[data-test-target=xml-text]", MALFORMED)
    # Typing is character by character: wait until the whole prompt is in and the check has run on all of it. An
    # intermediate state is an error too, at line 1 for a lone '<', and at the same line and column for the
    # unfinished "</clot" (a loaded CI machine caught that one), so the wait is for the message as well.
    page.wait(f"{TEXT}.value === {json.dumps(MALFORMED)} && {STATUS}.dataset.state === 'error' && "
              f"{STATUS}.dataset.line === '3' && "
              f"{STATUS}.textContent === {json.dumps(chr(0x2717) + ' ' + str(server_error.value))}", timeout=10)
    assert (page.eval(f"{STATUS}.dataset.line"), page.eval(f"{STATUS}.dataset.column")) == ("3", "24")
    assert page.eval(f"{STATUS}.textContent") == f"\u2717 {server_error.value}", "the editor must say what the server says"
    assert page.eval("document.querySelector('[data-test-target=xml-text]').classList.contains('newbie-xml-invalid')")
    around_node = page.eval("""(() => {
        const node = app.graph.nodes.find((n) => n.type === 'NewBieXMLPromptFlatten');
        const box = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
        return {x: box.left + x - 20, y: box.top + y - 20, width: node.size[0] + 40,
                height: node.size[1] + LiteGraph.NODE_TITLE_HEIGHT + 40};
    })()""")
    _keep_screenshot(page.screenshot(tmp_path / "xml-error.png", clip=around_node), "xml-error.png")

    if "PreviewAny" in server.get("/object_info"):  # the server refuses the same prompt with the same words
        with pytest.raises(harness.PromptFailed) as refused:
            server.run({"1": {"class_type": "NewBieXMLPromptFlatten",
                              "inputs": {"text": MALFORMED, "mode": "official", "negative": ""}},
                        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 4]}}})
        assert str(server_error.value) in str(refused.value)

    page.press("Control+A")
    page.type("[data-test-target=xml-text]", FIXED)
    well_formed = "\u2713 well-formed XML: 1 character"
    page.wait(f"{TEXT}.value === {json.dumps(FIXED)} && {STATUS}.dataset.state === 'ok' && "
              f"{STATUS}.textContent === {json.dumps(well_formed)}", timeout=10)  # the check on the whole text
    assert page.eval(f"{STATUS}.textContent") == well_formed
    assert not page.eval("document.querySelector('[data-test-target=xml-text]').classList.contains('newbie-xml-invalid')")


def test_context_menu_offers_the_skeleton_and_the_next_character_block(front_end):
    page = front_end.page
    _add_xml_node(page)
    menu = """
        const node = app.graph.nodes.find((n) => n.type === 'NewBieXMLPromptFlatten');
        return app.canvas.getNodeMenuOptions(node).filter(Boolean)
          .filter((o) => String(o.content).startsWith('NewBie XML'))
          .map((o) => ({content: o.content, disabled: !!o.disabled}));
    """
    pick = """
        const node = app.graph.nodes.find((n) => n.type === 'NewBieXMLPromptFlatten');
        const option = app.canvas.getNodeMenuOptions(node).filter(Boolean).find((o) => o.content === arg);
        option.callback();
        await new Promise((ok) => setTimeout(ok, 150));
        return node.widgets.find((w) => w.name === 'text').value;
    """
    options = page.call(menu)
    assert [o["content"] for o in options] == [
        "NewBie XML: skeleton with 1 character", "NewBie XML: skeleton with 2 characters",
        "NewBie XML: skeleton with 3 characters", "NewBie XML: add a <character_1> block"]
    assert not any(o["disabled"] for o in options)
    assert page.call(pick, "NewBie XML: skeleton with 2 characters") == skeleton(2)
    assert page.call(menu)[0]["disabled"], "a skeleton must not replace text the user wrote"
    text = page.call(pick, "NewBie XML: add a <character_3> block")
    assert [c.index for c in parse_prompt(text).characters] == [1, 2, 3]
    assert text.index("<character_3>") < text.index("<general_tags>")
    page.wait(f"{STATUS}.textContent === '\u2713 well-formed XML: 3 characters, general_tags'", timeout=10)
