"""A ComfyUI server serving its real front end (comfyui-frontend-package), with the pack and the tiny models,
opened in headless Chromium; one per host lane, shared by a test module."""
from __future__ import annotations

import pytest

from devkit import harness
from chromium_page import ChromiumPage, why_unavailable

HOSTS = harness.find_hosts()
LANES = [lane for lane, path in HOSTS.items() if path is not None]
# No template browser over the canvas at the first start; no minimap or canvas statistics in the screenshots.
FRONT_END_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
APP_READY = ("window.app && app.graph && app.canvas && window.LiteGraph && LiteGraph.registered_node_types"
             " && LiteGraph.registered_node_types.NewBieLoader")


class FrontEnd:
    def __init__(self, server: harness.ComfyServer, page: ChromiumPage):
        self.server = server
        self.page = page

    def close_dialogs(self) -> None:
        """Close whatever a first start puts over the canvas (template browser, what's-new dialogs)."""
        for _ in range(3):
            if not self.page.eval("document.querySelectorAll('[role=dialog]').length"):
                return
            self.page.press("Escape")
            self.page.eval("new Promise((ok) => setTimeout(ok, 300))")
        self.page.call("""
            for (const button of document.querySelectorAll('[role=dialog] button[aria-label=Close], '
                                                           + '[role=dialog] .p-dialog-close-button')) button.click();
        """)


@pytest.fixture(scope="module", params=LANES or ["none"])
def front_end(request, models_root, tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    lane = request.param
    if HOSTS.get(lane) is None:
        pytest.skip("no ComfyUI host found; looked in " + harness.where_looked())
    work = tmp_path_factory.mktemp(f"front-end-{lane}")
    server = harness.ComfyServer(HOSTS[lane], work, models_root, extra_args=["--real-front-end"])
    server.lane = lane
    server.start()
    page = None
    try:
        status, answer = server.post("/api/settings", FRONT_END_SETTINGS)
        assert status == 200, f"could not store the front end's settings: {status} {answer}"
        page = ChromiumPage(work / "chromium-profile")
        page.open(server.url)
        try:
            page.wait(APP_READY, timeout=120)
        except Exception as error:
            raise AssertionError(f"the front end did not start on the {lane} host: {error}\nbrowser log: "
                                 f"{page.log()}\nserver log:\n{server.log_tail()}") from None
        front = FrontEnd(server, page)
        front.close_dialogs()
        yield front
    finally:
        if page is not None:
            page.close()
        server.stop()
