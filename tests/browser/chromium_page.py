"""One page of Debian's headless Chromium, driven through playwright-core (bridge.mjs) by line-delimited JSON."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM = Path(os.environ.get("NEWBIE_CHROMIUM", "/usr/bin/chromium"))


def why_unavailable() -> str | None:
    """None when the browser tests can run, else one line saying what is missing and how to get it."""
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh (apt-get install chromium)"
    if shutil.which("node") is None:
        return "no node on PATH: run scripts/install_browser.sh (apt-get install nodejs npm; Node.js 20+)"
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 20:
        return f"node {version} is too old for playwright-core: Node.js 20+ is needed"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed: run scripts/install_browser.sh (npm ci in tests/browser)"
    return None


class BrowserError(RuntimeError):
    pass


class ChromiumPage:
    def __init__(self, user_data_dir: Path):
        self.user_data_dir = Path(user_data_dir)
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["node", str(HERE / "bridge.mjs")], cwd=HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._answers: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._next_id = 0
        threading.Thread(target=self._read, args=(self.proc.stdout, self._answers.put, ""), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr.append, None), daemon=True).start()

    @staticmethod
    def _read(stream, sink, at_end):
        for line in stream:
            sink(line)
        if at_end is not None:
            sink(at_end)  # the bridge is gone: wake up whoever waits for an answer

    def _call(self, op: str, answer_within: float = 60.0, **args):
        self._next_id += 1
        self.proc.stdin.write(json.dumps({"id": self._next_id, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._answers.get(timeout=answer_within)
        except queue.Empty:
            raise BrowserError(f"browser did not answer {op} within {answer_within} s; {self._stderr_tail()}") from None
        if not line:
            raise BrowserError(f"the browser bridge exited during {op}; {self._stderr_tail()}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise BrowserError(f"{op} failed: {answer['error']}")
        return answer["value"]

    def _stderr_tail(self) -> str:
        return "stderr:\n" + "".join(self._stderr)[-3000:]

    def open(self, url: str, width: int = 1400, height: int = 900) -> str:
        return self._call("open", answer_within=120, url=url, userDataDir=str(self.user_data_dir), width=width,
                          height=height)

    def eval(self, expr: str, timeout: float = 60.0):
        """Value of a JavaScript expression in the page (a returned promise is awaited)."""
        return self._call("eval", answer_within=timeout, expr=expr)

    def call(self, body: str, arg=None, timeout: float = 60.0):
        """Run an async function body with `arg` (JSON-serialisable) in the page; return its value."""
        return self.eval(f"(async (arg) => {{ {body} }})({json.dumps(arg)})", timeout=timeout)

    def wait(self, expr: str, timeout: float = 30.0):
        """Wait until the expression is truthy."""
        return self._call("wait", answer_within=timeout + 10, expr=expr, timeout=int(timeout * 1000))

    def type(self, selector: str, text: str) -> None:
        self._call("type", answer_within=60 + len(text) / 10, selector=selector, text=text)

    def press(self, key: str) -> None:
        self._call("press", key=key)

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        """A PNG of the page, or of `clip` ({x, y, width, height} in page pixels)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call("screenshot", path=str(path), clip=clip)
        return Path(path)

    def log(self) -> list[str]:
        return self._call("log")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call("close", answer_within=30)
            except (BrowserError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
